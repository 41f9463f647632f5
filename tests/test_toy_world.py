"""Toy world generator: deterministic, well-formed, and its ground truth matches its pixels."""

import colorsys

import numpy as np
import pytest
from scipy import ndimage

from miva.toy import (DIRECTIONS, MOTIONS, WorldConfig,
                      heldout_stills, make_clip, make_dataset, make_still)

RICH = WorldConfig(num_objects=3, background="texture", object_texture=True)


def _centroid(mask):
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def test_same_seed_same_bytes_and_different_seeds_differ():
    for cfg in (WorldConfig(), RICH):
        a, b, c = make_clip("random", 7, cfg), make_clip("random", 7, cfg), make_clip("random", 8, cfg)
        assert a.frames.tobytes() == b.frames.tobytes() and np.array_equal(a.masks, b.masks)
        assert np.array_equal(a.params["objects"][0]["centres"], b.params["objects"][0]["centres"])
        assert a.frames.tobytes() != c.frames.tobytes()
    assert np.array_equal(make_still(3), make_still(3)) and not np.array_equal(make_still(3), make_still(4))


def test_shapes_and_dtypes():
    clip = make_clip("move-left", 0, WorldConfig(size=24, frames=8, num_objects=2))
    assert clip.frames.shape == (8, 24, 24, 3) and clip.frames.dtype == np.uint8
    assert clip.masks.shape == (8, 2, 24, 24) and clip.masks.dtype == bool
    assert clip.motion == "move-left" and clip.seed == 0 and len(clip.params["objects"]) == 2
    obj = clip.params["objects"][0]
    assert obj["centres"].shape == (8, 2) and obj["angles"].shape == (8,) and obj["scales"].shape == (8,)
    assert make_still(1, WorldConfig(size=24)).shape == (24, 24, 3)
    clips = make_dataset("bounce", 3, seed0=5)
    assert [c.seed for c in clips] == [5, 6, 7] and all(c.motion == "bounce" for c in clips)


@pytest.mark.parametrize("cfg", [WorldConfig(), RICH, WorldConfig(size=48, frames=10)])
def test_objects_stay_inside_frame_and_visible(cfg):
    S = cfg.size
    for motion in MOTIONS:
        for seed in range(3):
            clip = make_clip(motion, seed, cfg)
            m = clip.masks
            assert not (m[..., 0, :].any() or m[..., -1, :].any() or m[..., 0].any() or m[..., -1].any()), motion
            assert m.any(axis=(2, 3)).all(), f"{motion} seed {seed}: an object vanished"
            assert (m.sum(1) <= 1).all()  # overlaps have one owner
            for o in clip.params["objects"]:
                assert (o["centres"] > 0).all() and (o["centres"] < S - 1).all()


def test_masks_match_drawn_pixels():
    cfg = WorldConfig(num_objects=2)
    for seed in range(4):
        clip = make_clip("random", seed, cfg)
        bg = np.array(clip.params["background"]["colour"])
        dist = np.abs(clip.frames.astype(float) - bg).sum(-1)
        union = clip.masks.any(1)
        assert (dist[union] >= cfg.min_contrast / 2).all()  # mask pixels are mostly object
        far = ~ndimage.binary_dilation(union, structure=np.ones((1, 3, 3), bool))
        assert (dist[far] <= 1.5).all()  # away from objects: untouched background
        for k, o in enumerate(clip.params["objects"]):  # mask centroid ~ ground-truth centre
            err = [np.abs(_centroid(clip.masks[t, k]) - o["centres"][t]).max() for t in range(cfg.frames)]
            assert max(err) < 0.6


@pytest.mark.parametrize("motion", list(DIRECTIONS))
def test_translations_move_in_their_direction(motion):
    cfg = WorldConfig()
    clip = make_clip(motion, 2, cfg)
    c = clip.params["objects"][0]["centres"]
    d = c[-1] - c[0]
    assert np.allclose(np.sign(np.round(d, 6)), DIRECTIONS[motion])
    assert np.isclose(np.linalg.norm(d), cfg.speed * (cfg.frames - 1))
    seen = _centroid(clip.masks[-1, 0]) - _centroid(clip.masks[0, 0])
    assert np.allclose(seen, d, atol=0.7)


def test_rotation_is_clockwise_on_screen():
    # A triangle points up; after 15 frames x 6 deg = 90 deg clockwise its apex points RIGHT.
    cfg = WorldConfig(shapes=("triangle",), object_size=(0.4, 0.4))
    for motion, apex_sign in (("rotate-cw", 1), ("rotate-ccw", -1)):
        clip = make_clip(motion, 0, cfg)
        obj = clip.params["objects"][0]
        assert obj["angles"][-1] == pytest.approx(90.0 * apex_sign)
        xs = np.nonzero(clip.masks[-1, 0])[1] - obj["centres"][-1][0]
        assert apex_sign * (xs.max() + xs.min()) > 2  # the apex reaches further than the base
        assert np.allclose(obj["centres"], obj["centres"][0])  # rotates in place


def test_rotation_never_draws_circles():
    for seed in range(10):
        clip = make_clip("rotate-cw", seed, WorldConfig(shapes=("circle", "triangle")))
        assert clip.params["objects"][0]["shape"] == "triangle"


