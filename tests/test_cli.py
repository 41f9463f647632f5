"""`python -m miva animate` on the tiny base, with adapters and bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from miva.adapter import attach
from miva.adapter_files import save_adapter
from miva.cli import build_parser, main, parse_adapter_spec
from miva.config import MivaConfig


@pytest.mark.parametrize("spec, expected", [
    ("zoom", ("zoom", 1.0)), ("zoom:0.5", ("zoom", 0.5)), ("dir/zoom:2", ("dir/zoom", 2.0)), ("a:b", ("a:b", 1.0)),
])
def test_adapter_specs(spec, expected):
    assert parse_adapter_spec(spec) == expected


@pytest.mark.parametrize("flag, expected", [([], None), (["--dct-init"], True), (["--no-dct-init"], False)])
def test_dct_init_defaults_to_the_base(flag, expected):
    assert build_parser().parse_args(["animate", "--image", "x.png", *flag]).dct_init is expected


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "first.png"
    Image.fromarray(np.full((48, 40, 3), 120, np.uint8)).save(path)
    return path


def test_animate_writes_a_video(tmp_path, image, tiny_base, capsys):
    attach(tiny_base.unet, MivaConfig(base="tiny", motion="spin"), "spin")
    save_adapter(tiny_base.unet, "spin", tmp_path / "spin")
    out = tmp_path / "out.mp4"
    code = main(["animate", "--base", "tiny", "--image", str(image), "--adapter", f"{tmp_path / 'spin'}:0.7",
                 "--frames", "4", "--steps", "2", "--out", str(out)])
    assert code == 0 and out.stat().st_size > 0
    assert "wrote" in capsys.readouterr().out


def test_animate_with_a_mask_and_mask_mistakes(tmp_path, image, tiny_base, capsys, monkeypatch):
    attach(tiny_base.unet, MivaConfig(base="tiny", motion="spin"), "spin")
    save_adapter(tiny_base.unet, "spin", tmp_path / "spin")
    mask = tmp_path / "mask.png"
    region = np.zeros((48, 40), np.uint8)
    region[:, :20] = 255
    Image.fromarray(region).save(mask)
    common = ["animate", "--base", "tiny", "--image", str(image), "--adapter", str(tmp_path / "spin"),
              "--frames", "3", "--steps", "1", "--out", str(tmp_path / "out.gif")]
    assert main([*common, "--mask", f"spin={mask}"]) == 0
    assert main([*common, "--mask", f"other={mask}"]) == 2
    assert "a mask was given for 'other', which is not in this call" in capsys.readouterr().err
    assert main([*common, "--mask", "spin"]) == 2
    assert "needs the form ADAPTER=VALUE" in capsys.readouterr().err
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main([*common, "--mask-text", "spin=the left half"]) == 2
    assert "not available offline" in capsys.readouterr().err
    assert main(["segment", "--image", str(image), "--text", "a square", "--out", str(tmp_path / "m.png")]) == 2


@pytest.mark.parametrize("extra, message", [
    (["--adapter", "no-such-adapter"], "adapter 'no-such-adapter' was not found"),
    (["--frames", "1"], "ask for 2 to"),
    (["--steps", "0"], "at least 1 step"),
])
def test_animate_errors_are_one_line(tmp_path, image, capsys, extra, message):
    code = main(["animate", "--base", "tiny", "--image", str(image), "--out", str(tmp_path / "o.mp4"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_negative_weight_is_refused(tmp_path, image, tiny_base, capsys):
    attach(tiny_base.unet, MivaConfig(base="tiny"), "spin")
    save_adapter(tiny_base.unet, "spin", tmp_path / "spin")
    code = main(["animate", "--base", "tiny", "--image", str(image), "--adapter", f"{tmp_path / 'spin'}:-1",
                 "--frames", "2", "--steps", "1", "--out", str(tmp_path / "o.mp4")])
    assert code == 2 and "use a number from 0 to 2" in capsys.readouterr().err


def test_train_from_a_folder_of_clips(tmp_path, capsys):
    from miva.media import save_video
    from miva.toy.world import WorldConfig, make_clip

    clips = tmp_path / "clips"
    for seed in range(2):
        save_video(make_clip("move-left", seed, WorldConfig(size=32, frames=4)).frames, clips / f"c{seed}.mp4")
    (clips / "notes.txt").write_text("not a clip")
    out = tmp_path / "adapters" / "slide"
    code = main(["train", "--base", "tiny", "--clips", str(clips), "--out", str(out), "--frames", "4", "--steps", "2",
                 "--checkpoint-every", "1"])
    captured = capsys.readouterr()
    assert code == 0 and (out / "adapter_model.safetensors").is_file() and (out / "preview.gif").is_file()
    assert "step 2/2" in captured.out and "notes.txt" in captured.err
    assert main(["animate", "--base", "tiny", "--image", str(tmp_path / "none.png"), "--adapter", str(out)]) == 2


def test_train_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    assert main(["train", "--base", "tiny", "--clips", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert main(["train", "--base", "tiny", "--stills", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors[-2].startswith("error: no usable clips") or "no usable" in errors[-2]
    assert errors[-1] == "error: --stills needs --camera (zoom-in, zoom-out, pan-left or pan-right)."


def test_animate_mixes_m_mivas_composited_or_in_one_pass(tmp_path, image, tiny_base, monkeypatch):
    from miva.pipeline import MivaPipeline

    common = ["animate", "--base", "tiny", "--image", str(image), "--frames", "3", "--steps", "2",
              "--out", str(tmp_path / "out.gif")]
    for name, columns in (("a", slice(0, 20)), ("b", slice(20, 40))):
        attach(tiny_base.unet, MivaConfig(base="tiny", motion=name, masked=True), name)
        save_adapter(tiny_base.unet, name, tmp_path / name)
        region = np.zeros((48, 40), np.uint8)
        region[:, columns] = 255
        Image.fromarray(region).save(tmp_path / f"{name}.png")
        common += ["--adapter", str(tmp_path / name), "--mask", f"{name}={tmp_path / name}.png"]
    passes, composite = [], MivaPipeline.predict_composite
    monkeypatch.setattr(MivaPipeline, "predict_composite", lambda self, *a: passes.append(1) or composite(self, *a))
    assert main(common) == 0 and len(passes) == 2  # the default: composited at each of the 2 steps
    assert main([*common, "--mix", "attention"]) == 0 and len(passes) == 2  # one shared pass
    with pytest.raises(SystemExit):
        main([*common, "--mix", "blend"])


def test_two_processes_under_accelerate_train_the_adapter_one_process_does(tmp_path):
    """Data parallel on accelerate (gloo on the CPU): 2 processes x 1 clip, 1 process x 2 clips and
    1 process x 2 micro-batches take the same steps, to float rounding (thread counts differ)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    from miva.media import save_video
    from miva.toy.world import WorldConfig, make_clip

    clips = tmp_path / "clips"
    for seed in range(2):
        save_video(make_clip("move-left", seed, WorldConfig(size=32, frames=4)).frames, clips / f"c{seed}.mp4")
    args = ["train", "--base", "tiny", "--clips", str(clips), "--frames", "4", "--steps", "3", "--batch", "2",
            "--checkpoint-every", "2", "--lr", "1e-3"]
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(root)}
    launched = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                               "--main_process_port", "29517", "-m", "miva", *args, "--out", str(tmp_path / "two" / "s")],
                              env=env, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-2000:]
    assert "on 2 processes" in launched.stdout and launched.stdout.count("wrote adapter") == 1
    assert main([*args, "--out", str(tmp_path / "one" / "s")]) == 0
    assert main([*args, "--accumulate", "2", "--out", str(tmp_path / "acc" / "s")]) == 0
    assert main([*args, "--seed", "1", "--out", str(tmp_path / "other" / "s")]) == 0
    one, two, acc, other = (load_file(tmp_path / d / "s" / "adapter_model.safetensors") for d in ("one", "two", "acc", "other"))
    assert all(torch.allclose(one[k], two[k], atol=1e-4) and torch.allclose(one[k], acc[k], atol=1e-4) for k in one)
    assert max((one[k] - other[k]).abs().max() for k in one) > 1e-2  # another run's steps are far from these
    assert main([*args, "--batch", "3", "--accumulate", "2", "--out", str(tmp_path / "odd" / "s")]) == 2
