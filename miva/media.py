"""Reading first frames and writing videos (imageio + imageio-ffmpeg, whose wheel ships ffmpeg; PIL for WebP)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_IMAGE_BYTES = 25 * 2**20  # an uploaded first frame larger than this is refused
MAX_IMAGE_PIXELS = 40_000_000  # ~ 8K x 5K; also guards PIL against decompression bombs


def load_image(image) -> Image.Image:
    """A first frame as an RGB PIL image, from a path, PIL image, numpy array or tensor.

    Arrays: (H, W), (H, W, 1|3|4) uint8 0-255 or float 0-1. Tensors: (3, H, W) or (1, 3, H, W),
    float 0-1 or uint8. Transparency is composited onto white; grayscale becomes RGB.
    """
    if image is None:
        raise ValueError("no first frame was given; pass an image (a path, PIL image, array or tensor).")
    if isinstance(image, (str, Path)):
        image = open_image(image)
    elif isinstance(image, torch.Tensor):
        image = _tensor_to_array(image)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(_array_to_uint8(image))
    if not isinstance(image, Image.Image):
        raise TypeError(f"a first frame must be a path, PIL image, numpy array or tensor, not {type(image).__name__}.")
    _check_pixels(image.size, "the image")
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "P", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(canvas, rgba)
    return image.convert("RGB")


def open_image(path: str | Path, what: str = "image") -> Image.Image:
    """A PIL image from a file, as stored (mode unchanged), refused in one sentence if it is missing,
    unreadable, over MAX_IMAGE_BYTES or over MAX_IMAGE_PIXELS."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file '{path}' does not exist; check the path.")
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise ValueError(f"{what} '{path.name}' is larger than {MAX_IMAGE_BYTES // 2**20} MB; use a smaller file.")
    try:
        with Image.open(path) as opened:
            _check_pixels(opened.size, path.name)
            opened.load()
            return opened.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as err:
        article = "an" if what[0] in "aeiou" else "a"
        raise ValueError(f"could not read '{path.name}' as {article} {what} ({err}); use a PNG, JPEG or WebP file.") from None


def _check_pixels(size: tuple[int, int], name: str) -> None:
    width, height = size
    if width < 1 or height < 1 or width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"{name} is {width}x{height} pixels; use an image of at most {MAX_IMAGE_PIXELS // 10**6} megapixels.")


def _tensor_to_array(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.ndim == 4 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3, 4):
        raise ValueError(f"an image tensor must be (3, H, W) or (1, 3, H, W), not {tuple(tensor.shape)}.")
    return tensor.permute(1, 2, 0).numpy()


def _array_to_uint8(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"an image array must be (H, W), (H, W, 3) or (H, W, 4), not {array.shape}.")
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("the image array holds NaN or infinite values; pass finite values from 0 to 1.")
        return (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    raise ValueError(f"an image array must be uint8 (0-255) or float (0-1), not {array.dtype}.")


def fit_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize to cover width x height, then centre-crop: no distortion, no borders."""
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (1, 3, H, W) float in [-1, 1], the VAE's input range."""
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return array.permute(2, 0, 1)[None]


VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".gif", ".webp")  # what `save_video` writes
WEBP_QUALITY = 90  # lossy animated WebP: a fraction of the lossless size, differences of a few levels


def check_video_path(path: str | Path) -> Path:
    """`path` if `save_video` can write it (by its suffix), else a one-sentence ValueError."""
    path = Path(path)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"cannot write video '{path.name}'; use a file name ending in {', '.join(VIDEO_SUFFIXES)}.")
    return path


def save_video(frames: np.ndarray, path: str | Path, fps: int = 8) -> Path:
    """Write (F, H, W, 3) uint8 frames as .mp4 / .mov (H.264), .webm (VP9), .gif or animated .webp,
    chosen by the file's suffix; other suffixes are refused before anything is written.

    WebP is lossy at quality 90 and loops forever. Its encoder (libwebp) stores consecutive frames that
    do not differ (within a level or two at this quality) once, with their durations summed: the video
    plays the same but may hold fewer frames."""
    import imageio.v2 as imageio

    path = check_video_path(path)
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.asarray(frames)
    if suffix == ".gif":
        imageio.mimwrite(path, list(frames), format="GIF", duration=1000 / fps, loop=0)
    elif suffix == ".webp":
        first, *rest = (Image.fromarray(frame) for frame in frames)
        first.save(path, format="WEBP", save_all=True, append_images=rest, duration=round(1000 / fps), loop=0,
                   quality=WEBP_QUALITY, method=4)
    else:
        # yuv420p needs even sides; pad by edge replication rather than let ffmpeg rescale.
        pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
        if pad_h or pad_w:
            frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        codec = "libvpx-vp9" if suffix == ".webm" else "libx264"
        with imageio.get_writer(path, format="FFMPEG", fps=fps, codec=codec, macro_block_size=1,
                                pixelformat="yuv420p", output_params=["-crf", "18"]) as writer:
            for frame in frames:
                writer.append_data(frame)
    return path
