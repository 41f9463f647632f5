"""The CFA processor against a direct, loop-over-frames reading of eq. 2 (§3.3.1)."""

import torch
import torch.nn.functional as F

from miva.adapter import attach
from miva.config import MivaConfig
from miva.processors import CrossFrameAttnProcessor

from conftest import randomize


def reference_cfa(attn, adapter, hidden, frames, temb):
    """Frame i attends, in one softmax, to frame 1 (values x λ2) and frame i-1 (values x λ3)."""
    heads = attn.heads
    key, value = attn.to_k(hidden), attn.to_v(hidden)
    lam = torch.softmax(adapter.weighting(F.silu(temb)) / adapter.temperature, dim=-1)[0]
    query = adapter.to_q(hidden)
    outs = []
    for i in range(frames):
        j = max(i - 1, 0)
        k = torch.cat([key[0], key[j]])  # (2n, c)
        v = torch.cat([lam[0] * value[0], lam[1] * value[j]])
        q = query[i]
        split = lambda x: x.view(x.shape[0], heads, -1).transpose(0, 1)  # (h, n, d)
        scores = split(q) @ split(k).transpose(1, 2) / split(q).shape[-1] ** 0.5
        o = torch.softmax(scores, -1) @ split(v)
        outs.append(adapter.to_out(o.transpose(0, 1).reshape(q.shape[0], -1)))
    return torch.stack(outs)


def test_cfa_matches_the_equation(tiny_base):
    manager = attach(tiny_base.unet, MivaConfig(base="tiny", implicit_prompt_rank=0, temporal_lora_rank=0), "a")
    randomize(manager.parameters("a"), scale=0.2)
    name = next(n for n, p in manager._processors.items() if isinstance(p, CrossFrameAttnProcessor))
    attn = tiny_base.unet.get_submodule(name)
    adapter = attn.processor.adapters["a"]
    frames, tokens = 5, 12
    hidden = torch.randn(frames, tokens, attn.to_q.in_features)
    temb = torch.randn(1, adapter.weighting.in_features)
    manager.context._record_pass(num_frames=frames, temb=temb)  # what the UNet's hooks record
    with torch.no_grad():
        with_cfa = attn(hidden)
        with manager.call(weights={"a": 0.0}):
            plain = attn(hidden)
        expected = reference_cfa(attn, adapter, hidden, frames, temb)
    assert torch.allclose(with_cfa - plain, expected, atol=1e-5)


def test_adaptive_weights_follow_the_timestep(tiny_base):
    manager = attach(tiny_base.unet, MivaConfig(base="tiny"), "a")
    adapter = next(p for p in manager._processors.values() if isinstance(p, CrossFrameAttnProcessor)).adapters["a"]
    temb = torch.randn(3, adapter.weighting.in_features)
    lam = adapter.frame_weights(temb)
    assert torch.allclose(lam, torch.full_like(lam, 0.5))  # zero-init φ: equal weights
    randomize({"w": adapter.weighting.weight}, scale=0.5)
    lam = adapter.frame_weights(temb)
    assert torch.allclose(lam.sum(-1), torch.ones(3)) and not torch.allclose(lam[0], lam[1])


def test_low_rank_cfa_variant_starts_as_identity(tiny_base):
    sample = torch.randn(1, 4, 3, 16, 16)
    embeds = tiny_base.null_prompt_embeds.expand(3, -1, -1)
    with torch.no_grad():
        stock = tiny_base.unet(sample, 10, encoder_hidden_states=embeds).sample
        manager = attach(tiny_base.unet, MivaConfig(base="tiny", cfa_rank=4), "a")
        assert torch.allclose(tiny_base.unet(sample, 10, encoder_hidden_states=embeds).sample, stock, atol=1e-5)
    counts = manager.parameter_report("a")
    dims = [tiny_base.unet.get_submodule(n).to_q.in_features for n, p in manager._processors.items()
            if isinstance(p, CrossFrameAttnProcessor)]
    assert counts["cross_frame_attention"] == sum(4 * 4 * d + 2 * 64 + 2 for d in dims)
