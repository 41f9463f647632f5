"""Masks for regional motion: user masks fitted to the frame, the unified mask of a mix (eq. S5),
the mask-aware attention biases (eq. 3 and eq. S6) of each kind of attention, per-layer region
weights, and the mask-step schedule of M-MIVA sampling (B.1.3). All pure functions.

Conventions: a mask is a float tensor in [0, 1] (1 = the region); a mask *sequence* is (F, H, W).
Masks given by a user (an image, or one per frame) are fitted exactly like the first frame (cover
resize + centre crop to the output size), so a mask drawn on the uploaded image lines up with it
whatever its size; then they are averaged down to the latent grid (area interpolation), and each
attention layer reads them at its own token grid (area mean, see `at_tokens`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

from .media import fit_image, open_image

EPS = 1e-6  # ε of eq. 3 / S6: log(ε) is the bias between regions that must not attend


def _mask_image(value, name: str) -> Image.Image:
    """One mask as a greyscale PIL image from a path, a PIL image, or a (H, W[, C]) array (bool, 0-1 or
    0-255). With colour, the region is every non-black pixel; with transparency (a brush stroke on a
    transparent layer), every painted pixel, whatever its colour."""
    if isinstance(value, (str, Path)):
        value = open_image(value, what="mask image")
    if isinstance(value, Image.Image):
        value = np.asarray(value.convert("RGBA") if "A" in value.getbands() or value.mode == "P" else value.convert("RGB"))
    array = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        see_through = array.shape[-1] == 4 and array[..., 3].min() < array[..., 3].max()
        array = array[..., 3] if see_through else array[..., :3].max(axis=-1)
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"the mask for '{name}' has shape {array.shape}; give one (H, W) image per mask.")
    if array.dtype == bool or array.max(initial=0) <= 1:
        array = array.astype(np.float32) * 255
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="L")


def fit_mask(mask, frames: int, height: int, width: int, name: str = "this adapter") -> torch.Tensor:
    """A user mask -> (F, height, width) float in [0, 1].

    `mask` is one mask (used for every frame) or a sequence of `frames` masks: paths, PIL images, or
    arrays (H, W) / (F, H, W). Each is fitted like the first frame (cover resize + centre crop).
    """
    if isinstance(mask, (np.ndarray, torch.Tensor)) and mask.ndim == 3 and mask.shape[-1] not in (3, 4):
        items = list(mask)  # (F, H, W)
    elif isinstance(mask, (list, tuple)):
        items = list(mask)
    else:
        items = [mask]
    if len(items) not in (1, frames):
        raise ValueError(f"the mask for '{name}' has {len(items)} frames; give one mask image or one per frame ({frames}).")
    fitted = []
    for item in items:
        image = fit_image(_mask_image(item, name), width, height)
        fitted.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0))
    out = torch.stack(fitted)
    if out.max() < 0.5:
        raise ValueError(f"the mask for '{name}' is empty; paint the region to animate or remove the mask.")
    return out.expand(frames, -1, -1).clone() if len(fitted) == 1 else out


def to_latent_grid(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(..., H, W) masks -> (..., height, width) by area averaging (the VAE's downsampling)."""
    lead = masks.shape[:-2]
    flat = masks.reshape(-1, 1, *masks.shape[-2:]).float()
    return F.interpolate(flat, size=(height, width), mode="area").reshape(*lead, height, width)


def unify_masks(masks: list[torch.Tensor | None]) -> torch.Tensor:
    """Eq. S5: the unified mask S* of a mix, (F, H, W) long in {0, 1, ..., n}.

    `masks[j - 1]` is adapter j's mask sequence (F, H, W) in [0, 1], or None for an unmasked adapter.
    A pixel belongs to the adapter whose mask is most confident there, if that confidence is above
    0.5, else to the background (0). Ties, i.e. overlapping regions, go to the adapter with the
    *higher* index: adapters are listed bottom to top, so a later one is in front.
    """
    given = [(j, m) for j, m in enumerate(masks, start=1) if m is not None]
    if not given:
        raise ValueError("no masks were given to unify.")
    shape = given[0][1].shape
    stack = torch.zeros((len(masks),) + tuple(shape), device=given[0][1].device)
    for j, m in given:
        if m.shape != shape:
            raise ValueError(f"mask {j} has shape {tuple(m.shape)}, mask {given[0][0]} {tuple(shape)}; masks of one mix must match.")
        stack[j - 1] = m.float()
    best = stack.max(dim=0).values
    # the last index that attains the maximum: flip, argmax (first hit), flip back
    index = len(masks) - stack.flip(0).argmax(dim=0)
    return torch.where(best > 0.5, index, torch.zeros_like(index))


