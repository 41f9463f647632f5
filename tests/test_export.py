"""`export_lora` / `python -m miva export-lora`: the temporal LoRA as a file diffusers' LoRA loader takes."""

import pytest
import torch
from diffusers import AnimateDiffPipeline
from safetensors import safe_open
from safetensors.torch import save_file

from miva.adapter import attach
from miva.adapter_files import read_adapter, save_adapter
from miva.backends import load_base
from miva.backends.animatediff import tiny_text_model
from miva.cli import main
from miva.config import WEIGHTS_NAME, MivaConfig
from miva.export import export_lora

from conftest import randomize, unet_inputs


@pytest.fixture
def trained(tmp_path, tiny_base):
    """A full MIVA (CFA, implicit prompt, temporal LoRA) with random non-zero weights, saved."""
    manager = attach(tiny_base.unet, MivaConfig(base="tiny", motion="spin"), "spin")
    randomize(manager.parameters("spin"), scale=0.2)
    return save_adapter(tiny_base.unet, "spin", tmp_path / "spin")


def lora_only(folder):
    """The adapter's temporal LoRA alone on a fresh tiny base: our MIVA with the CFA and implicit prompt off."""
    base = load_base("tiny")
    manager = attach(base.unet, MivaConfig(base="tiny", cross_frame_attention=False, implicit_prompt_rank=0), "spin")
    manager.load_state_dict("spin", {k: v for k, v in read_adapter(folder)[1].items() if ".lora_" in k})
    return base, manager


def test_diffusers_loads_the_export_and_matches_our_temporal_lora(tmp_path, trained):
    out = tmp_path / "lora" / "spin.safetensors"
    with pytest.warns(UserWarning, match=r"temporal LoRA only.*Cross-frame attention, Implicit prompt"):
        export_lora(trained, out)
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("unet.") and ".motion_modules." in k and ".lora_" in k for k in keys)

    stock = load_base("tiny")  # the same seed: the same weights as the base the adapter was made on
    tokenizer, text_encoder = tiny_text_model()
    pipe = AnimateDiffPipeline(vae=stock.vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=stock.unet,
                               motion_adapter=None, scheduler=stock.scheduler)
    sample, t, embeds = unet_inputs(stock)
    with torch.no_grad():
        before = pipe.unet(sample, t, encoder_hidden_states=embeds).sample
        pipe.load_lora_weights(out.parent, weight_name=out.name, adapter_name="spin")
        theirs = pipe.unet(sample, t, encoder_hidden_states=embeds).sample
        ours_base, ours = lora_only(trained)
        mine = ours_base.unet(sample, t, encoder_hidden_states=embeds).sample
        assert (theirs - before).abs().max() > 0.1  # the LoRA was loaded, not silently skipped
        torch.testing.assert_close(theirs, mine, rtol=0, atol=1e-5)

        pipe.set_adapters(["spin"], [0.6])  # diffusers' adapter weight is MIVA's weight
        theirs = pipe.unet(sample, t, encoder_hidden_states=embeds).sample
        with ours.call(weights={"spin": 0.6}):
            torch.testing.assert_close(theirs, ours_base.unet(sample, t, encoder_hidden_states=embeds).sample,
                                       rtol=0, atol=1e-5)
            with ours.merged_lora():
                merged = ours_base.unet(sample, t, encoder_hidden_states=embeds).sample
        torch.testing.assert_close(theirs, merged, rtol=0, atol=1e-5)


def test_cli_exports_and_says_what_is_left_out(tmp_path, trained, capsys):
    out = tmp_path / "spin.safetensors"
    assert main(["export-lora", str(trained), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert out.is_file() and "wrote" in captured.out
    assert captured.err.count("\n") == 1 and "MIVA-only parts" in captured.err
    assert main(["export-lora", str(trained), "--out", str(tmp_path / "spin.bin")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err


def test_wan_and_lora_less_adapters_are_refused(tmp_path, capsys):
    wan = tmp_path / "wan-spin"
    wan.mkdir()
    MivaConfig.for_base("tiny-wan").save(wan)
    save_file({"x": torch.zeros(1)}, str(wan / WEIGHTS_NAME))
    assert main(["export-lora", str(wan), "--out", str(tmp_path / "w.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no temporal LoRA to export" in err and "3-D" in err and len(err.splitlines()) == 1
    plain = tmp_path / "cfa-only"
    plain.mkdir()
    MivaConfig(base="tiny", temporal_lora_rank=0).save(plain)
    save_file({"x": torch.zeros(1)}, str(plain / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="has no temporal LoRA"):
        export_lora(plain, tmp_path / "p.safetensors")
    assert not (tmp_path / "w.safetensors").exists() and not (tmp_path / "p.safetensors").exists()
