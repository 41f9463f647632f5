"""Masks from a text phrase: Grounding DINO finds the phrase, SAM 2 segments and tracks it.

For regional motion the user types what should move ("the red square"); `TextSegmenter` returns a
boolean mask per frame at the frame's own size. Both models are the `transformers` ports of the Hub
checkpoints (`GroundingDinoForObjectDetection`; `Sam2Model` for one image and `Sam2VideoModel` with
its inference-session API for a clip), loaded lazily on first use through `from_pretrained` with
safetensors only and no remote code. `detector` / `segmenter` are Hub ids or local folders in the Hub
layout; offline, a model that is neither a folder nor in the Hugging Face cache raises
`SegmentationUnavailable`. `text_mask` is the one text -> mask call the CLI and the Studio share
(one phrase on one image, with a process-wide segmenter made on first use). `save_mask` writes a
mask as a PNG file (white = region), which `miva.masks.fit_mask` reads back.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .media import load_image

DETECTOR = "IDEA-Research/grounding-dino-tiny"
SEGMENTER = "facebook/sam2.1-hiera-tiny"
MAX_BOXES = 16  # the highest-scoring detections kept; each is one SAM 2 prompt (one tracked object in a clip)
MAX_PHRASE = 200  # characters of a text phrase for a mask


class SegmentationUnavailable(RuntimeError):
    """The detector or segmenter weights cannot be loaded (offline and not cached, or a broken folder)."""


class NothingFound(ValueError):
    """The phrase matched nothing in the first frame."""


class _DropSam2VideoNotice(logging.Filter):
    """Loading the Hub's `sam2_video` checkpoint into `Sam2Model` is how that repo is meant to be used
    (transformers maps sam2_video -> Sam2Model for mask generation), yet every load warns about the
    model type; drop that one notice and keep every other message (e.g. missing weights)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "to instantiate a model of type" not in record.getMessage()


@contextlib.contextmanager
def _without_model_type_notice():
    logger = logging.getLogger("transformers.configuration_utils")
    notice = _DropSam2VideoNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def _hub_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError

    # OSError covers LocalEntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled and transformers'
    # own "couldn't connect / no file named ..." errors; a missing local path fails repo-id validation.
    return (OSError, EntryNotFoundError, HFValidationError)


def _causes(err: BaseException):
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


def _unavailable(name: str, err: BaseException) -> SegmentationUnavailable:
    from huggingface_hub.errors import RepositoryNotFoundError

    if Path(name).is_dir():
        return SegmentationUnavailable(
            f"the model folder '{name}' cannot be loaded because it lacks files of the Hub layout "
            "(config.json, model.safetensors and the processor files); download the model again or pass another folder."
        )
    if any(isinstance(cause, RepositoryNotFoundError) for cause in _causes(err)):  # online, but no such repo
        return SegmentationUnavailable(
            f"the text-segmentation model '{name}' is neither a local folder nor a model on the Hugging Face Hub "
            "that this machine may read; check the name (gated models need a login) or pass the folder that holds its files."
        )
    return SegmentationUnavailable(
        f"the text-segmentation model '{name}' is not available offline (it is not a local folder and not in "
        "the Hugging Face cache); run once with network access to download it, or pass the folder that holds its files."
    )


def _load(name: str, *loaders):
    """Run `loaders(name)` in order; Hub/cache failures become one `SegmentationUnavailable`."""
    try:
        with _without_model_type_notice():
            return tuple(load(name) for load in loaders)
    except _hub_errors() as err:
        raise _unavailable(name, err) from err


def _frame_image(image) -> Image.Image:
    return load_image(image)  # RGB PIL at the size given, with media's one-sentence errors


