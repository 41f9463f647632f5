"""Noise and sampling schedules for MIVA's image-to-video inference (paper Algorithm 1, App. B).

Pure torch functions: no module state, and every random function takes a `torch.Generator`.
Video latents are laid out (B, C, F, H, W) like diffusers' `UNetMotionModel`.

- `shared_noise`: LAMP's shared noise, every frame partly correlated with the first.
- `dct_init`: Cinemo's DCTInit, the low spatial frequencies of the noised first frame
  spliced into the shared noise in the 3-D DCT domain.
- `adain`: AdaIN of every frame to the first frame's statistics (B.3.2).
- `mask_dropout_probability`: cosine schedule of the mask dropout (B.1.2).
"""

from __future__ import annotations

import functools
import math

import torch
from einops import repeat


@functools.lru_cache(maxsize=32)
def _dct_matrix(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Orthonormal DCT-II matrix D (n, n): D @ x is the DCT of x, D.T @ X its inverse."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.to(device=device, dtype=dtype)


def dct(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Orthonormal DCT-II along `dim`, equal to `scipy.fft.dct(x, type=2, norm="ortho")`."""
    d = _dct_matrix(x.shape[dim], x.device, x.dtype)
    return (x.movedim(dim, -1) @ d.T).movedim(-1, dim)


def idct(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Inverse of `dct` (orthonormal DCT-III) along `dim`."""
    d = _dct_matrix(x.shape[dim], x.device, x.dtype)
    return (x.movedim(dim, -1) @ d).movedim(-1, dim)


def dct3d(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal DCT-II over the last three dims (F, H, W)."""
    for dim in (-3, -2, -1):
        x = dct(x, dim)
    return x


def idct3d(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `dct3d`."""
    for dim in (-3, -2, -1):
        x = idct(x, dim)
    return x


def spatial_lowpass_mask(
    frames: int, height: int, width: int, cutoff: float = 0.23, device: torch.device | str | None = None
) -> torch.Tensor:
    """Ideal 3-D DCT low-pass L (F, H, W) of DCTInit (Cinemo): keeps every temporal frequency and
    the spatial ones with sqrt((kh/H)^2 + (kw/W)^2) <= cutoff, kh and kw being DCT indices."""
    if not 0 < cutoff <= math.sqrt(2):
        raise ValueError(f"cutoff must be in (0, sqrt(2)], got {cutoff}.")
    kh = torch.arange(height, device=device, dtype=torch.float64)[:, None] / height
    kw = torch.arange(width, device=device, dtype=torch.float64)[None, :] / width
    mask = ((kh**2 + kw**2).sqrt() <= cutoff).float()  # (h, w)
    return repeat(mask, "h w -> f h w", f=frames)


def shared_noise(
    shape: tuple[int, ...] | torch.Size,
    ratio: float = 0.05,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """LAMP's shared noise as in Algorithm 1: draws eps^1..eps^F ~ N(0, I) and returns frame 0 = eps^1,
    frame i >= 1 = ratio * eps^1 + (1 - ratio) * eps^i. Kept literal: the variance of frames i >= 1,
    ratio^2 + (1 - ratio)^2, is NOT renormalised to 1."""
    if len(shape) != 5:
        raise ValueError(f"shape must be (B, C, F, H, W), got {tuple(shape)}.")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}.")
    eps = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)  # (b, c, f, h, w)
    first = eps[:, :, :1]  # (b, c, 1, h, w)
    return torch.cat([first, ratio * first + (1.0 - ratio) * eps[:, :, 1:]], dim=2)


def dct_init(
    first_latent: torch.Tensor,
    noise: torch.Tensor,
    alpha_bar_t: float | None = None,
    cutoff: float = 0.23,
    shared_first_noise: torch.Tensor | None = None,
    levels: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Cinemo's DCTInit as in Algorithm 1 of the MIVA paper.

    first_latent: clean first-frame latent x^I (B, C, H, W); noise: shared noise eps~ (B, C, F, H, W);
    alpha_bar_t: cumulative alpha at the initial timestep (t=975); shared_first_noise: eps^1
    (B, C, H, W), defaults to noise[:, :, 0]. `levels` = (signal, noise) scales of x_t for schedules
    other than DDPM's (flow matching: (1 - sigma, sigma)); alpha_bar_t gives (sqrt(a), sqrt(1 - a)).
    Returns z (B, C, F, H, W) with frame 0 = x^I.
    Since L is constant along time the temporal DCT cancels (this equals a per-frame 2-D filter);
    the 3-D form is kept to follow the paper.
    """
    if first_latent.dim() != 4 or noise.dim() != 5 or noise.shape[:2] + noise.shape[3:] != first_latent.shape:
        raise ValueError(f"expected x^I (B, C, H, W) and noise (B, C, F, H, W), got "
                         f"{tuple(first_latent.shape)} and {tuple(noise.shape)}.")
    if levels is None:
        if alpha_bar_t is None or not 0.0 <= alpha_bar_t <= 1.0:
            raise ValueError(f"alpha_bar_t must be in [0, 1], got {alpha_bar_t}.")
        levels = (math.sqrt(alpha_bar_t), math.sqrt(1.0 - alpha_bar_t))
    signal, noise_level = levels
    f, h, w = noise.shape[2:]
    x_i = first_latent.to(noise.dtype)
    eps1 = noise[:, :, 0] if shared_first_noise is None else shared_first_noise.to(noise.dtype)
    static = repeat(x_i, "b c h w -> b c f h w", f=f)
    x_t = signal * static + noise_level * repeat(eps1, "b c h w -> b c f h w", f=f)
    mask = spatial_lowpass_mask(f, h, w, cutoff, device=noise.device).to(noise.dtype)  # (f, h, w)
    mixed = dct3d(x_t) * mask + dct3d(noise) * (1 - mask)  # (b, c, f, h, w)
    z = idct3d(mixed)
    z[:, :, 0] = x_i
    return z


def adain(latents: torch.Tensor, reference_index: int = 0, eps: float = 1e-5) -> torch.Tensor:
    """AdaIN post-processing (paper B.3.2): each frame's latent, per (batch, channel) over H x W,
    is normalised and rescaled to the reference frame's mean/std; the reference frame is copied."""
    mean = latents.mean(dim=(-2, -1), keepdim=True)  # (b, c, f, 1, 1)
    std = latents.var(dim=(-2, -1), keepdim=True, unbiased=False).sqrt()
    ref_mean, ref_std = mean[:, :, reference_index, None], std[:, :, reference_index, None]  # (b, c, 1, 1, 1)
    # eps only guards flat frames; it is not added to the variance, so the statistics match exactly
    out = (latents - mean) / std.clamp_min(eps) * ref_std + ref_mean
    out[:, :, reference_index] = latents[:, :, reference_index]
    return out


def mask_dropout_probability(step: int, total_steps: int) -> float:
    """Cosine mask-dropout schedule (paper B.1.2): p = 0.5 * (1 + cos(pi * step / total_steps))."""
    if total_steps <= 0 or not 0 <= step <= total_steps:
        raise ValueError(f"need 0 <= step <= total_steps and total_steps > 0, got {step}, {total_steps}.")
    return 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
