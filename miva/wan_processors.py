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

    M-MIVA (§3.4) as on the UNet: the batch is the video, then one mask clip per M-MIVA (the frozen
    transformer is shared); a mask clip meets only its M-MIVA's mask-stream twin, and the video's
    self-attention is biased over all f n tokens jointly (`MivaContext.joint_bias`, eq. 3 / S6 per
    pair of latent frames), its CFA per latent frame (`MivaContext.cross_bias`), at the patch grid.
    """

    check = staticmethod(_check_wan_attention)

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kwargs):
        context = self.context
        active = context.active(self.adapters)
        if not active or encoder_hidden_states is not None:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        num_frames, clip_temb = context.num_frames, context.temb
        if num_frames is None or clip_temb is None:
            raise RuntimeError("MIVA context has no frame count or timestep embedding; call the transformer, not a block.")
        streams = context.streams
        rows = hidden_states.shape[0] // len(streams)  # clips per stream
        plan = [(s, *m) for s, stream in enumerate(streams) for m in self.stream_modules(stream, active)]
        query = attn.to_q(hidden_states)  # (S b, f n, c) for S streams
        key = _wan_heads(attn, attn.to_k(hidden_states), attn.norm_k, rotary_emb)  # (S b, f n, h, d)
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        # the stock and every CFA query normalised and rotated together: one norm and one rotation per layer
        part = [slice(s * rows, (s + 1) * rows) for s in range(len(streams))]
        queries = [query] + [adapter.query(hidden_states[part[s]], query[part[s]]) for s, _, adapter, _ in plan]
        query, *cfa_queries = _wan_heads(attn, torch.cat(queries), attn.norm_q, rotary_emb).split(
            [len(query)] + [rows] * len(plan))
        n = key.shape[1] // num_frames  # tokens per latent frame
        bias = context.joint_bias(n, query.dtype)
        if bias is None:
            out = _wan_attend(attn, self.stock, query, key, value, attention_mask)
        else:  # only the video's self-attention is biased by the subject masks
            mask = bias if attention_mask is None else attention_mask + bias
            out = [_wan_attend(attn, self.stock, query[part[0]], key[part[0]], value[part[0]], mask)]
            if len(streams) > 1:
                rest = slice(rows, None)
                out.append(_wan_attend(attn, self.stock, query[rest], key[rest], value[rest], attention_mask))
            out = torch.cat(out)

        per_frame = "b (f n) h d -> (b f) h n d"
        cfa_key = _cfa_heads(_reference_frames(key.unflatten(1, (num_frames, -1)).flatten(0, 1), num_frames))
        ref_value = _reference_frames(value.unflatten(1, (num_frames, -1)).flatten(0, 1), num_frames)
        pieces = list(out.split(rows))
        for (s, name, adapter, weight), cfa_query in zip(plan, cfa_queries):
            frames = slice(s * rows * num_frames, (s + 1) * rows * num_frames)
            bias = context.cross_bias(name, n, query.dtype) if streams[s] is None else None
            cfa = _cfa(adapter, rearrange(cfa_query, per_frame, f=num_frames), cfa_key[frames], ref_value[part[s]],
                       clip_temb[part[s]], bias)
            cfa = context.weighted(name, weight, cfa, stream=s)  # (b f, n, c): per latent frame
            pieces[s] = pieces[s] + rearrange(cfa, "(b f) n c -> b (f n) c", f=num_frames)
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


class WanImplicitPromptProcessor(ImplicitPromptProcessor):
    """Wan's text cross-attention on the empty prompt plus every active adapter's implicit prompt.

    An M-MIVA's mask stream has its own implicit prompt here too, so that on Wan the mask stream is a
    full copy of the MIVA (the paper's B.4.3: +35.5M, the MIVA's count again); its mask clip meets
    that twin only.
    """

    check = staticmethod(_check_wan_attention)
    mask_stream_twin = True

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kwargs):
        context = self.context
        active = context.active(self.adapters)
        if not active or encoder_hidden_states is None:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query = attn.to_q(hidden_states)  # frozen W_Q, shared by the text attention and the MLPs
        key = _wan_heads(attn, attn.to_k(encoder_hidden_states), attn.norm_k)
        value = attn.to_v(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        out = _wan_attend(attn, self.stock, _wan_heads(attn, query, attn.norm_q), key, value, attention_mask)
        num_frames, streams = context.num_frames, context.streams
        rows = hidden_states.shape[0] // len(streams)
        pieces = list(out.split(rows))
        for s, stream in enumerate(streams):
            for name, adapter, weight in self.stream_modules(stream, active):
                mlp = rearrange(adapter(query[s * rows : (s + 1) * rows]), "b (f n) c -> (b f) n c", f=num_frames)
                pieces[s] = pieces[s] + rearrange(context.weighted(name, weight, mlp, stream=s), "(b f) n c -> b (f n) c",
                                                  f=num_frames)
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]