def test_scale_and_bounce_ground_truth():
    up, down = make_clip("scale-up", 1), make_clip("scale-down", 1)
    area = lambda c: c.masks[:, 0].sum((1, 2))
    assert area(up)[-1] > 2 * area(up)[0] and area(down)[-1] < 0.5 * area(down)[0]
    assert up.params["objects"][0]["scales"][-1] == pytest.approx(1.03 ** 15)
    cfg = WorldConfig()
    y = make_clip("bounce", 1, cfg).params["objects"][0]["centres"][:, 1]
    assert y[0] == pytest.approx(y[-1]) and np.argmin(y) in (7, 8)
    assert y[0] - y.min() == pytest.approx(cfg.bounce_height * cfg.size, rel=0.02)


def test_camera_pan_moves_background_and_objects():
    # pan-left: the camera turns left, so at 1 px/frame all content slides exactly 1 px RIGHT.
    for motion, shift in (("camera-pan-left", 1), ("camera-pan-right", -1)):
        clip = make_clip(motion, 3)
        assert clip.params["background"]["kind"] == "texture"
        f = clip.frames.astype(float)
        moved = np.abs(np.roll(f[:-1], shift, axis=2) - f[1:])[:, :, 2:-2].mean()
        still = np.abs(f[:-1] - f[1:])[:, :, 2:-2].mean()
        assert moved < 0.6 and still > 1.5, (moved, still)
        dx = np.diff(clip.params["objects"][0]["centres"][:, 0])
        assert np.allclose(dx, shift)


def test_camera_zoom_moves_background_and_scales_objects():
    for motion, grow in (("camera-zoom-in", True), ("camera-zoom-out", False)):
        clip = make_clip(motion, 4)
        o = clip.params["objects"][0]
        bg = ~clip.masks.any(1)
        assert np.abs(np.diff(clip.frames.astype(float), axis=0)).sum(-1)[bg[1:] & bg[:-1]].mean() > 1.0
        r = np.linalg.norm(o["centres"] - 15.5, axis=1)
        assert (r[-1] > r[0]) == grow and (o["scales"][-1] > 1) == grow
        area = clip.masks[:, 0].sum((1, 2))
        assert (area[-1] > area[0]) == grow
    flat = make_clip("camera-zoom-in", 4, WorldConfig(camera_background=None))
    assert flat.params["background"]["kind"] == "flat"


def test_heldout_stills_have_the_background_of_the_motion_they_are_for():
    flat, camera = heldout_stills(2, motion="move-left"), heldout_stills(2, motion="camera-zoom-in")
    assert np.array_equal(flat[1], make_still(20_000_001, split="heldout"))
    assert all(len(np.unique(s.reshape(-1, 3), axis=0)) < len(np.unique(c.reshape(-1, 3), axis=0))
               for s, c in zip(flat, camera))


def test_heldout_colours_and_shapes_are_disjoint_from_train():
    cfg = WorldConfig(num_objects=2)
    bins = {"train": set(), "heldout": set()}
    shapes = {"train": set(), "heldout": set()}
    for split in bins:
        for seed in range(25):
            for o in make_clip("random", seed, cfg, split=split).params["objects"]:
                h = colorsys.rgb_to_hsv(*(np.array(o["colour"]) / 255))[0] * 360
                bins[split].add(int(h // 30))
                shapes[split].add(o["shape"])
    assert bins["train"] and bins["heldout"] and not bins["train"] & bins["heldout"]
    assert shapes["train"] <= set(cfg.shapes) and shapes["heldout"] <= set(cfg.heldout_shapes)
    assert not shapes["train"] & shapes["heldout"]


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        make_clip("teleport", 0)
    with pytest.raises(ValueError):
        make_clip("move-left", 0, split="test")
    with pytest.raises(ValueError):
        WorldConfig(num_objects=4)
    with pytest.raises(ValueError):
        WorldConfig(background="noise")
    with pytest.raises(ValueError):  # 3 px/frame x 15 frames cannot fit in 32 px
        make_clip("move-left", 0, WorldConfig(speed=3.0))


def test_moving_objects_keeps_the_others_still():
    config = WorldConfig(num_objects=2, moving_objects=1)
    clip = make_clip("move-left", 7, config)
    mover, other = clip.params["objects"]
    assert mover["motion"] == "move-left" and other["motion"] == "still"
    assert mover["centres"][-1][0] < mover["centres"][0][0] - 10
    assert np.allclose(other["centres"], other["centres"][0])
    everyone = make_clip("move-left", 7, WorldConfig(num_objects=2))
    assert everyone.params["objects"][0]["shape"] == mover["shape"]  # same appearance draws
    with pytest.raises(ValueError, match="moving_objects must be 0..num_objects"):
        WorldConfig(num_objects=2, moving_objects=3)


def test_free_placement_does_not_tell_the_motion_from_the_first_frame():
    """"fit" starts a left-moving object on the right (its first frame tells the motion); "free"
    draws the start the same way for every motion: inside the first frame, free to leave later."""
    def start_x(config, motion):
        return np.mean([make_clip(motion, s, config).params["objects"][0]["start_centre"][0] for s in range(24)])

    fit, free = WorldConfig(size=32, frames=16), WorldConfig(size=32, frames=16, placement="free")
    assert start_x(fit, "move-left") - start_x(fit, "move-right") > 8
    assert abs(start_x(free, "move-left") - start_x(free, "move-right")) < 4
    clips = [make_clip("move-left", s, free) for s in range(24)]
    assert all(c.masks[0].any() and not c.masks[0, 0, :, 0].any() for c in clips)  # the first frame holds it whole
    assert any(c.masks[-1, 0].sum() < c.masks[0, 0].sum() * 0.9 for c in clips)  # some leave through the left edge
    with pytest.raises(ValueError, match="placement must be 'fit' or 'free'"):
        WorldConfig(placement="anywhere")
