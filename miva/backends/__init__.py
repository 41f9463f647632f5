"""Base video models MIVA runs on. A backend builds a `Base`: the components a pipeline needs.

Names: `toy` (the embedded toy base in assets/, offline), `animatediff-v3` (SD1.5 + AnimateDiff v3
motion adapter from the Hub), `wan2.1-1.3b` (Wan2.1-T2V-1.3B, a DiT with a causal video VAE) and
`tiny` / `tiny-wan` (tiny random models of the same classes, for tests and offline smoke runs; their
videos are noise).

`Base` (`miva.backends.base`) is what every backend builds; this module picks the backend, the
device and the dtype.
"""

from __future__ import annotations

import torch

from .base import Base, encode_frames

__all__ = ["BASES", "Base", "default_device", "default_dtype", "encode_frames", "load_base", "meta_unet"]


BASES = ("toy", "animatediff-v3", "wan2.1-1.3b", "tiny", "tiny-wan")


HALF_PRECISION = {"animatediff-v3": torch.float16, "wan2.1-1.3b": torch.bfloat16}  # the real bases' GPU dtypes


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """The dtype a base runs in on `device`: the real bases in half precision on a GPU, fp32 elsewhere."""
    return HALF_PRECISION.get(name, torch.float32) if torch.device(device).type == "cuda" else torch.float32


def load_base(name: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None, **kwargs) -> Base:
    """Build the named base on `device` (None: a GPU if there is one) in `dtype` (None: `default_dtype`)."""
    from . import animatediff, wan

    device = default_device() if device is None else torch.device(device)
    dtype = default_dtype(name, device) if dtype is None else dtype

    if name == "animatediff-v3":
        return animatediff.load(device=device, dtype=dtype, **kwargs)
    if name == wan.BASE_ID:
        return wan.load(device=device, dtype=dtype, **kwargs)
    if name == "tiny":
        return animatediff.tiny(device=device, dtype=dtype, **kwargs)
    if name == wan.TINY_ID:
        return wan.tiny(device=device, dtype=dtype, **kwargs)
    if name == "toy":
        from ..toy.base import load_toy

        return load_toy(device=device, dtype=dtype, **kwargs)
    raise ValueError(f"unknown base '{name}'; choose one of: {', '.join(BASES)}.")


def meta_unet(name: str):
    """The named base's full-size denoiser on the meta device (shapes only: no memory, no download)."""
    from . import animatediff, wan

    if name == "animatediff-v3":
        return animatediff.meta_unet()
    if name == wan.BASE_ID:
        return wan.meta_transformer()
    if name == wan.TINY_ID:
        return wan.build_transformer(wan.tiny_configs()[0], device="meta")
    if name == "tiny":
        return animatediff.build_unet(*animatediff.tiny_configs()[:2], device="meta")
    if name == "toy":
        from ..toy.base import toy_configs

        return animatediff.build_unet(*toy_configs(), device="meta")
    raise ValueError(f"no full-size configuration is kept for base '{name}'; choose one of: {', '.join(BASES)}.")
