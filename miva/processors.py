"""MIVA's attention processors (paper §3.3) and the context they share.

diffusers routes every attention call through a processor; MIVA enters only there. Two processors:

* `CrossFrameAttnProcessor` replaces the processor of each *spatial* self-attention (`attn1`): it
  computes the stock self-attention and adds, per active adapter, a cross-frame attention (CFA)
  from frame i to frame 1 and frame i-1 (eq. 2, mixed over adapters by eq. S4).
* `ImplicitPromptProcessor` replaces the processor of each text cross-attention (`attn2`): it adds,
  per active adapter, the implicit-prompt MLP on the frozen query projection (§3.3.2).

Both hold their adapters' weights as sub-modules (`adapters[name]`), so the parameters appear in
the UNet as `...attn1.processor.adapters.<name>.*`. Per-call state (which adapters, their weights,
regions and subject masks, the frame count and the timestep embedding) cannot travel through
diffusers' call chain, so it lives in one `MivaContext` (`miva.context`) that the processors only read.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .context import MivaContext


class LowRankLinear(nn.Module):
    """x -> up(down(x)): a LoRA "attached to zero" (paper B.4.1), used for low-rank CFA variants."""

    def __init__(self, in_features: int, out_features: int, rank: int, zero_init_up: bool = True):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        if zero_init_up:
            nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class CrossFrameAttention(nn.Module):
    """One adapter's CFA at one spatial self-attention (§3.3.1).

    Trainable: the query projection W_Q (initialised from the self-attention's `to_q`), the output
    projection W_O (zero-initialised, so an untrained adapter adds exactly nothing) and the adaptive
    weighting φ(c_t) = softmax(Linear(SiLU(c_t)) / τ) that gives (λ2, λ3) for frame 1 and frame i-1.
    K and V are the self-attention's own frozen projections, reused rather than recomputed.
    With `rank`, W_Q is the frozen `to_q` plus a rank-r LoRA and W_O a rank-r product (B.4.1).
    """

    def __init__(self, to_q: nn.Linear, out_dim: int, temb_dim: int, rank: int | None, temperature: float):
        super().__init__()
        inner_dim, query_dim = to_q.weight.shape
        factory = {"device": to_q.weight.device, "dtype": to_q.weight.dtype}
        self.rank = rank
        self.temperature = temperature
        if rank is None:
            self.to_q = nn.Linear(query_dim, inner_dim, bias=to_q.bias is not None, **factory)
            with torch.no_grad():
                self.to_q.weight.copy_(to_q.weight)
                if to_q.bias is not None:
                    self.to_q.bias.copy_(to_q.bias)
            self.to_out = nn.Linear(inner_dim, out_dim, **factory)
            with torch.no_grad():
                self.to_out.weight.zero_()
                self.to_out.bias.zero_()
        else:
            self.to_q = LowRankLinear(query_dim, inner_dim, rank).to(**factory)  # added to the frozen to_q
            self.to_out = LowRankLinear(inner_dim, out_dim, rank).to(**factory)
        self.weighting = nn.Linear(temb_dim, 2, **factory)  # φ: zero-init -> λ2 = λ3 = 1/2 at the start
        with torch.no_grad():
            self.weighting.weight.zero_()
            self.weighting.bias.zero_()

    def query(self, hidden_states: torch.Tensor, base_query: torch.Tensor) -> torch.Tensor:
        if self.rank is None:
            return self.to_q(hidden_states)
        return base_query + self.to_q(hidden_states)

    def frame_weights(self, temb: torch.Tensor) -> torch.Tensor:
        """(b, d_t) -> (b, 2): (λ2, λ3), the weights of frame 1 and frame i-1."""
        logits = self.weighting(F.silu(temb.to(self.weighting.weight.dtype)))
        return torch.softmax(logits / self.temperature, dim=-1)


class ImplicitPrompt(nn.Module):
    """One adapter's implicit prompt at one text cross-attention (§3.3.2).

    σ(f W_Q A) B, i.e. a 2-layer MLP after the frozen query projection: Linear(d, r) -> LayerNorm ->
    GELU -> Linear(r, d), the last layer zero-initialised.
    """

    def __init__(self, inner_dim: int, out_dim: int, rank: int, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.down = nn.Linear(inner_dim, rank, bias=False, **factory)
        self.norm = nn.LayerNorm(rank, **factory)
        self.up = nn.Linear(rank, out_dim, bias=False, **factory)
        with torch.no_grad():
            self.up.weight.zero_()

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        return self.up(F.gelu(self.norm(self.down(query))))


def _check_plain_attention(attn) -> None:
    """The MIVA processors implement the plain attention path that SD1.5-class UNets use."""
    unsupported = [
        name
        for name in ("spatial_norm", "group_norm", "norm_q", "norm_k")
        if getattr(attn, name, None) is not None
    ]
    if unsupported or attn.residual_connection or attn.rescale_output_factor != 1.0:
        raise ValueError(
            f"MIVA supports plain attention layers only; this one uses {unsupported or 'a residual/rescale'}, "
            "so use a base with SD1.5-style transformer blocks."
        )


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return rearrange(x, "b n (h d) -> b h n d", h=heads)


def _attend(attn, query, key, value, attention_mask=None, bias=None) -> torch.Tensor:
    """The stock attention from projected (b, h, n, d) heads to the output projection (b, n, c);
    `bias` (b, 1, n, m) is added to the attention logits (M-MIVA's mask bias)."""
    mask = None
    if attention_mask is not None:  # as AttnProcessor2_0 prepares it
        mask = attn.prepare_attention_mask(attention_mask, key.shape[2], query.shape[0])
        mask = mask.view(query.shape[0], attn.heads, -1, mask.shape[-1])
    if bias is not None:
        mask = bias if mask is None else mask + bias
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    return attn.to_out[1](attn.to_out[0](rearrange(out, "b h n d -> b n (h d)")))


@functools.lru_cache(maxsize=64)
def _frame_index(num_frames: int, device: torch.device) -> torch.Tensor:
    """[0, 0, 0, 0, 0, 1, ..., 0, f-2]: for each frame i, frame 1 and frame i-1 (frame 1 is its own predecessor)."""
    return torch.tensor([[0, max(i - 1, 0)] for i in range(num_frames)], device=device).flatten()


def _reference_frames(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(b f, n, h, d) heads -> (b, f, 2, n, h, d): for frame i, the tokens of frame 1, then of frame i-1.

    One gather (a single copy, no per-step index upload): the CFA's keys and values in one buffer.
    """
    x = x.reshape(-1, num_frames, *x.shape[1:])
    out = x.index_select(1, _frame_index(num_frames, x.device))  # (b, 2f, n, h, d)
    return out.view(x.shape[0], num_frames, 2, *x.shape[2:])


def _cfa_heads(ref: torch.Tensor) -> torch.Tensor:
    """(b, f, 2, n, h, d) -> (b f, h, 2n, d): one attention's keys or values over frame 1 and frame i-1."""
    return ref.flatten(2, 3).flatten(0, 1).transpose(1, 2)


class _MivaProcessor(nn.Module):
    """What every MIVA processor holds: the stock processor it replaced, the shared context, its
    adapters' modules by name and the M-MIVAs' mask-stream twins (`mask_adapters`, §3.4). `check`
    refuses attention layers the processor cannot serve."""

    check = staticmethod(_check_plain_attention)

    def __init__(self, attn, stock, context: MivaContext):
        super().__init__()
        self.check(attn)
        self.stock = stock  # the processor we replaced: used as-is when no adapter is active
        self.context = context
        self.adapters = nn.ModuleDict()
        self.mask_adapters = nn.ModuleDict()

    def stream_modules(self, stream: str | None, active: list) -> list[tuple[str, nn.Module, float]]:
        """What acts on one stream of a joint pass: every `active` adapter on the video (None); on an
        M-MIVA's mask clip its mask-stream twin only, and nothing where this layer has no twin."""
        if stream is None:
            return active
        if stream in self.mask_adapters:
            return [(stream, self.mask_adapters[stream], self.context.weights.get(stream, 0.0))]
        return []


def _cfa(adapter, cfa_query, cfa_key, ref_value, clip_temb, bias=None) -> torch.Tensor:
    """One adapter's CFA output (b f, n, c) from its (b f, h, n, d) queries, the (b f, h, 2n, d) keys of
    frame 1 and frame i-1 and their (b, f, 2, n, h, d) values, which φ(c_t) scales by (λ2, λ3) (eq. 2)."""
    lam = adapter.frame_weights(clip_temb).to(ref_value.dtype)  # (b, 2): λ2, λ3
    cfa_value = _cfa_heads(ref_value * lam.view(-1, 1, 2, 1, 1, 1))
    cfa = F.scaled_dot_product_attention(cfa_query, cfa_key, cfa_value, attn_mask=bias)
    return adapter.to_out(rearrange(cfa, "b h n d -> b n (h d)"))


class CrossFrameAttnProcessor(_MivaProcessor):
    """Spatial self-attention plus the CFA of every active adapter (eq. 2 and eq. S4).

    An M-MIVA also has a mask stream (§3.4): its own, independently parameterised CFA
    (`mask_adapters[name]`, initialised identically to the video's) that runs on its mask clip in a
    joint pass, while the video stream's self-attention and CFA are biased by the subject masks.
    """

    def add_adapter(self, name: str, attn, temb_dim: int, rank: int | None, temperature: float,
                    masked: bool = False) -> None:
        out_dim = attn.to_out[0].out_features
        self.adapters[name] = CrossFrameAttention(attn.to_q, out_dim, temb_dim, rank, temperature)
        if masked:
            self.mask_adapters[name] = CrossFrameAttention(attn.to_q, out_dim, temb_dim, rank, temperature)
            self.mask_adapters[name].load_state_dict(self.adapters[name].state_dict())  # identical pair

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        context = self.context
        active = context.active(self.adapters)
        if not active or encoder_hidden_states is not None or hidden_states.ndim != 3:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        num_frames, clip_temb = context.num_frames, context.temb
        if num_frames is None or clip_temb is None:
            raise RuntimeError("MIVA context has no frame count or timestep embedding; call the UNet, not a block.")

        # The stock self-attention, computing K and V once for both it and the CFA.
        query = attn.to_q(hidden_states)  # (S bf, n, c) for S streams
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))  # (S bf, n, h, d)
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        n, streams = key.shape[1], context.streams
        rows = key.shape[0] // len(streams)
        heads = [_split_heads(query, attn.heads), key.transpose(1, 2), value.transpose(1, 2)]  # (S bf, h, n, d)
        self_bias = context.self_bias(n, query.dtype)
        if self_bias is None:
            out = _attend(attn, *heads, attention_mask)
        else:  # only the video stream's self-attention is biased by the subject masks (eq. 3 / S6)
            split = [x.split(rows) for x in heads]
            out = torch.cat([_attend(attn, q, k, v, attention_mask, bias=self_bias if s == 0 else None)
                             for s, (q, k, v) in enumerate(zip(*split))])

        # CFA (eq. 2): one softmax over the 2n tokens of frame 1 and frame i-1; values x (λ2, λ3).
        cfa_key = _cfa_heads(_reference_frames(key, num_frames))  # (S bf, h, 2n, d)
        ref_value = _reference_frames(value, num_frames)  # (S b, f, 2, n, h, d)
        pieces = list(out.split(rows))
        for s, stream in enumerate(streams):
            part = slice(s * rows, (s + 1) * rows)
            clips = slice(s * rows // num_frames, (s + 1) * rows // num_frames)
            for name, adapter, weight in self.stream_modules(stream, active):  # the video's biased by S
                bias = context.cross_bias(name, n, query.dtype) if stream is None else None
                cfa_query = _split_heads(adapter.query(hidden_states[part], query[part]), attn.heads)
                cfa = _cfa(adapter, cfa_query, cfa_key[part], ref_value[clips], clip_temb[clips], bias)
                pieces[s] = pieces[s] + context.weighted(name, weight, cfa, stream=s)
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


class TemporalBiasProcessor(_MivaProcessor):
    """A motion module's temporal self-attention (t-SA) with M-MIVA's mask bias on the video stream
    (eq. 3 between one pixel's frames; S6 with several adapters); the stock processor otherwise.

    It holds no weights: the temporal LoRAs live in PEFT's layers, which `attn.to_q/k/v` already are.
    """

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        context, total = self.context, hidden_states.shape[0]
        bias = None
        if encoder_hidden_states is None and hidden_states.ndim == 3:  # the mask clips' rows follow the video's
            bias = context.temporal_bias(total // len(context.streams), total, hidden_states.dtype)
        if bias is None:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        q, k, v = (_split_heads(f(hidden_states), attn.heads) for f in (attn.to_q, attn.to_k, attn.to_v))
        return _attend(attn, q, k, v, attention_mask, bias=bias)


class ImplicitPromptProcessor(_MivaProcessor):
    """Text cross-attention on the base's empty prompt plus every active adapter's implicit prompt.

    Keeping the base's empty-prompt cross-attention (rather than dropping it) makes an untrained or
    weight-0 adapter reproduce the base exactly; the implicit prompt is learned on top of it.
    On the UNet an M-MIVA's mask clip meets the video's implicit prompt (its mask stream is the CFA's
    twins, §3.4); `mask_stream_twin` processors give it a twin of its own (Wan, see `miva.wan_processors`).
    """

    mask_stream_twin = False

    def add_adapter(self, name: str, attn, rank: int, masked: bool = False) -> None:
        weight = attn.to_q.weight
        out_dim = attn.to_out[0].out_features
        self.adapters[name] = ImplicitPrompt(weight.shape[0], out_dim, rank, device=weight.device, dtype=weight.dtype)
        if masked and self.mask_stream_twin:
            self.mask_adapters[name] = ImplicitPrompt(weight.shape[0], out_dim, rank, device=weight.device, dtype=weight.dtype)
            self.mask_adapters[name].load_state_dict(self.adapters[name].state_dict())  # identical pair

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        active = self.context.active(self.adapters)
        if not active or encoder_hidden_states is None or hidden_states.ndim != 3:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        query = attn.to_q(hidden_states)  # frozen W_Q: shared by the text attention and the MLPs
        context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        key = _split_heads(attn.to_k(context), attn.heads)
        value = _split_heads(attn.to_v(context), attn.heads)
        out = _attend(attn, _split_heads(query, attn.heads), key, value, attention_mask)
        for name, adapter, weight in active:
            out = out + self.context.weighted(name, weight, adapter(query))
        return out
