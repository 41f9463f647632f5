"""Toy world: seeded synthetic clips of simple shapes moving in known ways.

No real video model can be downloaded here, so a tiny video diffusion model is trained on these
clips and the motions it learns are measured from its frames (`miva.toy.metrics`). A tiny model cannot
draw clean objects on busy worlds, so the world is parametric (`WorldConfig`) and defaults to the
simplest one: one flat-coloured shape on a flat background.

Conventions (shared with `miva.toy.metrics`):
- Coordinates are (x, y) in pixels, x to the right, y DOWN; pixel (row i, col j) has its centre
  at (x=j, y=i).
- Angles are degrees, positive = CLOCKWISE AS SEEN ON SCREEN (with y down, the usual rotation
  matrix [[cos, -sin], [sin, cos]] turns +x towards +y, i.e. clockwise on screen).
- Translation speeds are `speed` px/frame at size 32 and scale with the size; diagonals move at the
  same speed (unit direction vector).
- `bounce`: one parabolic hop over the clip, y(t) = y0 - 4 h tau (1 - tau), tau = t / (F - 1),
  h = bounce_height * size: the object rises, peaks mid-clip and lands back where it started.
- Camera motions follow the film convention: `camera-pan-left` = the camera turns left, so the
  whole picture (background and objects) slides RIGHT on screen; `camera-zoom-in` = content grows
  about the frame centre by (1 + zoom_rate) per frame. The world is analytic (background texture is
  a sum of sinusoids, shapes are inside-tests), so "rendering on a larger canvas and cropping" is
  exact at any sub-pixel camera position without a canvas margin.
- A camera move over a flat world looks exactly like moving objects, so camera motions use
  `camera_background` ("texture" by default) instead of `background`.
- `random`: each object gets its own motion from OBJECT_MOTIONS (base-model training); the
  camera stays still. `moving_objects=N` keeps all but the first N objects still (what teaches an
  M-MIVA to move its region and nothing else). `rotate-*` turn `rotation_speed` deg/frame,
  `scale-*` multiply the size by (1 +- scale_rate) per frame, both about the object's centre.
- Rotating circles show nothing, so `rotate-*` never draws circles (squares are used instead when
  circles are the only shape).
- Held-out split: object hues come from the odd 30-degree hue bins (train: even bins) and shapes
  from `heldout_shapes` (train: `shapes`), so nothing an object looks like in held-out was seen in
  training. Backgrounds are drawn the same way in both splits.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, replace

import numpy as np

from ..data import CAMERA_MOTIONS

DIRECTIONS = {"move-left": (-1, 0), "move-right": (1, 0), "move-up": (0, -1), "move-down": (0, 1),
              "move-up-left": (-1, -1), "move-up-right": (1, -1), "move-down-left": (-1, 1),
              "move-down-right": (1, 1)}  # unit (dx, dy) on screen, y down
OBJECT_MOTIONS = tuple(DIRECTIONS) + ("rotate-cw", "rotate-ccw", "scale-up", "scale-down", "bounce")
MOTIONS = OBJECT_MOTIONS + CAMERA_MOTIONS + ("random",)
# Bounding-circle radius of each shape in units of its half-width (for keeping objects in frame).
SHAPE_EXTENT = {"square": 2 ** 0.5, "circle": 1.0, "triangle": 1.15, "diamond": 1.2, "hexagon": 1.1, "cross": 1.08}
HUE_BINS = 12  # 30-degree bins; train objects use even bins, held-out objects odd bins.
_MARGIN = 1.0  # px kept between an object's bounding circle and the outermost pixel centres
_STILL = "still"


@dataclass(frozen=True)
class WorldConfig:
    """What the toy world looks like. Rates are per frame; lengths scale with `size` (32 = base)."""

    size: int = 32
    frames: int = 16
    num_objects: int = 1
    moving_objects: int | None = None  # only the first N objects take the clip's motion, the rest stay still; None: all
    background: str = "flat"  # "flat" | "texture" (smooth low-contrast sinusoids)
    camera_background: str | None = "texture"  # background for camera motions; None = `background`
    object_texture: bool = False  # subtle stripes inside shapes so rotation is visible
    shapes: tuple[str, ...] = ("square", "circle", "triangle")
    heldout_shapes: tuple[str, ...] = ("diamond", "cross")  # "hexagon" too round to see turn
    object_size: tuple[float, float] = (0.22, 0.34)  # nominal width, fraction of the frame
    speed: float = 1.0  # px/frame at size 32, for translations, pans and bounce scale
    rotation_speed: float = 6.0  # degrees/frame
    scale_rate: float = 0.03  # scale-up: x(1+r)/frame, scale-down: x(1-r)/frame
    zoom_rate: float = 0.03  # camera zoom: x(1+r)^(+-1)/frame
    bounce_height: float = 0.3  # apex height, fraction of the frame
    min_contrast: float = 120.0  # min RGB L1 distance (0..255) between any object shade and background
    texture_contrast: float = 12.0  # max per-channel deviation of the background texture
    stripe_contrast: float = 0.12  # relative brightness swing of object stripes
    supersample: int = 4  # anti-aliasing factor (area downsampling)
    # "fit": each object starts where its whole motion stays in the frame (so a small object at the
    # right edge is likely moving left: the first frame tells the motion); "free": it starts anywhere
    # its first frame fits, whatever the motion, and may leave the frame later.
    placement: str = "fit"

    def __post_init__(self) -> None:
        if not 1 <= self.num_objects <= 3:
            raise ValueError(f"num_objects must be 1..3, not {self.num_objects}")
        if self.moving_objects is not None and not 0 <= self.moving_objects <= self.num_objects:
            raise ValueError(f"moving_objects must be 0..num_objects ({self.num_objects}) or None, not {self.moving_objects}")
        if self.placement not in ("fit", "free"):
            raise ValueError(f"placement must be 'fit' or 'free', not {self.placement!r}")
        if self.background not in ("flat", "texture") or self.camera_background not in ("flat", "texture", None):
            raise ValueError("background / camera_background must be 'flat' or 'texture'")
        unknown = set(self.shapes) | set(self.heldout_shapes)
        if not self.shapes or not self.heldout_shapes or unknown - set(SHAPE_EXTENT):
            raise ValueError(f"shapes must be non-empty and among {sorted(SHAPE_EXTENT)}")
        if self.size < 8 or self.frames < 1 or self.supersample < 1 or not 0 < min(self.object_size) <= \
                self.object_size[0] <= self.object_size[1] < 1:
            raise ValueError("need size >= 8, frames >= 1, supersample >= 1, 0 < object_size lo <= hi < 1")


@dataclass
class Clip:
    """frames (F, H, W, 3) uint8; masks (F, K, H, W) bool, visible pixels of each object (the
    later-drawn object owns overlaps); params: ground truth (see `make_clip`)."""

    frames: np.ndarray
    masks: np.ndarray
    motion: str
    params: dict
    seed: int


def _rng(seed: int, split: str, stream: str) -> np.random.Generator:
    # Stable across runs (no Python hash): appearance depends on (seed, split) only, so the same
    # seed shows the same objects under every motion; placement also depends on the motion.
    key = [int(seed) & 0xFFFFFFFF, 0 if split == "train" else 1] + list(stream.encode())
    return np.random.default_rng(key)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v)) * 255.0


def _shades(colour: np.ndarray, cfg: WorldConfig) -> list[np.ndarray]:
    if not cfg.object_texture:
        return [colour]
    a = cfg.stripe_contrast
    return [np.clip(colour * (1 - a), 0, 255), np.clip(colour * (1 + a), 0, 255)]


def _colours(rng: np.random.Generator, cfg: WorldConfig, split: str, n: int):
    """Background colour and n object colours (with hues) that contrast with it."""
    parity = 0 if split == "train" else 1
    for _ in range(200):
        bg = _hsv(rng.uniform(), rng.uniform(0.0, 0.5), rng.uniform(0.15, 0.85))
        objs = []
        for _ in range(n):
            for _ in range(40):
                hue = (2 * rng.integers(HUE_BINS // 2) + parity) * 30.0 + rng.uniform(6.0, 24.0)
                col = _hsv(hue / 360.0, rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))
                if all(np.abs(s - bg).sum() >= cfg.min_contrast for s in _shades(col, cfg)):
                    objs.append((col, hue))
                    break
            else:
                break
        if len(objs) == n:
            return bg, objs
    raise RuntimeError("could not draw contrasting colours; lower WorldConfig.min_contrast")


def _object_motion(motion: str, cfg: WorldConfig, F: int):
    """World-space offsets (F, 2), angles (F,) and scales (F,) of an object under `motion`."""
    t = np.arange(F, dtype=np.float64)
    offset, angle, scale = np.zeros((F, 2)), np.zeros(F), np.ones(F)
    v = cfg.speed * cfg.size / 32.0
    if motion in DIRECTIONS:
        d = np.array(DIRECTIONS[motion], dtype=np.float64)
        offset = t[:, None] * v * d / np.linalg.norm(d)
    elif motion in ("rotate-cw", "rotate-ccw"):
        angle = t * cfg.rotation_speed * (1 if motion == "rotate-cw" else -1)
    elif motion == "scale-up":
        scale = (1 + cfg.scale_rate) ** t
    elif motion == "scale-down":
        scale = (1 - cfg.scale_rate) ** t
    elif motion == "bounce" and F > 1:
        tau = t / (F - 1)
        offset[:, 1] = -4.0 * cfg.bounce_height * cfg.size * tau * (1 - tau)
    return offset, angle, scale


def _camera_motion(motion: str, cfg: WorldConfig, F: int):
    """Camera pan (F, 2): camera centre offset in world px (content moves the other way); zoom (F,)."""
    t = np.arange(F, dtype=np.float64)
    pan, zoom = np.zeros((F, 2)), np.ones(F)
    v = cfg.speed * cfg.size / 32.0
    if motion == "camera-pan-left":
        pan[:, 0] = -v * t
    elif motion == "camera-pan-right":
        pan[:, 0] = v * t
    elif motion == "camera-zoom-in":
        zoom = (1 + cfg.zoom_rate) ** t
    elif motion == "camera-zoom-out":
        zoom = (1 + cfg.zoom_rate) ** -t
    return pan, zoom


def _feasible(offset, scale, pan, zoom, extent, S):
    """Per-axis interval of world start centres keeping the bounding circle inside every frame."""
    c = (S - 1) / 2.0
    b = extent * scale * zoom + _MARGIN  # bounding radius on screen, per frame
    lo = ((b - c) / zoom)[:, None] + c + pan - offset
    hi = ((c - b) / zoom)[:, None] + c + pan - offset
    return lo.max(0), hi.min(0)


def _layout(motion: str, seed: int, cfg: WorldConfig, split: str, F: int) -> dict:
    """Draw everything random about a clip: colours, shapes, sizes, motions, start positions."""
    S = cfg.size
    app, pos = _rng(seed, split, "appearance"), _rng(seed, split, "placement:" + motion)
    bg, colours = _colours(app, cfg, split, cfg.num_objects)
    shape_pool = cfg.shapes if split == "train" else cfg.heldout_shapes
    is_camera = motion in CAMERA_MOTIONS
    kind = (cfg.camera_background or cfg.background) if is_camera else cfg.background
    w = app.uniform(0.5, 1.0, 3)  # drawn even when unused, so later draws do not shift
    texture = dict(theta=app.uniform(0, 2 * np.pi, 3), wavelength=app.uniform(0.3, 0.7, 3) * S,
                   phase=app.uniform(0, 2 * np.pi, 3), weight=w / w.sum(), channel=app.uniform(0.6, 1.0, 3))
    texture = texture if kind == "texture" else None
    pan, zoom = _camera_motion(motion, cfg, F)
    frames = slice(None) if cfg.placement == "fit" else slice(0, 1)  # "free": the first frame only
    objects = []
    for k, (colour, hue) in enumerate(colours):
        obj_motion = motion
        if motion == "random":
            obj_motion = OBJECT_MOTIONS[pos.integers(len(OBJECT_MOTIONS))]
        elif is_camera or motion == _STILL:
            obj_motion = _STILL
        if cfg.moving_objects is not None and k >= cfg.moving_objects:
            obj_motion = _STILL  # after the draw above, so the other objects' draws do not shift
        pool = shape_pool
        if obj_motion.startswith("rotate"):
            pool = tuple(s for s in shape_pool if s != "circle") or ("square",)
        shape = pool[app.integers(len(pool))]
        half = app.uniform(*cfg.object_size) * S / 2.0
        offset, angle, scale = _object_motion(obj_motion, cfg, F)
        while True:  # shrink until the motion (or the first frame) fits in the frame
            lo, hi = _feasible(offset[frames], scale[frames], pan[frames], zoom[frames], SHAPE_EXTENT[shape] * half, S)
            if np.all(lo <= hi):
                break
            half *= 0.9
            if half < 1.0:
                raise ValueError(f"{obj_motion!r} over {F} frames does not fit in a {S} px frame; "
                                 "lower speed/rates or frames")
        objects.append(dict(shape=shape, colour=colour, hue=hue, half=half, motion=obj_motion,
                            offset=offset, angle=angle, scale=scale, lo=lo, hi=hi))
    # Start positions: avoid overlaps so each object stays one separate blob; if 30 draws fail,
    # shrink every object by 10% and retry (after 8 rounds overlaps are accepted: three objects
    # moving 15 px in a 32 px frame are cramped, so they come out small).
    c, n_try = (S - 1) / 2.0, 30
    for round_ in range(9):  # all n_try candidate placements are drawn and checked at once
        starts = np.stack([pos.uniform(o["lo"], o["hi"], (n_try, 2)) for o in objects], 1)  # (T, K, 2)
        offsets = np.stack([o["offset"] for o in objects])  # (K, F, 2)
        centres = (starts[:, :, None] + offsets - c - pan) * zoom[:, None] + c  # (T, K, F, 2)
        bounds = np.stack([SHAPE_EXTENT[o["shape"]] * o["half"] * o["scale"] * zoom for o in objects])
        ok = np.ones(n_try, dtype=bool)
        for i in range(len(objects)):
            for j in range(i + 1, len(objects)):
                gap = np.linalg.norm(centres[:, i] - centres[:, j], axis=-1) - bounds[i] - bounds[j]
                ok &= np.all(gap > 1, axis=-1)
        if ok.any() or round_ == 8:
            best = int(np.argmax(ok))
            for k, o in enumerate(objects):
                o["start"], o["centres"], o["bound"] = starts[best, k], centres[best, k], bounds[k]
            break
        for o in objects:
            o["half"] *= 0.9
            o["lo"], o["hi"] = _feasible(o["offset"][frames], o["scale"][frames], pan[frames], zoom[frames],
                                         SHAPE_EXTENT[o["shape"]] * o["half"], S)
    return dict(background=bg, texture=texture, pan=pan, zoom=zoom, objects=objects)


def _inside(shape: str, u: np.ndarray, v: np.ndarray, h) -> np.ndarray:
    """Inside-test in object-local coordinates (y down; triangles point up)."""
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= h
    if shape == "circle":
        return u * u + v * v <= h * h
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= SHAPE_EXTENT["diamond"] * h
    if shape == "cross":  # plus sign, arms 0.8 h wide
        au, av = np.abs(u), np.abs(v)
        return ((au <= h) & (av <= 0.4 * h)) | ((au <= 0.4 * h) & (av <= h))
    n, r = (3, SHAPE_EXTENT["triangle"] * h) if shape == "triangle" else (6, SHAPE_EXTENT["hexagon"] * h)
    start = np.pi / 2 if shape == "triangle" else 0.0
    out = np.ones(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
    for i in range(n):  # edge normals; inradius = r cos(pi / n)
        a = start + 2 * np.pi * i / n
        out &= np.cos(a) * u + np.sin(a) * v <= r * np.cos(np.pi / n)
    return out


def _background(lay: dict, xs: np.ndarray, ys: np.ndarray, contrast: float) -> np.ndarray:
    """Background colour at world coordinates xs (F, 1, W), ys (F, H, 1) -> (F, H, W, 3)."""
    bg = lay["background"]
    tex = lay["texture"]
    if tex is None:
        return np.broadcast_to(bg, np.broadcast_shapes(xs.shape, ys.shape) + (3,))
    val = 0.0
    for th, lam, ph, w in zip(tex["theta"], tex["wavelength"], tex["phase"], tex["weight"]):
        val = val + w * np.sin(2 * np.pi * (np.cos(th) * xs + np.sin(th) * ys) / lam + ph)
    return bg + (contrast * val)[..., None] * tex["channel"]


def _render(lay: dict, cfg: WorldConfig, F: int) -> tuple[np.ndarray, np.ndarray]:
    """Supersampled inside-tests -> per-object coverage (area downsampling) -> composite."""
    S, ss = cfg.size, cfg.supersample
    c = (S - 1) / 2.0
    pan, zoom = lay["pan"], lay["zoom"]
    sub = ((np.arange(S * ss) + 0.5) / ss - 0.5).astype(np.float32) - c  # screen coords - centre
    pix = np.arange(S, dtype=np.float32) - c
    world = lambda p, axis: (c + pan[:, axis, None] + p[None, :] / zoom[:, None]).astype(np.float32)
    # Background at pixel centres (smooth, no need to supersample).
    image = np.array(_background(lay, world(pix, 0)[:, None, :], world(pix, 1)[:, :, None],
                                 cfg.texture_contrast), np.float32)
    wx, wy = world(sub, 0)[:, None, :], world(sub, 1)[:, :, None]
    owner = np.full((F, S * ss, S * ss), -1, dtype=np.int8)
    boxes, factors = [], []
    for k, o in enumerate(lay["objects"]):
        # Only evaluate the pixel box the object can reach during the clip (speed).
        lo = np.floor((o["centres"] - o["bound"][:, None]).min(0) - 1).clip(0, S).astype(int)
        hi = np.ceil((o["centres"] + o["bound"][:, None]).max(0) + 2).clip(0, S).astype(int)
        rows, cols = slice(lo[1] * ss, hi[1] * ss), slice(lo[0] * ss, hi[0] * ss)
        boxes.append((rows, cols, slice(lo[1], hi[1]), slice(lo[0], hi[0])))
        ox = (o["start"][0] + o["offset"][:, 0]).astype(np.float32)[:, None, None]
        oy = (o["start"][1] + o["offset"][:, 1]).astype(np.float32)[:, None, None]
        sc = o["scale"].astype(np.float32)[:, None, None]
        dx, dy = (wx[:, :, cols] - ox) / sc, (wy[:, rows] - oy) / sc
        if np.any(o["angle"]):  # local = R(-angle) (p - centre) / scale
            th = np.deg2rad(o["angle"]).astype(np.float32)[:, None, None]
            dx, dy = np.cos(th) * dx + np.sin(th) * dy, -np.sin(th) * dx + np.cos(th) * dy
        owner[:, rows, cols][_inside(o["shape"], dx, dy, o["half"])] = k
        if cfg.object_texture:  # soft-edged stripes across the object's local x axis
            stripes = np.clip(3 * np.sin(dx * np.float32(2 * np.pi / o["half"])), -1, 1)
            factors.append(1 + cfg.stripe_contrast * np.broadcast_to(stripes, owner[:, rows, cols].shape))
    masks = np.zeros((F, len(lay["objects"]), S, S), dtype=bool)
    total = np.zeros((F, S, S), np.float32)
    paint = np.zeros((F, S, S, 3), np.float32)
    for k, o in enumerate(lay["objects"]):
        rows, cols, prow, pcol = boxes[k]
        own = owner[:, rows, cols] == k
        h, w = own.shape[1] // ss, own.shape[2] // ss
        down = lambda a: a.reshape(F, h, ss, w, ss).mean(axis=(2, 4), dtype=np.float32)
        cov = down(own)
        masks[:, k, prow, pcol] = cov >= 0.5
        total[:, prow, pcol] += cov
        weight = down(np.where(own, factors[k], 0)) if cfg.object_texture else cov
        paint[:, prow, pcol] += weight[..., None] * o["colour"].astype(np.float32)
    image = image * (1 - total[..., None]) + paint
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), masks


def _check(motion: str, split: str) -> None:
    if motion not in MOTIONS and motion != _STILL:
        raise ValueError(f"unknown motion {motion!r}; choose from {MOTIONS}")
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")


def make_clip(motion: str, seed: int, config: WorldConfig = WorldConfig(), split: str = "train") -> Clip:
    """Render one clip. Same (motion, seed, config, split) -> identical bytes.

    params: {"split", "background": {"kind", "colour"}, "camera": {"pan" (F, 2) camera offset in
    world px, "zoom" (F,)}, "objects": [{"shape", "colour" (RGB 0..255), "hue" (deg), "size" (px,
    nominal width at scale 1), "motion", "start_centre" (x, y), "centres" (F, 2), "angles" (F,) deg
    clockwise, "scales" (F,)}]}. Object centres, angles and scales are AS SEEN ON SCREEN (they
    include the camera's pan and zoom).
    """
    _check(motion, split)
    F = config.frames
    lay = _layout(motion, seed, config, split, F)
    frames, masks = _render(lay, config, F)
    tup = lambda a: tuple(float(x) for x in a)
    objects = [dict(shape=o["shape"], colour=tup(o["colour"]), hue=float(o["hue"]), size=float(2 * o["half"]),
                    motion=o["motion"], start_centre=tup(o["centres"][0]), centres=o["centres"],
                    angles=o["angle"].copy(), scales=o["scale"] * lay["zoom"]) for o in lay["objects"]]
    params = dict(split=split, objects=objects, camera=dict(pan=lay["pan"], zoom=lay["zoom"]), background=dict(
        kind="flat" if lay["texture"] is None else "texture", colour=tup(lay["background"])))
    return Clip(frames=frames, masks=masks, motion=motion, params=params, seed=seed)


def make_still(seed: int, config: WorldConfig = WorldConfig(), split: str = "train") -> np.ndarray:
    """First frame of a static world (H, W, 3) uint8, e.g. a held-out first frame to animate.
    Same objects as `make_clip(motion, seed)` (appearance depends on seed and split; only rotate-*
    swaps circles)."""
    _check(_STILL, split)
    frames, _ = _render(_layout(_STILL, seed, config, split, 1), config, 1)
    return frames[0]


def heldout_stills(n: int, config: WorldConfig = WorldConfig(), motion: str | None = None,
                   seed0: int = 20_000_000) -> list[np.ndarray]:
    """n held-out first frames to animate with `motion` (benchmarks): seeds seed0, seed0 + 1, ...

    For a camera motion they have the background its clips have (`camera_background`), since over a
    flat background a camera move cannot be told from the objects moving."""
    if motion in CAMERA_MOTIONS and config.camera_background:
        config = replace(config, background=config.camera_background)
    return [make_still(seed0 + i, config, split="heldout") for i in range(n)]


def make_dataset(motion: str, n: int, seed0: int = 0, config: WorldConfig = WorldConfig(),
                 split: str = "train") -> list[Clip]:
    """n clips of `motion` with seeds seed0, seed0 + 1, ..."""
    return [make_clip(motion, seed0 + i, config, split) for i in range(n)]