def mask_bias(s_query: torch.Tensor, s_key: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Eq. 3: log(S_p S_q + (1 - S_p)(1 - S_q) + ε) for confidences (..., n) and (..., m) -> (..., n, m)."""
    p, q = s_query[..., :, None], s_key[..., None, :]
    return torch.log(p * q + (1 - p) * (1 - q) + eps)


def unified_bias(region_query: torch.Tensor, region_key: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Eq. S6: log(1(S*_p = S*_q) + ε) for region indices (..., n) and (..., m) -> (..., n, m)."""
    same = (region_query[..., :, None] == region_key[..., None, :]).float()
    return torch.log(same + eps)


def subject_at_tokens(subject: torch.Tensor, tokens: int) -> torch.Tensor:
    """(b, F, H, W) subject confidence -> (b, F, n) at a layer's n tokens (area mean)."""
    return rearrange(at_tokens(subject, tokens), "b f h w -> b f (h w)")


def attention_labels(subjects: list[torch.Tensor | None]):
    """What the base's own attentions are biased by, from each active adapter's subject confidence
    (b, F, n) (None: an unmasked adapter): one M-MIVA alone, its S with eq. 3; several adapters, the
    unified mask S* with eq. S6. Returns (labels, the bias of a pair of label tensors)."""
    if len(subjects) == 1:
        return subjects[0], mask_bias
    return unify_masks(subjects), unified_bias


def self_attention_bias(subjects: list[torch.Tensor | None]) -> torch.Tensor:
    """The video's spatial self-attention bias between the tokens of one frame, (b F, 1, n, n)."""
    labels, bias = attention_labels(subjects)
    return rearrange(bias(labels, labels), "b f n m -> (b f) 1 n m")


def joint_attention_bias(subjects: list[torch.Tensor | None]) -> torch.Tensor:
    """The video's 3-D self-attention bias over all F n tokens of a clip at once (Wan's attention:
    every latent frame's tokens, frame-major), (b, 1, F n, F n): the rule of `self_attention_bias`
    between any two tokens (p, i) and (q, j) (eq. 3 defines M^(i, j) across frames too), so block
    (i, j) is frame i's tokens against frame j's and the diagonal blocks are `self_attention_bias`."""
    labels, bias = attention_labels(subjects)
    labels = rearrange(labels, "b f n -> b (f n)")
    return bias(labels, labels)[:, None]


def temporal_attention_bias(subjects: list[torch.Tensor | None]) -> torch.Tensor:
    """The video's temporal self-attention (t-SA) bias between the frames of one pixel, (b n, 1, F, F):
    the rule of `self_attention_bias`, so a pixel that leaves the subject stops attending to its
    subject frames."""
    labels, bias = attention_labels(subjects)
    labels = rearrange(labels, "b f n -> b n f")
    return rearrange(bias(labels, labels), "b n f g -> (b n) 1 f g")


def cross_frame_bias(subject: torch.Tensor) -> torch.Tensor:
    """Eq. 3 for the CFA: frame i's queries against the keys of frame 1 then frame i-1 (frame 1 is its
    own predecessor), for a (b, F, n) confidence -> (b F, 1, n, 2n)."""
    previous = torch.cat([subject[:, :1], subject[:, :-1]], dim=1)
    keys = torch.cat([subject[:, :1].expand_as(subject), previous], dim=-1)  # (b, F, 2n)
    return rearrange(mask_bias(subject, keys), "b f n m -> (b f) 1 n m")


def latent_frame_union(masks: torch.Tensor, factor: int) -> torch.Tensor:
    """(..., F, H, W) per-frame subject masks -> (..., (F - 1) / factor + 1, H, W) for a causal video VAE
    that encodes frame 0 alone and each later group of `factor` frames as one latent frame (Wan: 4).

    A latent frame's mask is the union (the maximum) of its frames' masks: a latent token holds the
    subject if any of the frames it encodes does, so the background of a latent frame is background in
    all of them (the mean would call a token the subject passes through half background)."""
    frames = masks.shape[-3]
    if (frames - 1) % factor:
        raise ValueError(f"{frames} mask frames do not group into latent frames of {factor}; give {factor}k+1 frames.")
    rest = masks[..., 1:, :, :].unflatten(-3, (-1, factor)).amax(dim=-3)
    return torch.cat([masks[..., :1, :, :], rest], dim=-3)


def token_grid(height: int, width: int, tokens: int) -> tuple[int, int]:
    """The (h, w) token grid of an attention layer holding `tokens` tokens of a height x width latent."""
    scale = math.sqrt(height * width / tokens)
    h, w = round(height / scale), round(width / scale)
    if h * w != tokens:  # a UNet with padding at odd sizes: search the factorisation nearest the aspect
        candidates = [(a, tokens // a) for a in range(1, tokens + 1) if tokens % a == 0]
        h, w = min(candidates, key=lambda hw: abs(hw[0] / hw[1] - height / width))
    return h, w


def at_tokens(region: torch.Tensor, tokens: int, pool: str = "area") -> torch.Tensor:
    """(b, F, H, W) region weights -> (b, F, h, w) at a layer's token grid.

    B.1.1 resizes masks bilinearly; for the UNet's exact 2^k downsampling we take the area mean,
    which equals bilinear at 2x and, unlike it, does not skip pixels at 4x and 8x. `pool="min"`
    takes each token's smallest weight instead: a token is in the region only if all of it is.
    """
    b, f, height, width = region.shape
    h, w = token_grid(height, width, tokens)
    if (h, w) == (height, width):
        return region
    flat = region.reshape(b * f, 1, height, width)
    if pool == "min":
        resized = -F.adaptive_max_pool2d(-flat, (h, w))
    else:
        resized = F.interpolate(flat, size=(h, w), mode="area")
    return resized.reshape(b, f, h, w)


def spatial_token_weights(region: torch.Tensor, tokens: int, pool: str = "area") -> torch.Tensor:
    """Region weights for a spatial attention's (b F, n, c) tokens: (b F, n, 1)."""
    return rearrange(at_tokens(region, tokens, pool), "b f h w -> (b f) (h w) 1")


def temporal_token_weights(region: torch.Tensor, rows: int, pool: str = "area") -> torch.Tensor:
    """Region weights for a motion module's (b h w, F, c) tokens: (b h w, F, 1)."""
    b = region.shape[0]
    return rearrange(at_tokens(region, rows // b, pool), "b f h w -> (b h w) f 1")


def subject_paths(subjects: list[torch.Tensor], radius: int = 2) -> list[torch.Tensor]:
    """Where each M-MIVA's subject is or was, (F, H, W) each: frame i's mask with frame 0's (the
    subject's place now and the place it leaves), grown by `radius` px."""
    out = []
    for s in subjects:
        path = torch.maximum(s.float(), s[:1].float().expand_as(s))
        out.append(F.max_pool2d(path[:, None], 2 * radius + 1, stride=1, padding=radius)[:, 0])
    return out


def exclusive_regions(subjects: list[torch.Tensor], radius: int = 2) -> list[torch.Tensor]:
    """Mixing M-MIVAs: where each one acts, (F, H, W) each: everywhere but the other subjects' paths.

    Each M-MIVA learned to hold everything but its subject still, so in a mix it would hold the other
    subjects still too and one M-MIVA wins the frame; kept out of the others' paths, it moves its own
    subject and holds the background, and leaves each other subject to that subject's M-MIVA.
    """
    paths = subject_paths(subjects, radius)
    return [1 - torch.stack([p for k, p in enumerate(paths) if k != j]).amax(0) for j in range(len(paths))]


def mask_steps(num_inference_steps: int, every: int = 5, until: float = 0.7) -> list[int]:
    """The sampling steps at which M-MIVA regenerates masks (B.1.3), the rest reuse the cache.

    The paper's 50-step setting, {0, 5, ..., 35}, scaled to other step counts: every
    `every`/50 of the steps, up to `until` of them (35/50 = 0.7), always including step 0.
    """
    if num_inference_steps < 1:
        raise ValueError("num_inference_steps must be at least 1.")
    stride = max(1, round(num_inference_steps * every / 50))
    last = math.floor(num_inference_steps * until + 1e-9)
    return list(range(0, max(last, 0) + 1, stride))
