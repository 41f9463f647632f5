"""Regional motion: fitting user masks, the unified mask (eq. S5), attention biases (eq. 3, S6),
adapters confined to regions in every component, and the mask-step schedule."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from miva import masks
from miva.adapter import attach
from miva.config import MivaConfig

from conftest import randomize, unet_inputs


def forward(base, frames=4):
    sample, t, embeds = unet_inputs(base, frames)
    with torch.no_grad():
        return base.unet(sample, t, encoder_hidden_states=embeds).sample


def left_half(h=32, w=32):
    m = np.zeros((h, w), np.uint8)
    m[:, : w // 2] = 255
    return m


def test_a_mask_is_fitted_like_the_first_frame():
    # a 64-wide, 32-high mask fitted to 32x32 as the image is: its centre columns 16..48 are kept
    m = np.zeros((32, 64), np.uint8)
    m[:, 16:32] = 255
    fitted = masks.fit_mask(m, frames=3, height=32, width=32)
    assert fitted.shape == (3, 32, 32)
    assert fitted[:, :, 1:15].min() > 0.95 and fitted[:, :, 17:].max() < 0.05


def test_a_brush_layer_uses_its_alpha_and_a_path_works(tmp_path):
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[4:12, 4:12] = (255, 0, 0, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "brush.png")
    for value in (rgba, tmp_path / "brush.png", Image.open(tmp_path / "brush.png")):
        fitted = masks.fit_mask(value, frames=2, height=32, width=32)
        assert fitted[0, 8, 8] == 1 and fitted[0, 20, 20] == 0


def test_mask_sequences_need_one_mask_or_one_per_frame():
    seq = np.stack([left_half()] * 4)
    assert masks.fit_mask(seq, frames=4, height=32, width=32).shape == (4, 32, 32)
    with pytest.raises(ValueError, match=r"has 3 frames; give one mask image or one per frame \(4\)"):
        masks.fit_mask(seq[:3], frames=4, height=32, width=32, name="wave")


def test_an_empty_mask_is_refused_in_one_sentence():
    with pytest.raises(ValueError, match="the mask for 'wave' is empty; paint the region"):
        masks.fit_mask(np.zeros((32, 32), np.uint8), frames=2, height=32, width=32, name="wave")


def test_unify_gives_overlaps_to_the_later_adapter():
    a = torch.zeros(1, 4, 4)
    a[:, :, :3] = 1
    b = torch.zeros(1, 4, 4)
    b[:, :, 2:] = 1
    unified = masks.unify_masks([a, b])
    assert unified[0, 0].tolist() == [1, 1, 2, 2]  # column 2 is in both: adapter 2 (later) wins
    assert masks.unify_masks([b, a])[0, 0].tolist() == [2, 2, 2, 1]  # now "a" is later: it wins column 2


def test_unify_takes_the_most_confident_above_one_half():
    a = torch.tensor([[[0.9, 0.6, 0.4]]])
    b = torch.tensor([[[0.7, 0.8, 0.45]]])
    assert masks.unify_masks([a, b])[0, 0].tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match="must match"):
        masks.unify_masks([a, torch.zeros(1, 2, 2)])


def test_attention_biases():
    s = torch.tensor([1.0, 0.0, 0.5])
    bias = masks.mask_bias(s, s)
    assert bias[0, 0] == pytest.approx(math.log(1 + masks.EPS), abs=1e-6) and bias[0, 1] == pytest.approx(math.log(masks.EPS), abs=1e-4)
    assert bias[2, 2] == pytest.approx(math.log(0.5 + masks.EPS), abs=1e-6)
    regions = torch.tensor([0, 1, 1, 2])
    unified = masks.unified_bias(regions, regions)
    assert unified[1, 2] == pytest.approx(math.log(1 + masks.EPS), abs=1e-6) and unified[0, 3] == pytest.approx(math.log(masks.EPS), abs=1e-4)


def test_the_joint_bias_of_3d_attention_is_eq3_between_every_pair_of_tokens():
    """Wan attends over all f n tokens at once: the bias between token p of frame i and token q of
    frame j is eq. 3 on S^i_p, S^j_q (one M-MIVA), or eq. S6 on the unified S* (a mix), built here
    token by token."""
    g = torch.Generator().manual_seed(0)
    s = torch.rand(2, 3, 4, generator=g)  # (b, F, n)
    bias = masks.joint_attention_bias([s])
    assert bias.shape == (2, 1, 12, 12)
    for b in range(2):
        for i in range(3):
            for p in range(4):
                for j in range(3):
                    for q in range(4):
                        a, c = float(s[b, i, p]), float(s[b, j, q])
                        want = math.log(a * c + (1 - a) * (1 - c) + masks.EPS)
                        assert float(bias[b, 0, i * 4 + p, j * 4 + q]) == pytest.approx(want, abs=1e-5)
    diagonal = torch.stack([bias[:, 0, 4 * i : 4 * i + 4, 4 * i : 4 * i + 4] for i in range(3)], 1).flatten(0, 1)
    assert torch.allclose(diagonal, masks.self_attention_bias([s])[:, 0])  # the per-frame blocks
    other = (torch.rand(2, 3, 4, generator=g) > 0.5).float()
    mixed = masks.joint_attention_bias([s, None, other])
    labels = masks.unify_masks([s, None, other])
    for b in range(2):
        for k in range(12):
            for m in range(12):
                same = labels[b, k // 4, k % 4] == labels[b, m // 4, m % 4]
                assert float(mixed[b, 0, k, m]) == pytest.approx(math.log(float(same) + masks.EPS), abs=1e-5)


def test_a_latent_frame_mask_is_the_union_of_its_frames():
    frames = torch.zeros(2, 9, 2, 2)
    frames[:, 0, 0, 0] = 1
    frames[:, 3, 0, 1] = 0.25
    frames[:, 4, 0, 1] = 0.75
    frames[:, 5, 1, 1] = 1
    union = masks.latent_frame_union(frames, 4)
    assert union.shape == (2, 3, 2, 2) and torch.equal(union[:, 0], frames[:, 0])
    assert union[0, 1].tolist() == [[0, 0.75], [0, 0]] and union[0, 2].tolist() == [[0, 0], [0, 1]]
    with pytest.raises(ValueError, match="8 mask frames do not group into latent frames of 4; give 4k"):
        masks.latent_frame_union(frames[:, :8], 4)


def test_mask_steps_scale_the_papers_schedule():
    assert masks.mask_steps(50) == [0, 5, 10, 15, 20, 25, 30, 35]
    assert masks.mask_steps(25)[0] == 0 and max(masks.mask_steps(25)) <= 17 and len(masks.mask_steps(25)) == 9
    assert masks.mask_steps(1) == [0]


def test_token_grids_follow_the_latent_aspect():
    assert masks.token_grid(40, 64, 20 * 32) == (20, 32)
    assert masks.token_grid(40, 64, 5 * 8) == (5, 8)
    region = torch.zeros(1, 2, 8, 8)
    region[..., :4] = 1
    w = masks.spatial_token_weights(region, 16)  # 4x4 tokens
    assert w.shape == (2, 16, 1) and w.view(2, 4, 4)[0, 0].tolist() == [1, 1, 0, 0]
    assert masks.temporal_token_weights(region, 16).shape == (16, 2, 1)


def test_min_pooled_regions_keep_only_tokens_wholly_inside():
    region = torch.ones(1, 1, 4, 4)
    region[0, 0, 0, 0] = 0
    assert masks.at_tokens(region, 4).flatten().tolist() == [0.75, 1, 1, 1]
    assert masks.at_tokens(region, 4, pool="min").flatten().tolist() == [0, 1, 1, 1]
    assert masks.spatial_token_weights(region, 4, pool="min").flatten().tolist() == [0, 1, 1, 1]


def test_mixed_m_mivas_keep_out_of_each_others_subject_paths():
    a, b = torch.zeros(3, 16, 16), torch.zeros(3, 16, 16)
    a[:, 2:4, 2:4] = 1
    b[0, 10:12, 10:12] = 1  # b moves up: frame 2 is at rows 6-7
    b[1, 8:10, 10:12] = 1
    b[2, 6:8, 10:12] = 1
    region_a, region_b = masks.exclusive_regions([a, b], radius=1)
    assert region_a[2, 10, 10] == 0 and region_a[2, 6, 10] == 0  # where b starts and where it is now
    assert region_a[2, 5, 9] == 0 and region_a[2, 2, 2] == 1 and region_a[0, 6, 10] == 1  # grown by 1 px; a's own
    assert region_b[:, 2:4, 2:4].eq(0).all() and region_b[:, 14, 0].eq(1).all()


def test_a_region_of_zeros_is_the_base_and_of_ones_is_the_adapter(tiny_base):
    stock = forward(tiny_base)
    manager = attach(tiny_base.unet, MivaConfig(base="tiny"), "a")
    randomize(manager.parameters("a"))
    full = forward(tiny_base)
    assert (full - stock).abs().max() > 1e-3
    sample = unet_inputs(tiny_base)[0]
    grid = (1, 4) + tuple(sample.shape[-2:])
    with manager.call(regions={"a": torch.zeros(grid)}) as call:  # CFA, implicit prompt and temporal LoRA silenced
        assert torch.allclose(forward(tiny_base), stock, atol=1e-6)
        call.set(regions={"a": torch.ones(grid)})
        assert torch.allclose(forward(tiny_base), full, atol=1e-6)
        half = torch.zeros(grid)
        half[..., : grid[-1] // 2] = 1
        call.set(regions={"a": half})
        partial = forward(tiny_base)
        assert not torch.allclose(partial, stock, atol=1e-4) and not torch.allclose(partial, full, atol=1e-4)
        with pytest.raises(KeyError, match="not attached"):
            call.set(regions={"b": half})


def test_pipeline_masks(pipe, first_frame):
    manager = attach(pipe.base.unet, MivaConfig(base="tiny"), "a")
    randomize(manager.parameters("a"))
    attach(pipe.base.unet, MivaConfig(base="tiny"), "b")
    kwargs = dict(num_frames=4, num_inference_steps=2, seed=0)
    plain = pipe(first_frame, adapters={"a": 1.0}, **kwargs)
    full = pipe(first_frame, adapters={"a": 1.0}, masks={"a": np.full((32, 32), 255, np.uint8)}, **kwargs)
    # a full mask is no mask (to rounding: unconfined, the sampler runs the LoRA folded into the base)
    assert np.abs(plain.frames.astype(int) - full.frames).max() <= 1
    out = pipe(first_frame, adapters={"a": 1.0, "b": 0.5}, masks={"a": left_half()}, **kwargs)
    assert out.regions.shape == (4, 32, 32)
    assert set(out.regions.unique().tolist()) == {0, 1}  # "a" on the left, unmasked "b" on the background
    assert not manager.context.regions  # a call leaves no regions behind
    with pytest.raises(ValueError, match="a mask was given for 'b', which is not in this call"):
        pipe(first_frame, adapters={"a": 1.0}, masks={"b": left_half()}, **kwargs)
