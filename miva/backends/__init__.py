"""Base video models MIVA runs on. A backend builds a `Base`: the components a pipeline needs.

Names: `animatediff-v3` (SD1.5 + AnimateDiff v3 motion adapter from the Hub) and `tiny` (a tiny
random model of the same classes, for tests and offline smoke runs; its videos are noise).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Base:
    """A loaded base video model. `id` is what adapters record and are checked against."""

    id: str
    unet: torch.nn.Module  # UNetMotionModel, frozen
    vae: torch.nn.Module  # AutoencoderKL-like: encode(x).latent_dist, decode(z).sample
    scheduler: object  # a diffusers scheduler (DDIM by default)
    null_prompt_embeds: torch.Tensor  # (1, tokens, d): the empty prompt; MIVAs replace text (§3.3.2)
    height: int  # default frame size in pixels
    width: int
    frames: int = 16
    description: str = ""
    extras: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


BASES = ("animatediff-v3", "tiny")


def load_base(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **kwargs) -> Base:
    """Build the named base on `device`."""
    from . import animatediff

    if name == "animatediff-v3":
        return animatediff.load(device=device, dtype=dtype, **kwargs)
    if name == "tiny":
        return animatediff.tiny(device=device, dtype=dtype, **kwargs)
    raise ValueError(f"unknown base '{name}'; choose one of: {', '.join(BASES)}.")


def meta_unet(name: str):
    """The named base's full-size UNet on the meta device (shapes only: no memory, no download)."""
    from . import animatediff

    if name == "animatediff-v3":
        return animatediff.meta_unet()
    if name == "tiny":
        return animatediff.build_unet(*animatediff.tiny_configs()[:2], device="meta")
    raise ValueError(f"no full-size configuration is kept for base '{name}'; choose one of: {', '.join(BASES)}.")
