"""Few-shot training data: the handful of clips a user gives us, decoded and made uniform.

The paper trains a motion adapter on ~10 clips of one motion (or, for camera motions, 20 stills x
5 random crops). Users hand us whatever they have: phone videos, GIFs, folders of exported frames,
of any length and size. Everything here turns that into equal-shape (F, H, W, 3) uint8 arrays, and
every problem becomes ONE sentence that names the file and says what to change, so a bad upload
among ten good ones is a warning instead of a crashed training run. Stills become camera clips
here too (`camera_clips_from_still`, as the paper makes its camera-motion clips).

Kept as one module: every source of training clips (videos, frame folders, mask clips, stills) goes
through the same collection and error reporting (`_collect`, `_gather`).
"""

from __future__ import annotations

import itertools
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from .media import fit_image, load_image


CAMERA_MOTIONS = ("camera-pan-left", "camera-pan-right", "camera-zoom-in", "camera-zoom-out")


@dataclass
class CameraClip:
    """frames (F, S, S, 3) uint8 cropped from a still; crop_boxes (F, 4): x0, y0, x1, y1 of each frame's
    window in the still's pixel-edge coordinates."""

    frames: np.ndarray
    crop_boxes: np.ndarray


def camera_clips_from_still(image: np.ndarray, motion: str, n: int, seed: int, frames: int = 16,
                            size: int | None = None) -> list[CameraClip]:
    """Turn ONE still (H, W, 3) uint8 into n camera clips by smooth random crops.

    As the paper does for camera motions (20 stills x 5 crops): a square crop window moves
    (pan) or shrinks/grows (zoom) linearly over the frames and is resampled (PIL bilinear, which
    anti-aliases when shrinking) to size x size; size None = the start window's side. Pan-left
    moves the window left (content slides right). Deterministic in all arguments.
    """
    from PIL import Image

    if motion not in CAMERA_MOTIONS:
        raise ValueError(f"camera_clips_from_still needs one of {CAMERA_MOTIONS}, not {motion!r}")
    image = np.asarray(image, dtype=np.uint8)
    (H, W), m, pil = image.shape[:2], min(image.shape[:2]), Image.fromarray(image[..., :3])
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF] + list(motion.encode()))
    tau = np.linspace(0.0, 1.0, frames)[:, None]
    clips = []
    for _ in range(n):
        if "pan" in motion:
            side = rng.uniform(0.55, 0.75) * m
            travel = min(rng.uniform(0.15, 0.3) * m, W - side)
            y0 = rng.uniform(0, H - side)
            x_left = rng.uniform(0, W - side - travel)
            xs = (x_left + travel, x_left) if motion == "camera-pan-left" else (x_left, x_left + travel)
            start, end = (np.array([x, y0, x + side, y0 + side]) for x in xs)
        else:
            big = rng.uniform(0.75, 0.95) * m
            small = big / rng.uniform(1.3, 1.6)
            cx, cy = rng.uniform(big / 2, W - big / 2), rng.uniform(big / 2, H - big / 2)
            boxes = [np.array([cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2]) for s in (big, small)]
            start, end = boxes if motion == "camera-zoom-in" else boxes[::-1]
        crop = start[None] * (1 - tau) + end[None] * tau
        out = size or max(1, int(round(start[2] - start[0])))
        clip_frames = np.stack([np.asarray(pil.resize((out, out), Image.Resampling.BILINEAR,
                                                      box=tuple(float(x) for x in b))) for b in crop])
        clips.append(CameraClip(frames=clip_frames, crop_boxes=crop))
    return clips

