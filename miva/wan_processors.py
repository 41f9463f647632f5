"""MIVA's processors on Wan2.1 (`WanTransformer3DModel`): the modules of `miva.processors` behind Wan's
processor signature (`rotary_emb`, RMSNorm across heads, 3-D attention over all latent frames' tokens)."""

from __future__ import annotations

import torch
from einops import rearrange

from .processors import CrossFrameAttnProcessor, ImplicitPromptProcessor, _cfa, _cfa_heads, _reference_frames


def _check_wan_attention(attn) -> None:
    if getattr(attn, "add_k_proj", None) is not None:
        raise ValueError("MIVA on Wan supports the text-to-video models (no image-conditioning projections); "
                         "use Wan2.1-T2V-1.3B, not an image-to-video Wan.")


def _wan_rope(x: torch.Tensor, rotary_emb) -> torch.Tensor:
    """Wan's rotary position embedding on (b, n, h, d) heads (as in diffusers' WanAttnProcessor)."""
    if rotary_emb is None:
        return x
    cos, sin = rotary_emb
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


def _wan_heads(attn, x: torch.Tensor, norm=None, rotary_emb=None) -> torch.Tensor:
    """A (b, n, c) projection -> normalised (across heads, as Wan does), rotated (b, n, h, d) heads."""
    if norm is not None:
        x = norm(x)
    return _wan_rope(x.unflatten(2, (attn.heads, -1)), rotary_emb)


def _wan_attend(attn, processor, query, key, value, attention_mask=None) -> torch.Tensor:
    """Wan's stock attention from (b, n, h, d) heads to the output projection (b, n, c)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                backend=getattr(processor, "_attention_backend", None))
    return attn.to_out[1](attn.to_out[0](out.flatten(2, 3).type_as(query)))


class WanCrossFrameAttnProcessor(CrossFrameAttnProcessor):
    """Wan's full 3-D self-attention plus every active adapter's CFA.

    Wan attends over all tokens of all latent frames at once, so the CFA regroups the tokens per latent
    frame: frame i's queries attend to the (normalised, rotated) keys of latent frame 0 — the exact
    encoding of the first frame in Wan's causal VAE — and of latent frame i-1. K and V are those the
    self-attention has just computed. With `rank` (Wan's default, 128) W_Q is `to_q` plus a rank-r
    update and W_O a rank-r product (paper §4: 23.6M).
    """

    check = staticmethod(_check_wan_attention)

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kwargs):
        active = self.context.active(self.adapters)
        if not active or encoder_hidden_states is not None:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        num_frames, clip_temb = self.context.num_frames, self.context.temb
        if num_frames is None or clip_temb is None:
            raise RuntimeError("MIVA context has no frame count or timestep embedding; call the transformer, not a block.")
        query = attn.to_q(hidden_states)  # (b, f n, c)
        key = _wan_heads(attn, attn.to_k(hidden_states), attn.norm_k, rotary_emb)  # (b, f n, h, d)
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        # the stock and every CFA query normalised and rotated together: one norm and one rotation per layer
        queries = [query] + [adapter.query(hidden_states, query) for _, adapter, _ in active]
        query, *cfa_queries = _wan_heads(attn, torch.cat(queries), attn.norm_q, rotary_emb).chunk(len(queries))
        out = _wan_attend(attn, self.stock, query, key, value, attention_mask)

        per_frame = "b (f n) h d -> (b f) h n d"
        cfa_key = _cfa_heads(_reference_frames(key.unflatten(1, (num_frames, -1)).flatten(0, 1), num_frames))
        ref_value = _reference_frames(value.unflatten(1, (num_frames, -1)).flatten(0, 1), num_frames)
        for (name, adapter, weight), cfa_query in zip(active, cfa_queries):
            cfa = _cfa(adapter, rearrange(cfa_query, per_frame, f=num_frames), cfa_key, ref_value, clip_temb)
            cfa = self.context.weighted(name, weight, cfa)  # (b f, n, c): per latent frame
            out = out + rearrange(cfa, "(b f) n c -> b (f n) c", f=num_frames)
        return out


class WanImplicitPromptProcessor(ImplicitPromptProcessor):
    """Wan's text cross-attention on the empty prompt plus every active adapter's implicit prompt."""

    check = staticmethod(_check_wan_attention)

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kwargs):
        active = self.context.active(self.adapters)
        if not active or encoder_hidden_states is None:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query = attn.to_q(hidden_states)  # frozen W_Q, shared by the text attention and the MLPs
        key = _wan_heads(attn, attn.to_k(encoder_hidden_states), attn.norm_k)
        value = attn.to_v(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        out = _wan_attend(attn, self.stock, _wan_heads(attn, query, attn.norm_q), key, value, attention_mask)
        num_frames = self.context.num_frames
        for name, adapter, weight in active:
            mlp = rearrange(adapter(query), "b (f n) c -> (b f) n c", f=num_frames)
            out = out + rearrange(self.context.weighted(name, weight, mlp), "(b f) n c -> b (f n) c", f=num_frames)
        return out