def _prompt(text) -> str:
    """Grounding DINO reads lower-case phrases that end with a full stop ("a cat. a dog.")."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the text phrase is empty; describe the region to animate, e.g. 'the red square'.")
    prompt = text.strip().lower()
    return prompt if prompt.endswith(".") else prompt + "."


def _nothing_found(text: str) -> NothingFound:
    return NothingFound(
        f"nothing matching '{text.strip()}' was found in the first frame; rephrase it (name the object's colour "
        "or shape, for example) or draw the mask by hand."
    )


class TextSegmenter:
    """Text phrase -> boolean masks, with Grounding DINO boxes prompting SAM 2.

    Models load on first use and stay loaded. `box_threshold` keeps detections whose best token score
    exceeds it; `text_threshold` is the token score that names a detection (passed to
    `post_process_grounded_object_detection`). Every kept box (at most `MAX_BOXES`, best first) is
    segmented and the masks are united.
    """

    def __init__(
        self,
        detector: str | Path = DETECTOR,
        segmenter: str | Path = SEGMENTER,
        device="cpu",
        dtype: torch.dtype = torch.float32,
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
    ):
        self.detector = str(detector)
        self.segmenter = str(segmenter)
        self.device = torch.device(device)
        self.dtype = dtype
        self.box_threshold = float(box_threshold)
        self.text_threshold = float(text_threshold)
        self._lock = threading.Lock()
        self._models: dict[str, tuple] = {}

    # -- lazy loading ------------------------------------------------------------------------------
    def _get(self, key: str):
        with self._lock:
            if key not in self._models:
                self._models[key] = getattr(self, f"_load_{key}")()
            return self._models[key]

    def _ready(self, model):
        model.requires_grad_(False)
        return model.to(device=self.device, dtype=self.dtype).eval()

    def _pair(self, name: str, processor_class, model_class):
        """(processor, frozen model) of `name`, weights from safetensors only."""
        processor, model = _load(name, processor_class.from_pretrained,
                                 lambda repo: model_class.from_pretrained(repo, use_safetensors=True))
        return processor, self._ready(model)

    def _load_detector(self):
        from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor

        return self._pair(self.detector, GroundingDinoProcessor, GroundingDinoForObjectDetection)

    def _load_image_segmenter(self):
        from transformers import Sam2Model, Sam2Processor

        return self._pair(self.segmenter, Sam2Processor, Sam2Model)

    def _load_video_segmenter(self):
        from transformers import Sam2VideoModel, Sam2VideoProcessor

        return self._pair(self.segmenter, Sam2VideoProcessor, Sam2VideoModel)

    # -- detection ---------------------------------------------------------------------------------
    @torch.no_grad()
    def boxes(self, image, text: str) -> np.ndarray:
        """(N, 4) float boxes (x0, y0, x1, y1) in pixels of `image` for `text`, best first; N >= 1.

        Raises `NothingFound` when no detection scores above `box_threshold`.
        """
        prompt = _prompt(text)
        image = _frame_image(image)
        processor, model = self._get("detector")
        inputs = processor(images=image, text=prompt, return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        outputs = model(**inputs)
        outputs.logits, outputs.pred_boxes = outputs.logits.float(), outputs.pred_boxes.float()
        result = processor.post_process_grounded_object_detection(
            outputs,
            inputs["input_ids"],
            threshold=self.box_threshold,
            text_threshold=self.text_threshold,
            target_sizes=[(image.height, image.width)],
        )[0]
        scores, boxes = result["scores"].cpu(), result["boxes"].cpu()
        if len(boxes) == 0:
            raise _nothing_found(text)
        boxes = boxes[scores.argsort(descending=True)][:MAX_BOXES]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, image.width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, image.height)
        return boxes.numpy()

    # -- segmentation ------------------------------------------------------------------------------
    @torch.no_grad()
    def segment_image(self, image, text: str) -> np.ndarray:
        """(H, W) bool mask of `text` in `image` (PIL or array), at the image's own size."""
        image = _frame_image(image)
        boxes = self.boxes(image, text)
        processor, model = self._get("image_segmenter")
        inputs = processor(images=image, input_boxes=[boxes.tolist()], return_tensors="pt")
        outputs = model(
            pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
            input_boxes=inputs["input_boxes"].to(self.device, self.dtype),
            multimask_output=False,  # one mask per box, as SAM is used with box prompts
        )
        masks = processor.post_process_masks(outputs.pred_masks.float().cpu(), inputs["original_sizes"])[0]
        mask = masks.any(dim=(0, 1)).numpy()  # (boxes, 1, H, W) -> union
        if not mask.any():
            raise _nothing_found(text)
        return mask

    @torch.no_grad()
    def segment_video(self, frames: np.ndarray, text: str) -> np.ndarray:
        """(F, H, W) bool masks of `text`: boxes found on frame 0, then SAM 2 video propagation."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
            raise ValueError(
                f"frames must be a (F, H, W, 3) uint8 array with at least one frame, not {frames.shape} {frames.dtype}."
            )
        boxes = self.boxes(frames[0], text)
        processor, model = self._get("video_segmenter")
        session = processor.init_video_session(video=frames, inference_device=self.device, dtype=self.dtype)
        processor.add_inputs_to_inference_session(
            inference_session=session,
            frame_idx=0,
            obj_ids=list(range(1, len(boxes) + 1)),  # one tracked object per box
            input_boxes=[boxes.tolist()],
        )
        height, width = frames.shape[1:3]
        masks = np.zeros((len(frames), height, width), dtype=bool)
        seen = set()
        for output in model.propagate_in_video_iterator(session, start_frame_idx=0):
            per_object = processor.post_process_masks(
                [output.pred_masks.float().cpu()], original_sizes=[[height, width]]
            )[0]
            masks[output.frame_idx] = per_object.any(dim=(0, 1)).numpy()
            seen.add(output.frame_idx)
        if len(seen) != len(frames):  # a transformers change in propagation would otherwise leave silent gaps
            raise RuntimeError(f"SAM 2 propagation returned {len(seen)} of {len(frames)} frames.")
        if not masks[0].any():
            raise _nothing_found(text)
        return masks


_shared: TextSegmenter | None = None
_shared_lock = threading.Lock()


def shared_segmenter() -> TextSegmenter:
    """The process's default `TextSegmenter` (the default models), made on first use; its models load lazily."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = TextSegmenter()
        return _shared


def text_mask(image, text: str, segmenter: TextSegmenter | None = None) -> np.ndarray:
    """An (H, W) bool mask of what `text` names in `image` (a path, PIL image or array), at the image's
    size; phrases past `MAX_PHRASE` characters are refused. `segmenter` None: `shared_segmenter()`."""
    text = text.strip() if isinstance(text, str) else text
    if isinstance(text, str) and len(text) > MAX_PHRASE:
        raise ValueError(f"the phrase is {len(text)} characters long; describe the region in at most {MAX_PHRASE}.")
    return (segmenter or shared_segmenter()).segment_image(image, text)


# -- mask files ------------------------------------------------------------------------------------
def save_mask(mask, path: str | Path) -> Path:
    """Write an (H, W) mask (bool, 0-1 or 0-255) as a greyscale PNG: white (255) = region, black = rest."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"cannot write mask '{path.name}'; use a .png file name.")
    array = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask)
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"a mask must be one (H, W) array, not shape {array.shape}.")
    region = array > 127 if array.dtype == np.uint8 else array.astype(np.float32) > 0.5
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(region.astype(np.uint8) * 255).save(path, format="PNG")
    return path
