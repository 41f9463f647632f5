"""SD1.5 + AnimateDiff v3 (`UNetMotionModel`), real and tiny, built by the same code.

The real base loads through `from_pretrained` (safetensors only) from the Hub or a local folder in
the Hub layout; the tiny base builds the same classes from small config dictionaries. The real repos'
configs are kept in `configs/` (see its README): the real model builds on the meta device with no
download, and the tiny base samples with SD1.5's own scheduler config.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging
from diffusers import AutoencoderKL, DDIMScheduler, MotionAdapter, UNet2DConditionModel, UNetMotionModel

from .base import Base, from_safetensors

BASE_ID = "animatediff-v3"
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
MOTION_ADAPTER = "guoyww/animatediff-motion-adapter-v1-5-3"
CONFIGS = Path(__file__).parent / "configs"
# AnimateDiff's sampling schedule on top of SD1.5's scheduler config (as in diffusers' AnimateDiff docs).
SCHEDULER_OVERRIDES = dict(beta_schedule="linear", clip_sample=False, timestep_spacing="linspace", steps_offset=1)


def _config(name: str) -> dict:
    return json.loads((CONFIGS / name).read_text())


@contextlib.contextmanager
def quiet_diffusers():
    """diffusers 0.42 warns about fp32 modules on every `to(dtype)`, even with none to keep."""
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def build_unet(unet_config: dict, adapter_config: dict, device="cpu") -> UNetMotionModel:
    """A randomly initialised UNetMotionModel from a UNet2DConditionModel and MotionAdapter config."""
    with torch.device(device), quiet_diffusers():
        unet2d = UNet2DConditionModel.from_config(unet_config)
        adapter = MotionAdapter.from_config(adapter_config)
        return UNetMotionModel.from_unet2d(unet2d, adapter, load_weights=device != "meta")


def meta_unet() -> UNetMotionModel:
    return build_unet(_config("sd15_unet.json"), _config("animatediff_motion_adapter_v1_5_3.json"), device="meta")


def encode_prompt(tokenizer, text_encoder, prompt: str = "") -> torch.Tensor:
    """(1, tokens, d) CLIP embeddings of `prompt`, as SD1.5 pipelines compute them."""
    ids = tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return text_encoder(ids.to(text_encoder.device))[0]


def _finish(base_id, unet, vae, scheduler, null_prompt_embeds, height, width, device, dtype, description) -> Base:
    for module in (unet, vae):
        module.requires_grad_(False)
        module.eval()
        module.to(device=device)
        if module.dtype != dtype:
            with quiet_diffusers():
                module.to(dtype=dtype)
    return Base(
        id=base_id,
        unet=unet,
        vae=vae,
        scheduler=scheduler,
        null_prompt_embeds=null_prompt_embeds.to(device=device, dtype=dtype),
        height=height,
        width=width,
        description=description,
    )


def load(
    model: str = SD15,
    motion_adapter: str = MOTION_ADAPTER,
    device="cpu",
    dtype=torch.float32,
    base_id: str = BASE_ID,
    height: int = 320,
    width: int = 512,
) -> Base:
    """The real base: SD1.5 components + the AnimateDiff v3 motion adapter, via `from_pretrained`.

    `model` and `motion_adapter` are Hub ids or local folders in the Hub layout. The text encoder is
    used once, for the empty prompt, and then dropped: MIVAs replace the text (§3.3.2).
    """
    from transformers import CLIPTextModel, CLIPTokenizer

    unet2d = from_safetensors(UNet2DConditionModel, model, "unet")
    adapter = from_safetensors(MotionAdapter, motion_adapter)
    with quiet_diffusers():
        unet = UNetMotionModel.from_unet2d(unet2d, adapter)
    del unet2d, adapter
    vae = from_safetensors(AutoencoderKL, model, "vae")
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = from_safetensors(CLIPTextModel, model, "text_encoder")
    null_prompt_embeds = encode_prompt(tokenizer, text_encoder)
    del text_encoder
    scheduler = DDIMScheduler.from_pretrained(model, subfolder="scheduler", **SCHEDULER_OVERRIDES)
    return _finish(
        base_id, unet, vae, scheduler, null_prompt_embeds, height, width, device, dtype,
        f"{model} + {motion_adapter}",
    )


# -- the tiny base ---------------------------------------------------------------------------------
def tiny_configs(channels: tuple[int, int] = (16, 32), cross_attention_dim: int = 16) -> tuple[dict, dict, dict]:
    """UNet2DConditionModel, MotionAdapter and AutoencoderKL configs of the tiny base."""
    unet = dict(
        block_out_channels=list(channels),
        layers_per_block=1,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=8,
        sample_size=8,
        in_channels=4,
        out_channels=4,
    )
    adapter = dict(
        block_out_channels=list(channels),
        motion_layers_per_block=1,
        motion_num_attention_heads=2,
        motion_norm_num_groups=8,
        motion_max_seq_length=32,
        use_motion_mid_block=False,
    )
    vae = dict(
        block_out_channels=[8, 16],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=32,
    )
    return unet, adapter, vae


def tiny_text_model(cross_attention_dim: int = 16, folder: str | Path | None = None):
    """A tiny CLIP tokenizer + text encoder built offline (a 6-token vocabulary written to `folder`)."""
    import tempfile

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder or tempfile.mkdtemp(prefix="miva-tiny-clip-"))
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3, "a": 4, "b": 5}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"), model_max_length=16
    )
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=cross_attention_dim, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16, projection_dim=cross_attention_dim,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    return tokenizer, CLIPTextModel(config).eval()


def tiny_scheduler() -> DDIMScheduler:
    """SD1.5's scheduler config (kept in `configs/`) with AnimateDiff's overrides, as `load` builds it."""
    return DDIMScheduler.from_config(_config("sd15_scheduler.json"), **SCHEDULER_OVERRIDES)


def tiny_components(seed: int = 0):
    """(UNetMotionModel, vae, tokenizer, text encoder) of the tiny base, randomly initialised from `seed`."""
    unet_config, adapter_config, vae_config = tiny_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = build_unet(unet_config, adapter_config)
        vae = AutoencoderKL.from_config(vae_config)
        tokenizer, text_encoder = tiny_text_model(unet_config["cross_attention_dim"])
    return unet, vae, tokenizer, text_encoder


def tiny(device="cpu", dtype=torch.float32, seed: int = 0, height: int = 32, width: int = 32) -> Base:
    """A tiny random base of the real classes: for tests and offline smoke runs (output is noise)."""
    unet, vae, tokenizer, text_encoder = tiny_components(seed)
    null_prompt_embeds = encode_prompt(tokenizer, text_encoder)
    return _finish("tiny", unet, vae, tiny_scheduler(), null_prompt_embeds, height, width, device, dtype, "tiny random")
