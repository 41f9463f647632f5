"""The real loading code (`from_pretrained`, safetensors only) on tiny components saved in the Hub layout."""

import pytest
import torch
from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel

from miva.backends import animatediff, load_base
from miva.pipeline import MivaPipeline


def save_hub_layout(root, safe=True):
    """SD1.5-style repo (unet/ vae/ text_encoder/ tokenizer/ scheduler/) + a motion-adapter repo."""
    unet_config, adapter_config, vae_config = animatediff.tiny_configs()
    torch.manual_seed(0)
    sd, motion = root / "sd15", root / "motion-adapter"
    UNet2DConditionModel.from_config(unet_config).save_pretrained(sd / "unet", safe_serialization=safe)
    AutoencoderKL.from_config(vae_config).save_pretrained(sd / "vae", safe_serialization=safe)
    tokenizer, text_encoder = animatediff.tiny_text_model(unet_config["cross_attention_dim"], root / "vocab")
    tokenizer.save_pretrained(sd / "tokenizer")
    text_encoder.save_pretrained(sd / "text_encoder")
    animatediff.tiny_scheduler().save_pretrained(sd / "scheduler")
    MotionAdapter.from_config(adapter_config).save_pretrained(motion, safe_serialization=safe)
    return sd, motion


def test_real_loading_path_on_tiny_components(tmp_path):
    sd, motion = save_hub_layout(tmp_path)
    base = animatediff.load(model=str(sd), motion_adapter=str(motion), height=32, width=32)
    assert base.id == "animatediff-v3"
    assert type(base.unet).__name__ == "UNetMotionModel" and not any(p.requires_grad for p in base.unet.parameters())
    assert base.scheduler.config.beta_schedule == "linear" and base.scheduler.config.clip_sample is False
    saved = MotionAdapter.from_pretrained(motion)
    loaded = base.unet.down_blocks[0].motion_modules[0].proj_in.weight
    assert torch.equal(loaded, saved.down_blocks[0].motion_modules[0].proj_in.weight)
    out = MivaPipeline(base)(torch.rand(3, 32, 32), num_frames=3, num_inference_steps=1, seed=0)
    assert out.frames.shape == (3, 32, 32, 3)


def test_pickled_weights_are_never_loaded(tmp_path):
    sd, motion = save_hub_layout(tmp_path, safe=False)
    assert not list(sd.glob("unet/*.safetensors"))
    with pytest.raises(Exception):
        animatediff.load(model=str(sd), motion_adapter=str(motion))


def test_unknown_base_is_refused():
    with pytest.raises(ValueError, match="unknown base 'sd3'; choose one of"):
        load_base("sd3")
