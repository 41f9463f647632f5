"""The real loading code (`from_pretrained`, safetensors only) on tiny components saved in the Hub layout,
and the configs kept from the real repos."""

import json

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, MotionAdapter, UNet2DConditionModel

from miva.backends import animatediff, load_base, wan
from miva.pipeline import MivaPipeline

from conftest import CONFIGS, save_sd15_layout


def test_real_loading_path_on_tiny_components(tmp_path):
    sd, motion = save_sd15_layout(tmp_path)
    base = animatediff.load(model=str(sd), motion_adapter=str(motion), height=32, width=32)
    assert base.id == "animatediff-v3"
    assert type(base.unet).__name__ == "UNetMotionModel" and not any(p.requires_grad for p in base.unet.parameters())
    assert base.scheduler.config.beta_schedule == "linear" and base.scheduler.config.clip_sample is False
    assert base.scheduler.config.set_alpha_to_one is False  # from SD1.5's own scheduler config
    assert dict(base.scheduler.config) == dict(animatediff.tiny_scheduler().config)
    saved = MotionAdapter.from_pretrained(motion)
    loaded = base.unet.down_blocks[0].motion_modules[0].proj_in.weight
    assert torch.equal(loaded, saved.down_blocks[0].motion_modules[0].proj_in.weight)
    out = MivaPipeline(base)(torch.rand(3, 32, 32), num_frames=3, num_inference_steps=1, seed=0)
    assert out.frames.shape == (3, 32, 32, 3)


def test_the_real_base_loads_in_half_precision(tmp_path):
    sd, motion = save_sd15_layout(tmp_path)
    base = animatediff.load(model=str(sd), motion_adapter=str(motion), dtype=torch.float16, height=32, width=32)
    assert {p.dtype for p in base.unet.parameters()} == {torch.float16}
    assert {p.dtype for p in base.vae.parameters()} == {torch.float16}
    assert base.null_prompt_embeds.dtype == torch.float16 and base.dtype == torch.float16


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder", "motion-adapter"])
def test_pickled_weights_are_never_loaded(tmp_path, component):
    sd, motion = save_sd15_layout(tmp_path, pickled=(component,))
    folder = motion if component == "motion-adapter" else sd / component
    assert not list(folder.glob("*.safetensors")) and list(folder.glob("*.bin"))
    with pytest.raises(ValueError, match=r"holds only pickled weights \(\w+\.bin\) and MIVA loads safetensors only"):
        animatediff.load(model=str(sd), motion_adapter=str(motion))


def test_unknown_base_is_refused():
    with pytest.raises(ValueError, match="unknown base 'sd3'; choose one of"):
        load_base("sd3")


def test_every_kept_config_is_sourced_in_the_readme():
    readme = (CONFIGS / "README.md").read_text()
    kept = sorted(path.name for path in CONFIGS.glob("*.json"))
    assert kept and all(f"`{name}`" in readme for name in kept)


def test_kept_configs_build_the_real_classes():
    def config(name):
        return json.loads((CONFIGS / name).read_text())

    unet = UNet2DConditionModel.load_config(CONFIGS / "sd15_unet.json")
    assert unet["cross_attention_dim"] == 768 and unet["block_out_channels"] == [320, 640, 1280, 1280]
    with torch.device("meta"):
        assert AutoencoderKL.from_config(config("sd15_vae.json")).config.scaling_factor == 0.18215  # the class default
    scheduler = DDIMScheduler.from_config(config("sd15_scheduler.json"), **animatediff.SCHEDULER_OVERRIDES)
    assert (scheduler.config.beta_start, scheduler.config.beta_end, scheduler.config.set_alpha_to_one) == (0.00085, 0.012, False)
    assert config("animatediff_motion_adapter_v1_5_3.json")["use_motion_mid_block"] is False
    vae = config("wan2.1_t2v_1.3b_vae.json")
    assert len(vae["latents_mean"]) == len(vae["latents_std"]) == vae["z_dim"] == 16
    unipc = wan.unipc_scheduler()
    assert unipc.config.flow_shift == wan.FLOW_SHIFT and unipc.config.use_flow_sigmas
    assert unipc.config.prediction_type == "flow_prediction"