MAX_CLIP_BYTES = 512 * 2**20  # a single uploaded video larger than this is refused
# A video longer than this is refused, though it would cost little: decoding is lazy and stops after
# the frames we keep (16 by default, about half a second of phone video). A clip of one motion lasts
# seconds; a 10-minute recording would train on its first half-second, almost surely not the motion
# its owner meant, so it is refused with a sentence rather than quietly learned from. The length is
# the container's, from its header (no frame is decoded); GIFs and frame folders are only read lazily.
MAX_CLIP_SECONDS = 60
MAX_CLIPS = 64  # few-shot means few: more clips than this is almost surely the wrong folder
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")
MASK_TAG = ".mask"  # a clip's subject masks sit beside it: `run.mp4` -> `run.mask.mp4` (any video suffix) or `run.mask/`
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class ClipError(ValueError):
    """A clip (or set of clips) we cannot use; the message is one sentence saying what to change."""


@dataclass
class ClipSet:
    """Usable clips (all (F, H, W, 3) uint8 of one shape), their names, and one warning per skip."""

    clips: list[np.ndarray] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    masks: list[np.ndarray] | None = None  # with masks=True: (F, H, W) float in [0, 1] per clip (an M-MIVA's subject)

    def __len__(self) -> int:
        return len(self.clips)


def _natural_key(name: str) -> list:
    """'frame2' < 'frame10': digit runs compare as numbers (re.split alternates str, int, str...)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name.lower())]


def _listdir(folder: Path) -> list[Path]:
    """Visible entries in natural order; hidden files (.DS_Store, ._x.mp4) are never media."""
    return sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: _natural_key(p.name))


def _check_args(frames: int, stride: int, size: tuple[int, int]) -> None:
    if int(frames) < 1 or int(stride) < 1:
        raise ClipError(f"frames ({frames}) and stride ({stride}) must both be at least 1; pass positive values.")
    if len(size) != 2 or min(int(s) for s in size) < 1:
        raise ClipError(f"size must be (height, width) with positive sides, not {size!r}; pass e.g. (32, 32).")


def _uniform(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """RGB (grayscale expanded, alpha on white, via media) and cover-resized to size = (H, W)."""
    return np.asarray(fit_image(load_image(np.asarray(frame)), int(size[1]), int(size[0])))


def _video_frames(path: Path) -> Iterator[np.ndarray]:
    """Decode lazily: frames are pulled one at a time and the reader (ffmpeg process) is closed as
    soon as the caller stops, so a 10-minute clip costs no more than the frames we keep."""
    import imageio.v2 as imageio

    fmt = None if path.suffix.lower() == ".gif" else "FFMPEG"  # GIFs go to the pillow plugin
    failure = None
    # imageio leaves ffmpeg's pipes to the collector (on a failed open and on an early close);
    # those ResourceWarnings are imageio's, not something a user can act on.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            reader = imageio.get_reader(path, format=fmt)
        except Exception as err:  # noqa: BLE001 - every decoder failure means the same to a user
            failure = _undecodable(path, err)  # raised outside: no __context__ keeps the pipes alive
    if failure is not None:
        raise failure
    try:
        repeats = _gif_repeats(path) if fmt is None else None
        seconds = _duration(reader) if fmt == "FFMPEG" else None  # a GIF costs its frames, not its delays
        if seconds is not None and seconds > MAX_CLIP_SECONDS:
            raise ClipError(f"clip '{path.name}' lasts {_minutes(seconds)}, longer than {MAX_CLIP_SECONDS} s; "
                            "trim it to the few seconds that show the motion.")
        frames = iter(reader)  # iter_data: pulls frame i only when asked for it
        for index in itertools.count():
            try:
                frame = np.asarray(next(frames))
            except StopIteration:
                return
            except Exception as err:  # noqa: BLE001
                raise _undecodable(path, err) from None
            for _ in range(repeats[index] if repeats and index < len(repeats) else 1):
                yield frame
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            reader.close()


def _gif_repeats(path: Path) -> list[int] | None:
    """How many frames each stored frame of a GIF stands for; None if unreadable here.

    GIF writers (Pillow among them) store a run of identical frames as one frame shown that much
    longer, so a clip whose object pauses for a frame would come back a frame short: each stored
    frame stands for round(duration / shortest duration) frames."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            durations = []
            for index in range(getattr(image, "n_frames", 1)):
                image.seek(index)
                durations.append(int(image.info.get("duration") or 0))
    except Exception:  # noqa: BLE001 - the decoder below reports what is wrong with the file
        return None
    unit = min((d for d in durations if d > 0), default=0)
    return [max(1, round(d / unit)) if unit else 1 for d in durations]


