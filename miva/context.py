"""`MivaContext`: the per-call state that MIVA's processors share (which adapters at which weights,
their regions, M-MIVA mask streams and subject masks, and the current pass's frame count and c_t).

diffusers drops unknown `cross_attention_kwargs` and forwards nothing to motion modules or Wan
blocks, so this state cannot travel down the call chain. It lives here, one object per denoiser. It
is written only by its `MivaAdapters` (`miva.adapter`): the per-call state through
`MivaAdapters.call()`, the frame count and timestep embedding by its two forward hooks. The
processors only read it. What it derives for a layer (region weights and attention biases at that
layer's token grid, built by the pure functions of `miva.masks`) is cached until the regions or the
subject masks change.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import nn

from . import masks


@dataclass
class CallState:
    """What one call sets: the state of the passes the pipeline or the trainer runs."""

    weights: dict[str, float] = field(default_factory=dict)  # adapter -> weight (eq. S4); 0 = off
    regions: dict[str, torch.Tensor] = field(default_factory=dict)  # adapter -> (b, F, H, W) where it acts
    exclusive: frozenset = frozenset()  # adapters whose regions reach a layer's tokens by min-pooling
    # M-MIVA (§3.4): the batch is [video; mask clip of streams[1]; mask clip of streams[2]; ...] in a
    # joint pass, and subjects[j] is M-MIVA j's subject confidence S^(j), (b, F, H, W) at the latent grid.
    streams: tuple[str | None, ...] = (None,)
    subjects: dict[str, torch.Tensor] = field(default_factory=dict)


_DERIVED_FROM = ("regions", "exclusive", "subjects")  # what the cached per-layer tensors depend on


class MivaContext:
    """Per-call state shared by all MIVA processors of one denoiser (read-only for them)."""

    def __init__(self):
        self.state = CallState()
        self.num_frames: int | None = None  # (latent) frames per clip of the current forward pass
        self.temb: torch.Tensor | None = None  # (b, d_t) timestep embedding c_t of the current pass
        self._cache: dict = {}  # (what, ..., tokens) -> a tensor derived for one layer

    # -- written by MivaAdapters only ------------------------------------------------------------
    def _set(self, **changes) -> None:
        if any(getattr(self.state, k) is not v for k, v in changes.items() if k in _DERIVED_FROM):
            self._cache = {}
        for key, value in changes.items():
            setattr(self.state, key, value)

    def _snapshot(self) -> dict:
        return {f.name: getattr(self.state, f.name) for f in fields(CallState)}

    def _record_pass(self, num_frames: int | None = None, temb: torch.Tensor | None = None) -> None:
        if num_frames is not None:
            self.num_frames = num_frames
        if temb is not None:
            self.temb = temb

    # -- read by the processors ------------------------------------------------------------------
    @property
    def weights(self) -> dict[str, float]:
        return self.state.weights

    @property
    def streams(self) -> tuple[str | None, ...]:
        return self.state.streams

    @property
    def regions(self) -> dict[str, torch.Tensor]:
        return self.state.regions

    @property
    def exclusive(self) -> frozenset:
        return self.state.exclusive

    @property
    def subjects(self) -> dict[str, torch.Tensor]:
        return self.state.subjects

    def active(self, adapters: nn.ModuleDict) -> list[tuple[str, nn.Module, float]]:
        return [(name, adapters[name], w) for name, w in self.weights.items() if w != 0 and name in adapters]

    def _cached(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def region(self, name: str, tokens: int, temporal: bool = False) -> torch.Tensor | None:
        """Adapter `name`'s region weights for a layer's tokens, or None where it acts everywhere:
        (b F, n, 1) for a spatial attention of n tokens, (b h w, F, 1) for a motion module of n rows."""
        region = self.regions.get(name)
        if region is None:
            return None
        resize = masks.temporal_token_weights if temporal else masks.spatial_token_weights
        pool = "min" if name in self.exclusive else "area"
        return self._cached(("region", name, temporal, tokens), lambda: resize(region, tokens, pool))

    def weighted(self, name: str, weight: float, out: torch.Tensor, temporal: bool = False,
                 stream: int | None = None) -> torch.Tensor:
        """An adapter's output scaled by its weight and, on the video, by its region if it has one.

        `out` covers every stream of the pass (batch-major: video, then mask clips), or only stream
        `stream`. An adapter acts on the video and on its own mask clip only, never on another
        M-MIVA's (as in training, where a mask clip meets only its own adapter)."""
        streams = self.streams if stream is None else (self.streams[stream],)
        if self.regions.get(name) is None:  # one scale per stream: a multiply, not split + cat
            if all(kind is None or kind == name for kind in streams):
                return out if weight == 1 else weight * out
            rows = out.shape[0] // len(streams)
            scale = self._cached(("scale", name, weight, streams, rows, out.dtype, out.device), lambda: torch.tensor(
                [weight if kind is None or kind == name else 0.0 for kind in streams], dtype=out.dtype,
                device=out.device).repeat_interleave(rows).view(-1, *[1] * (out.ndim - 1)))
            return out * scale
        pieces = [out] if streams == (None,) else list(out.split(out.shape[0] // len(streams)))
        for s, (kind, piece) in enumerate(zip(streams, pieces)):
            if kind is not None:  # a mask clip
                pieces[s] = weight * piece if kind == name else torch.zeros_like(piece)
                continue
            region = self.region(name, piece.shape[0] if temporal else piece.shape[1], temporal)
            pieces[s] = weight * piece if region is None else piece * (weight * region).to(piece.dtype)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    # -- M-MIVA attention biases (eq. 3, eq. S6), built by `miva.masks` ----------------------------
    def _active_names(self) -> tuple[str, ...]:
        return tuple(name for name, w in self.weights.items() if w != 0)

    def _subjects_at(self, tokens: int) -> list[torch.Tensor | None] | None:
        """Each active adapter's subject confidence at a layer's tokens, (b, F, n), None for an unmasked
        one; None when no active adapter is an M-MIVA with a subject (nothing is biased then)."""
        names = self._active_names()
        if not any(name in self.subjects for name in names):
            return None
        return self._cached(("subjects", names, tokens), lambda: [
            masks.subject_at_tokens(self.subjects[name], tokens) if name in self.subjects else None for name in names])

    def self_bias(self, tokens: int, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """The video stream's spatial self-attention bias, (b F, 1, n, n), or None without M-MIVAs."""
        subjects = self._subjects_at(tokens)
        if subjects is None:
            return None
        return self._cached(("self_bias", self._active_names(), tokens, dtype),
                            lambda: masks.self_attention_bias(subjects).to(dtype))

    def joint_bias(self, tokens: int, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """The video stream's 3-D self-attention bias over all latent frames' tokens (Wan), (b, 1, F n, F n)
        for `tokens` n per frame (`masks.joint_attention_bias`), or None without M-MIVAs."""
        subjects = self._subjects_at(tokens)
        if subjects is None:
            return None
        return self._cached(("joint_bias", self._active_names(), tokens, dtype),
                            lambda: masks.joint_attention_bias(subjects).to(dtype))

    def temporal_bias(self, rows: int, total: int, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """The temporal self-attention (t-SA) bias of a motion module's `total` rows, of which the first
        `rows` are the video's (biased, `masks.temporal_attention_bias`) and the rest the mask clips'
        (unbiased), (total, 1, F, F); None without M-MIVAs."""
        if not self.subjects:
            return None
        subjects = self._subjects_at(rows // next(iter(self.subjects.values())).shape[0])
        if subjects is None:
            return None

        def make():
            bias = masks.temporal_attention_bias(subjects).to(dtype)
            return bias if total == rows else torch.cat([bias, bias.new_zeros((total - rows,) + bias.shape[1:])])
        return self._cached(("temporal_bias", self._active_names(), rows, total, dtype), make)

    def cross_bias(self, name: str, tokens: int, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """Adapter `name`'s CFA bias over frame 1 and frame i-1, (b F, 1, n, 2n): eq. 3 on its own
        subject mask; an unmasked adapter mixed with M-MIVAs uses the background 1(S* = 0) (B.2.1)."""
        subjects = self._subjects_at(tokens)
        if subjects is None:
            return None

        def make():
            if name in self.subjects:
                subject = subjects[self._active_names().index(name)]
            else:
                subject = (masks.unify_masks(subjects) == 0).float()
            return masks.cross_frame_bias(subject).to(dtype)
        return self._cached(("cross_bias", self._active_names(), name, tokens, dtype), make)

