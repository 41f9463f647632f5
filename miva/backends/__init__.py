"""Base video models MIVA runs on. A backend builds a `Base`: the components a pipeline needs.

Names: `toy` (the embedded toy base in assets/, offline), `animatediff-v3` (SD1.5 + AnimateDiff v3
motion adapter from the Hub) and `tiny` (a tiny random model of the same classes, for tests and
offline smoke runs; its videos are noise).
"""

from __future__ import annotations

from dataclasses import dataclass

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
    vae_scale_factor: int = 0  # pixels per latent pixel; 0: derived from an AutoencoderKL config
    concat_first_frame: bool = False  # the UNet also takes the clean first-frame latent as input channels
    residual_to_first_frame: bool = False  # x0-predicting UNet outputs the offset from the first frame

    def __post_init__(self) -> None:
        if not self.vae_scale_factor:
            self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if self.residual_to_first_frame and self.scheduler.config.prediction_type != "sample":
            raise ValueError("residual_to_first_frame needs a scheduler with prediction_type='sample'.")

    def model_input(self, latents: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """The UNet's input for (b, c, f, h, w) latents and the (b, c, h, w) clean first-frame latent."""
        if not self.concat_first_frame:
            return latents
        return torch.cat([latents, first[:, :, None].expand_as(latents)], dim=1)

    def model_output(self, prediction: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """The scheduler's prediction from the UNet's output (identity unless residual_to_first_frame)."""
        return prediction + first[:, :, None] if self.residual_to_first_frame else prediction

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype


BASES = ("toy", "animatediff-v3", "tiny")


def load_base(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **kwargs) -> Base:
    """Build the named base on `device`."""
    from . import animatediff

    if name == "animatediff-v3":
        return animatediff.load(device=device, dtype=dtype, **kwargs)
    if name == "tiny":
        return animatediff.tiny(device=device, dtype=dtype, **kwargs)
    if name == "toy":
        from ..toy.base import load_toy

        return load_toy(device=device, dtype=dtype, **kwargs)
    raise ValueError(f"unknown base '{name}'; choose one of: {', '.join(BASES)}.")


def meta_unet(name: str):
    """The named base's full-size UNet on the meta device (shapes only: no memory, no download)."""
    from . import animatediff

    if name == "animatediff-v3":
        return animatediff.meta_unet()
    if name == "tiny":
        return animatediff.build_unet(*animatediff.tiny_configs()[:2], device="meta")
    if name == "toy":
        from ..toy.base import toy_configs

        return animatediff.build_unet(*toy_configs(), device="meta")
    raise ValueError(f"no full-size configuration is kept for base '{name}'; choose one of: {', '.join(BASES)}.")