def _duration(reader) -> float | None:
    """A video's length in seconds from its container header (ffmpeg's metadata), None if unknown."""
    try:
        seconds = float(reader.get_meta_data().get("duration"))
    except (AttributeError, TypeError, ValueError):
        return None
    return seconds if 0 < seconds < float("inf") else None


def _minutes(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def _undecodable(path: Path, reason: BaseException | str) -> ClipError:
    if isinstance(reason, BaseException):  # first line only: ffmpeg dumps its whole stderr
        reason = (str(reason).strip().splitlines() or [type(reason).__name__])[0][:120].rstrip(".")
    return ClipError(f"could not decode '{path.name}' as a video or GIF ({reason}); "
                     "use mp4, webm, mov, gif or a folder of frames.")


def _folder_frames(folder: Path) -> Iterator[np.ndarray]:
    paths = [p for p in _listdir(folder) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not paths:
        raise ClipError(f"frame folder '{folder.name}' holds no .png, .jpg, .jpeg or .webp frames; "
                        "put the clip's frames in it or pass a video file.")
    for p in paths:
        try:
            yield np.asarray(load_image(p))
        except (ValueError, OSError) as err:
            raise ClipError(f"{str(err).rstrip('.')} (in frame folder '{folder.name}').") from None


def load_clip(source: str | Path, frames: int = 16, stride: int = 1,
              size: tuple[int, int] = (32, 32)) -> np.ndarray:
    """One clip as (frames, H, W, 3) uint8, size = (H, W): frames 0, stride, 2*stride, ... of a
    video file or a folder of frames, each RGB and cover-resized (no distortion, no borders)."""
    _check_args(frames, stride, size)
    path = Path(source)
    if not path.exists():
        raise ClipError(f"clip '{path}' does not exist; check the path.")
    if path.is_dir():
        source_frames = _folder_frames(path)
    elif path.suffix.lower() not in VIDEO_SUFFIXES:
        raise _undecodable(path, f"'{path.suffix or 'no suffix'}' is not a video suffix")
    elif path.stat().st_size > MAX_CLIP_BYTES:
        raise ClipError(f"clip '{path.name}' is larger than {MAX_CLIP_BYTES // 2**20} MB; "
                        "trim it or use a smaller file.")
    else:
        source_frames = _video_frames(path)
    need = (frames - 1) * stride + 1
    kept, seen = [], 0
    try:
        for i, frame in enumerate(source_frames):
            seen = i + 1
            if i % stride == 0:
                try:
                    kept.append(_uniform(frame, size))
                except ValueError as err:  # media's bounds (e.g. a 16K video)
                    raise ClipError(f"frame {i} of '{path.name}' is unusable: {str(err).rstrip('.')}.") from None
            if seen >= need:
                break
    finally:
        getattr(source_frames, "close", lambda: None)()  # stops the decoder early
    if seen < need:
        if seen == 0:
            raise _undecodable(path, "it holds no frames")
        raise ClipError(f"'{path.name}' has {seen} frames but {frames} frames at stride {stride} need {need}; "
                        "use a longer clip or a smaller --stride.")
    return np.stack(kept)


def _collect(sources: str | Path | Sequence[str | Path], media: Sequence[str], kind: str,
             on_error: str) -> tuple[list[Path], list[str], str]:
    """Candidate paths, notes about ignored files, and how to name the sources in errors.

    A folder contributes its `media` files (and, for clips, its sub-folders as frame folders);
    anything else in it is listed in one warning rather than failing the whole set."""
    if on_error not in ("skip", "raise"):
        raise ClipError(f"on_error must be 'skip' or 'raise', not {on_error!r}.")
    if isinstance(sources, (str, Path)):
        root = Path(sources)
        if not root.exists():
            raise ClipError(f"'{root}' does not exist; pass a folder of {kind} or a list of files.")
        if not root.is_dir():
            return [root], [], f"'{root.name}'"
        candidates, ignored = [], []
        for p in _listdir(root):
            if kind == "clips" and _is_mask(p):
                continue  # a clip's subject masks, read with the clip (`clip_masks`)
            if (p.is_dir() and kind == "clips") or (p.is_file() and p.suffix.lower() in media):
                candidates.append(p)
            else:
                ignored.append(p.name)
        notes = []
        if ignored:
            hint = "; put each clip's frames in its own sub-folder" if kind == "clips" and any(
                Path(n).suffix.lower() in IMAGE_SUFFIXES for n in ignored) else ""
            what = "videos or frame folders" if kind == "clips" else "images"
            notes.append(f"ignored {len(ignored)} entries of '{root.name}' that are not {what} "
                         f"({', '.join(ignored[:8])}{', ...' if len(ignored) > 8 else ''}){hint}.")
        paths, where = candidates, f"'{root.name}'"
    else:
        paths, notes = [Path(s) for s in sources], []
        where = f"the {len(paths)} given file{'s' if len(paths) != 1 else ''}"
    if len(paths) > MAX_CLIPS:
        raise ClipError(f"{where} holds {len(paths)} {kind} but at most {MAX_CLIPS} are used; "
                        f"pass a folder or list with at most {MAX_CLIPS}.")
    return paths, notes, where


def _gather(items: Iterable[tuple[Path, ClipError]], on_error: str, where: str, notes: list[str],
            result: ClipSet, empty: str) -> ClipSet:
    """The shared skip/raise policy; warnings go both to the caller's list and to warnings.warn."""
    for note in notes:
        warnings.warn(note, stacklevel=3)
    result.warnings.extend(notes)
    reasons = []
    for path, err in items:  # items fill `result` and yield only the failures
        if on_error == "raise":
            raise err
        reasons.append(str(err))
        result.warnings.append(f"skipped '{path.name}': {err}")
        warnings.warn(result.warnings[-1], stacklevel=3)
    if not result.clips:
        raise ClipError(f"no usable clips in {where}; " + (reasons[0] if reasons else f"it holds no {empty}."))
    return result


def _is_mask(path: Path) -> bool:
    stem = path.name if path.is_dir() else path.name[: -len(path.suffix) or None]
    return stem.lower().endswith(MASK_TAG)


def clip_masks(clip: Path, frames: int = 16, stride: int = 1, size: tuple[int, int] = (32, 32)) -> np.ndarray:
    """The subject masks beside `clip`, (F, H, W) float in [0, 1] (white = the subject; the brightest
    channel counts), sampled and fitted exactly like the clip's frames."""
    clip = Path(clip)
    stem = clip.name if clip.is_dir() else clip.name[: -len(clip.suffix) or None]
    candidates = [clip.parent / f"{stem}{MASK_TAG}"] + [clip.parent / f"{stem}{MASK_TAG}{s}" for s in VIDEO_SUFFIXES]
    found = next((c for c in candidates if c.exists()), None)
    if found is None:
        raise ClipError(f"clip '{clip.name}' has no subject masks beside it; add '{stem}{MASK_TAG}.mp4' "
                        f"(white = the subject) or a frame folder '{stem}{MASK_TAG}/'.")
    try:
        masks = load_clip(found, frames, stride, size).max(axis=-1).astype(np.float32) / 255.0
    except ClipError as err:
        raise ClipError(f"the masks of '{clip.name}' are unusable: {str(err).rstrip('.')}.") from None
    if masks.max() < 0.5:
        raise ClipError(f"the masks '{found.name}' are empty; paint the subject white on black.")
    return masks


def load_clips(sources: str | Path | Sequence[str | Path], frames: int = 16, stride: int = 1,
               size: tuple[int, int] = (32, 32), on_error: str = "skip", masks: bool = False) -> ClipSet:
    """All clips of a folder (videos and frame sub-folders) or of a list of uploaded paths.

    on_error="skip" turns a bad clip into a warning (a user's ten uploads should not fail for one
    broken file); "raise" raises the first bad clip's ClipError. masks=True also reads each clip's
    subject masks from beside it (`clip_masks`), for an M-MIVA; a clip without them is a bad clip."""
    _check_args(frames, stride, size)
    paths, notes, where = _collect(sources, VIDEO_SUFFIXES, "clips", on_error)
    result = ClipSet(masks=[] if masks else None)

    def items() -> Iterator[tuple[Path, ClipError]]:
        for p in paths:
            try:
                clip = load_clip(p, frames, stride, size)
                subject = clip_masks(p, frames, stride, size) if masks else None
            except ClipError as err:
                yield p, err
                continue
            result.clips.append(clip)
            result.names.append(p.name)
            if masks:
                result.masks.append(subject)

    return _gather(items(), on_error, where, notes, result, "video files or frame folders")


def camera_clips(stills: str | Path | Sequence[str | Path], motion: str, per_still: int = 5,
                 frames: int = 16, size: tuple[int, int] = (32, 32), seed: int = 0,
                 on_error: str = "skip") -> ClipSet:
    """The paper's camera-motion recipe: each still becomes `per_still` clips of smooth random crops
    (a pan or zoom window). Still i uses seed + i, so the set is reproducible and order-stable."""
    _check_args(frames, 1, size)
    if int(per_still) < 1:
        raise ClipError(f"per_still must be at least 1, not {per_still}; pass a positive number of crops.")
    short = {m.removeprefix("camera-"): m for m in CAMERA_MOTIONS}
    name = short.get(motion, motion)
    if name not in CAMERA_MOTIONS:
        raise ClipError(f"camera motion {motion!r} is unknown; choose one of {', '.join(CAMERA_MOTIONS)} "
                        f"(or {', '.join(short)}).")
    paths, notes, where = _collect(stills, IMAGE_SUFFIXES, "stills", on_error)
    height, width = int(size[0]), int(size[1])
    result = ClipSet()

    def items() -> Iterator[tuple[Path, ClipError]]:
        for index, p in enumerate(paths):
            try:
                image = np.asarray(load_image(p))
            except (ValueError, OSError) as err:
                yield p, ClipError(str(err))
                continue
            # The crops are square (side max(H, W)); a cover-fit to (H, W) then only centre-crops.
            for k, clip in enumerate(camera_clips_from_still(image, name, per_still, seed + index,
                                                             frames=frames, size=max(height, width))):
                out = clip.frames
                if out.shape[1:3] != (height, width):
                    out = np.stack([_uniform(f, size) for f in out])
                result.clips.append(out)
                result.names.append(f"{p.stem}-crop{k}")

    return _gather(items(), on_error, where, notes, result, ".png, .jpg, .jpeg or .webp stills")


def clips_to_tensor(clips: ClipSet | Sequence[np.ndarray]) -> torch.Tensor:
    """(n, F, H, W, 3) uint8 clips -> (n, 3, F, H, W) float in [-1, 1], the VAE's input range
    (same mapping as media.image_to_tensor, so training and inference see identical pixels)."""
    arrays = clips.clips if isinstance(clips, ClipSet) else list(clips)
    if not arrays:
        raise ClipError("no clips were given; load at least one clip first.")
    shapes = {np.shape(a) for a in arrays}
    if len(shapes) != 1 or len(next(iter(shapes))) != 4 or next(iter(shapes))[-1] != 3:
        raise ClipError(f"clips must all be (F, H, W, 3) of one shape, not {sorted(shapes)}; "
                        "load them with the same frames and size.")
    batch = torch.from_numpy(np.stack([np.asarray(a, dtype=np.uint8) for a in arrays]))
    return (batch.float() / 127.5 - 1.0).permute(0, 4, 1, 2, 3).contiguous()
