"""Shared fixtures: tiny bases of the real classes, built in code (diffusers' get_dummy_components style),
and the same tiny components saved in the real Hub repos' folder layouts."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from miva.backends import load_base
from miva.pipeline import MivaPipeline


@pytest.fixture
def tiny_base():
    return load_base("tiny")


@pytest.fixture
def pipe(tiny_base):
    return MivaPipeline(tiny_base)


@pytest.fixture
def wan_base():
    return load_base("tiny-wan")


@pytest.fixture
def wan_pipe(wan_base):
    return MivaPipeline(wan_base)


@pytest.fixture
def first_frame():
    rng = np.random.default_rng(0)
    return (rng.random((32, 32, 3)) * 255).astype(np.uint8)


def unet_inputs(base, frames=4, seed=0, timestep=500):
    """(sample, timestep, encoder_hidden_states) for one clip of `frames` latent frames."""
    g = torch.Generator().manual_seed(seed)
    c = base.unet.config.in_channels
    size = base.height // base.vae_scale_factor
    sample = torch.randn(1, c, frames, size, size, generator=g)
    return sample, torch.tensor(timestep), base.null_prompt_embeds.expand(frames, -1, -1)


def randomize(params, seed=1, scale=0.05):
    """Give an adapter non-zero weights, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=g) * scale)


CONFIGS = Path(__file__).parents[1] / "miva" / "backends" / "configs"
PICKLED_NAMES = {"diffusion_pytorch_model.safetensors": "diffusion_pytorch_model.bin", "model.safetensors": "pytorch_model.bin"}


def save_folder(module, folder, pickled=False):
    """`module.save_pretrained(folder)`; with `pickled`, its weights are left only as a pickled .bin."""
    module.save_pretrained(folder)
    if pickled:
        for weights in Path(folder).glob("*.safetensors"):
            torch.save(load_file(weights), weights.with_name(PICKLED_NAMES[weights.name]))
            weights.unlink()
    return Path(folder)


def save_scheduler_config(name, folder):
    """A kept scheduler config (miva/backends/configs/`name`) as a repo's scheduler/scheduler_config.json."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    shutil.copy(CONFIGS / name, Path(folder) / "scheduler_config.json")


def save_sd15_layout(root, seed=0, pickled=()):
    """Tiny random components in the layout of stable-diffusion-v1-5 (unet/ vae/ text_encoder/ tokenizer/
    scheduler/, the real scheduler config) and of the motion-adapter repo; `pickled` names the folders
    ("unet", "vae", "text_encoder", "motion-adapter") whose weights are left only as a .bin."""
    from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel
    from miva.backends import animatediff

    unet_config, adapter_config, vae_config = animatediff.tiny_configs()
    sd, motion = Path(root) / "sd15", Path(root) / "motion-adapter"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        save_folder(UNet2DConditionModel.from_config(unet_config), sd / "unet", "unet" in pickled)
        save_folder(AutoencoderKL.from_config(vae_config), sd / "vae", "vae" in pickled)
        tokenizer, text_encoder = animatediff.tiny_text_model(unet_config["cross_attention_dim"], Path(root) / "vocab")
        save_folder(text_encoder, sd / "text_encoder", "text_encoder" in pickled)
        save_folder(MotionAdapter.from_config(adapter_config), motion, "motion-adapter" in pickled)
    tokenizer.save_pretrained(sd / "tokenizer")
    save_scheduler_config("sd15_scheduler.json", sd / "scheduler")
    return sd, motion


def save_wan_layout(root, seed=0, pickled=()):
    """The tiny Wan (`wan.tiny_components(seed)`) in Wan-AI/Wan2.1-T2V-1.3B-Diffusers' layout (transformer/
    vae/ text_encoder/ tokenizer/ scheduler/, the real scheduler config); `pickled` as in `save_sd15_layout`."""
    from miva.backends import wan

    transformer, vae, tokenizer, text_encoder = wan.tiny_components(seed)
    root = Path(root)
    for name, module in (("transformer", transformer), ("vae", vae), ("text_encoder", text_encoder)):
        save_folder(module, root / name, name in pickled)
    tokenizer.save_pretrained(root / "tokenizer")
    save_scheduler_config("wan2.1_t2v_1.3b_scheduler.json", root / "scheduler")
    return root
