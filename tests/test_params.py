"""Exact MIVA parameter counts on the full SD1.5 + AnimateDiff v3 config (meta device, no download)."""

import pytest

from miva.adapter import attach
from miva.backends import meta_unet
from miva.cli import main
from miva.config import MivaConfig


@pytest.fixture(scope="module")
def full_counts():
    unet = meta_unet("animatediff-v3")
    return attach(unet, MivaConfig(base="animatediff-v3")).parameter_report("default"), unet


def test_counts_match_the_paper_reading(full_counts):
    counts, _ = full_counts
    assert counts["cross_frame_attention"] == 24_834_272
    assert counts["implicit_prompt"] == 1_599_488
    assert counts["temporal_lora"] == 9_011_200
    assert counts["total"] == 35_444_960


def test_full_config_structure(full_counts):
    _, unet = full_counts
    names = [n for n, _ in unet.named_modules()]
    spatial = [n for n in names if n.endswith("attn1") and ".attentions." in n and "motion_modules" not in n]
    motion = {n.split(".transformer_blocks")[0] for n in names if "motion_modules" in n and n.endswith("attn1")}
    assert len(spatial) == 16 and len(motion) == 20
    assert all(p.is_meta for p in unet.parameters())


def test_params_command_prints_total_last(capsys):
    assert main(["params", "--base", "animatediff-v3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "total 35444960"
    assert any("24,834,272" in line for line in lines)
