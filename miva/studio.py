"""What the Space does, without the UI: a catalogue of adapters and the animate / mix / train jobs.

`app.py` lays out the page and calls these methods; they take plain values (paths, numbers, names,
a mix as a JSON list) and return paths, so the same calls serve the browser, `gradio_client` and
tests; the errors in `USER_ERRORS` carry one sentence for the user. Every request
writes into its own temporary folder and gets its own seed; adapter names from requests are looked
up inside the catalogue folders only, never used as paths.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from .adapter import MAX_WEIGHT, check_adapter_name
from .config import MivaConfig
from .catalogue import ADAPTERS_DIR
from .media import load_image, open_image
from .pipeline import MivaPipeline
from .segment import SegmentationUnavailable

MAX_MIX = 4  # adapters in one mix
MAX_STEPS = 100
MIX_KEYS = ("adapter", "weight", "phrase", "mask")  # the fields of one motion of a mix
MIX_EXAMPLE = '[{"adapter": "move-left", "weight": 1.0, "phrase": "the red square"}]'
# what a user got wrong (or a model that cannot be fetched): the message is the answer to show
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, ConnectionError, SegmentationUnavailable)
Progress = Callable[[float, str], None]  # (fraction done, message)
# Rough GPU seconds, for a Space's time-limited GPU: (fixed, per frame x sampling step, per training step).
GPU_COST = {"animatediff-v3": (20.0, 0.02, 0.6)}
DEFAULT_GPU_COST = (10.0, 0.01, 0.3)
REGION_COLOURS = np.array([(0, 0, 0), (230, 60, 60), (60, 140, 240), (250, 200, 40), (80, 200, 120)], np.uint8)


@dataclass
class AdapterInfo:
    name: str
    motion: str
    base: str
    folder: Path
    preview: Path | None
    trained: bool  # trained in this Studio (vs. shipped)
    source: str = "local"  # "local" (shipped or trained here) or the Hub repo id it came from
    masked: bool = False  # an M-MIVA: it needs its subject's region (Mix tab) or phrase

    @property
    def label(self) -> str:
        """How the UI names it: the motion, and whether it is an M-MIVA."""
        return f"{self.motion} · M-MIVA" if self.masked else self.motion


class Studio:
    """One base model, its adapter catalogue, and the jobs users run on it."""

    def __init__(self, pipe: MivaPipeline, shipped: Path = ADAPTERS_DIR, workdir: str | Path | None = None,
                 collection: str | None = None, segmenter=None):
        self.pipe = pipe
        self.collection = collection
        self.hub: dict[str, tuple[str, Path]] = {}  # name -> (repo id, cached folder)
        self.hub_status = "no Hub collection is set: local adapters only." if not collection else ""
        self._segmenter = segmenter  # a miva.segment.TextSegmenter, made on first use
        self.shipped = Path(shipped)
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="miva-studio-"))
        self.trained = self.workdir / "adapters"
        self.trained.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()  # one model job at a time: the pipeline's adapter weights are shared
        # Training runs and Stop requests are marker files, not in-memory flags: on a ZeroGPU Space the
        # run executes in a process forked by `spaces.GPU`, which sees files but not this object's memory.
        self.runs = self.workdir / "runs"
        self.runs.mkdir(exist_ok=True)

    @classmethod
    def from_base(cls, backend: str, collection: str | None = None, **kwargs) -> Studio:
        """A Studio on the base `backend` with the adapters of the Hub collection `collection` (None:
        $MIVA_COLLECTION, if set) fetched."""
        from .hub import collection_id

        studio = cls(MivaPipeline.from_base(backend), collection=collection_id(collection), **kwargs)
        studio.refresh_hub()
        return studio

    # -- time on a GPU ----------------------------------------------------------------------------
    def gpu_seconds(self, frames: int = 16, steps: int = 25, adapters: int = 1, guidance: float = 1.0,
                    masked: int = 0) -> int:
        """An upper estimate of one animate call's GPU time (a Space asks for this much); `masked` of the
        adapters are M-MIVAs (a mix with them is composited: one UNet pass per M-MIVA, one for the rest)."""
        fixed, per_frame_step, _ = GPU_COST.get(self.pipe.base.id, DEFAULT_GPU_COST)
        passes = masked + (adapters > masked) if masked and adapters > 1 else 1
        passes += 1 if guidance != 1 and adapters else 0
        return int(fixed + per_frame_step * int(frames) * int(steps) * passes * (1 + 0.2 * adapters))

    def train_seconds(self, steps: int) -> int:
        fixed, _, per_step = GPU_COST.get(self.pipe.base.id, DEFAULT_GPU_COST)
        return int(fixed * 2 + per_step * int(steps))

    # -- catalogue -------------------------------------------------------------------------------
    def refresh_hub(self) -> str:
        """Fetch the adapters of the Hub collection for this base into the Hub cache; returns a status line."""
        if not self.collection:
            return self.hub_status
        from . import hub

        listing = hub.list_hub_adapters(self.collection, base=self.pipe.base.id)
        fetched, problems = {}, []
        for item in listing.adapters:
            try:
                folder = item.folder or hub.fetch_adapter(item.repo_id, base=self.pipe.base.id)
            except (ValueError, FileNotFoundError, ConnectionError) as err:
                problems.append(f"{item.repo_id}: {err}")
                continue
            fetched[check_adapter_name(item.repo_id.split("/")[-1].lower())] = (item.repo_id, folder)
        self.hub = fetched
        if listing.offline:
            self.hub_status = f"offline: local adapters only ({listing.offline})"
        else:
            self.hub_status = f"{len(fetched)} adapters from the Hub collection {self.collection}." + (
                f" Skipped: {'; '.join(problems)}" if problems else "")
        return self.hub_status

    def catalogue(self) -> list[AdapterInfo]:
        """Adapters for this base: shipped ones, the Hub collection's (which win a shared name), and
        ones trained here (which always win)."""
        found: dict[str, AdapterInfo] = {}
        entries = [(path.name, path, trained, "local") for folder, trained in ((self.shipped, False), (self.trained, True))
                   if folder.is_dir() for path in sorted(folder.iterdir())]
        entries += [(name, folder, False, repo) for name, (repo, folder) in self.hub.items()]
        for name, path, trained, source in entries:
            try:
                config = MivaConfig.load(path)
            except (FileNotFoundError, ValueError, TypeError, NotADirectoryError):
                continue
            if config.base != self.pipe.base.id or (name in found and found[name].trained):
                continue  # another base's adapter; or a name trained here, which is the user's own and stays
            preview = path / "preview.gif"
            found[name] = AdapterInfo(name, config.motion or name, config.base, path,
                                      preview if preview.is_file() else None, trained, source, config.masked)
        return list(found.values())

    def resolve(self, name: str) -> Path:
        """A catalogue name -> its folder; anything else is refused with the known names.

        Names are looked up in the catalogue, never joined to a path, so none can escape its folder."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError("choose an adapter from the catalogue.")
        known = {a.name: a.folder for a in self.catalogue()}
        if name.strip() not in known:
            raise FileNotFoundError(f"adapter '{name.strip()}' was not found; known adapters: {', '.join(sorted(known)) or 'none'}.")
        return known[name.strip()]

    def describe(self) -> list[dict]:
        return [{"name": a.name, "motion": a.motion, "base": a.base, "trained_here": a.trained, "source": a.source,
                 "masked": a.masked} for a in self.catalogue()]

    def push(self, name: str, repo_id: str, token: str | None, private: bool = False) -> str:
        """Upload an adapter trained here (files + card + preview) to a new or existing Hub model repo."""
        from . import hub

        folder = self.resolve(name)
        if folder.parent != self.trained:
            raise ValueError(f"'{name}' was not trained here; push adapters you trained in this session.")
        return hub.push_adapter(folder, (repo_id or "").strip(), token=(token or "").strip() or None, private=private)

    # -- regions ---------------------------------------------------------------------------------
    def segment(self, image, text: str) -> np.ndarray:
        """An (H, W) bool mask of what `text` names in `image`, at the image's size (Grounding DINO + SAM 2)."""
        from .segment import text_mask

        return text_mask(load_image(image), text or "", self._segmenter)

    def segment_file(self, image, text: str) -> Path:
        """`segment`, written as a PNG (white = region) in a fresh folder."""
        from .segment import save_mask

        return save_mask(self.segment(image, text), self.out_path("mask", ".png"))

    def read_mix(self, image, mix, masks=None) -> tuple[dict[str, float], dict[str, object]]:
        """A mix as a client writes it -> ({adapter: weight}, {adapter: mask or phrase}) for `animate`.

        `mix` is a list (or its JSON text) of up to MAX_MIX {"adapter": a catalogue name, "weight": 0 to
        MAX_WEIGHT (default 1), "phrase": text naming the adapter's region, "mask": an index into
        `masks`}, with at most one of phrase and mask (neither: everywhere). `masks` are mask images
        (paths, PIL images or (H, W[, C]) arrays; white or painted = region) at the first frame's size."""
        if isinstance(mix, str):
            try:
                mix = json.loads(mix)
            except json.JSONDecodeError as err:
                raise ValueError(f"the mix is not valid JSON ({err.msg} at character {err.pos}); "
                                 f"write a list such as {MIX_EXAMPLE}.") from None
        if not isinstance(mix, list):
            raise ValueError(f"the mix is a {type(mix).__name__}; give a list of motions such as {MIX_EXAMPLE}.")
        if not mix:
            raise ValueError("choose at least one motion to mix.")
        if len(mix) > MAX_MIX:
            raise ValueError(f"{len(mix)} motions were given; mix at most {MAX_MIX}.")
        masks = list(masks or [])
        weights, regions = {}, {}
        for i, entry in enumerate(mix, start=1):
            if not isinstance(entry, dict):
                raise ValueError(f"motion {i} of the mix is a {type(entry).__name__}; write each as an object "
                                 'such as {"adapter": "move-left", "weight": 1.0}.')
            unknown = sorted(set(entry) - set(MIX_KEYS))
            if unknown:
                raise ValueError(f"motion {i} has the unknown field(s) {', '.join(map(repr, unknown))}; "
                                 f"use {', '.join(MIX_KEYS)}.")
            name = entry.get("adapter")
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f'motion {i} names no adapter; set "adapter" to a name from the catalogue.')
            name = name.strip()
            self.resolve(name)  # an unknown name is refused with the known ones
            if name in weights:
                raise ValueError(f"'{name}' is chosen twice; pick each motion once and set its weight.")
            weight = entry.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= MAX_WEIGHT:
                raise ValueError(f"the weight of '{name}' is {weight!r}; use a number from 0 to {MAX_WEIGHT:g}.")
            phrase, index = entry.get("phrase") or "", entry.get("mask")
            if not isinstance(phrase, str):
                raise ValueError(f"the phrase of motion {i} is a {type(phrase).__name__}; write it as text.")
            if index is not None and phrase.strip():
                raise ValueError(f"motion {i} has both a mask (a drawn region) and a phrase; keep one of them.")
            weights[name] = float(weight)
            if index is not None:
                regions[name] = self._mask(image, masks, index, i)
            elif phrase.strip():
                regions[name] = phrase.strip()
        return weights, regions

    @staticmethod
    def _mask(image, masks: list, index, motion: int):
        """masks[index], checked: an index in range and an image at the first frame's size."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(masks):
            given = f"{len(masks)} mask{'s' if len(masks) != 1 else ''} {'were' if len(masks) != 1 else 'was'} given"
            fix = f"use an index from 0 to {len(masks) - 1}" if masks else "upload the mask image in masks"
            raise ValueError(f"motion {motion} asks for mask {index!r} but {given}; {fix}.")
        if image is None:
            raise ValueError("upload a first frame (an image) to lay the masks on.")
        mask = masks[index]
        if isinstance(mask, (str, Path)):
            mask = open_image(mask, what="mask image")  # an unreadable file is refused in one sentence
        if not isinstance(mask, Image.Image) and np.ndim(mask) not in (2, 3):
            raise ValueError(f"mask {index} is not an image; upload a PNG with the region painted white.")
        width, height = mask.size if isinstance(mask, Image.Image) else np.shape(mask)[1::-1]
        frame = load_image(image).size
        if (width, height) != frame:
            raise ValueError(f"mask {index} is {width}x{height} pixels but the first frame is {frame[0]}x{frame[1]}; "
                             "draw the mask at the first frame's size.")
        return mask

    def mix(self, image, mix, masks=None, frames: int = 16, steps: int = 25, seed: int = 0,
            progress: Progress | None = None) -> Path:
        """Animate `image` with a mix as `read_mix` reads it (the Mix tab's settings for the rest)."""
        weights, regions = self.read_mix(image, mix, masks)
        return self.animate(image, weights, frames, steps, seed, 0.05, None, True, 1.0, progress, regions=regions)

    def preview_mix(self, image, mix, masks=None) -> Image.Image:
        """`preview_regions` of a mix as `read_mix` reads it."""
        return self.preview_regions(image, *self.read_mix(image, mix, masks))

    def region_masks(self, image, regions: dict[str, object]) -> dict[str, object]:
        """{adapter: a drawn mask, or a text phrase to segment} -> {adapter: mask}, drawn masks as given."""
        return {name: self.segment(image, value) if isinstance(value, str) else value
                for name, value in regions.items() if value is not None}

    def preview_regions(self, image, mix: dict[str, float], regions: dict[str, object]) -> Image.Image:
        """The first frame with the unified mask of a mix laid over it (eq. S5), as the sampler will use it:
        colour j = the j-th masked adapter, uncoloured = the background (unmasked adapters act there)."""
        if image is None:
            raise ValueError("upload a first frame (an image) to draw regions on.")
        base = self.pipe.base
        unified = self.pipe.unified_regions(mix, self.region_masks(image, regions), 1, base.height, base.width)
        if unified is None:
            raise ValueError("no region was drawn or described; draw on the first frame or type a phrase.")
        frame = np.asarray(self.pipe.prepare_first_frame(image, base.height, base.width)[0].permute(1, 2, 0))
        frame = ((frame + 1) * 127.5).clip(0, 255)
        index = unified[0].numpy()
        colours = REGION_COLOURS[np.minimum(index, len(REGION_COLOURS) - 1)].astype(np.float32)
        alpha = (index > 0)[..., None] * 0.55
        return Image.fromarray((frame * (1 - alpha) + colours * alpha).astype(np.uint8))

    def _marker(self, owner: str | None, kind: str) -> Path:
        return self.runs / f"{hashlib.sha256(str(owner).encode()).hexdigest()[:16]}.{kind}"

    def request_stop(self, owner: str | None = None) -> bool:
        """Ask the training runs of `owner` (the app passes the page's session; None: every run) to
        checkpoint after their current step and return; False when none was under way."""
        running = [self._marker(owner, "running")] if owner is not None else sorted(self.runs.glob("*.running"))
        running = [marker for marker in running if marker.exists()]
        for marker in running:
            marker.with_suffix(".stop").touch()
        return bool(running)

    # -- jobs ------------------------------------------------------------------------------------
    def out_path(self, stem: str, suffix: str = ".mp4") -> Path:
        """A fresh file path in its own temporary folder: no two requests share one."""
        return Path(tempfile.mkdtemp(prefix=f"{stem}-", dir=self.workdir)) / f"{stem}{suffix}"

    def animate(self, image, mix: dict[str, float], frames: int = 16, steps: int = 25, seed: int = 0,
                shared_noise: float = 0.05, dct_init: bool | None = None, adain: bool = True, guidance: float = 1.0,
                progress: Progress | None = None, regions: dict[str, object] | None = None) -> Path:
        """Animate `image` with {adapter name: weight}: none (the base alone), one, or up to 4 mixed;
        `regions` confines adapters: {name: a drawn mask or a text phrase}; `dct_init` None: the base's default."""
        if image is None:
            raise ValueError("upload a first frame (an image) to animate.")
        if len(mix) > MAX_MIX:
            raise ValueError(f"{len(mix)} adapters were given; mix at most {MAX_MIX}.")
        frames, steps, seed = int(frames), int(steps), int(seed)
        self.pipe.base.check_frames(frames)  # the base's own limits (Wan: 4k + 1 frames)
        if not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"steps is {steps}; use 1 to {MAX_STEPS} steps.")
        for name, weight in mix.items():
            if not 0 <= float(weight) <= MAX_WEIGHT:
                raise ValueError(f"the weight of '{name}' is {weight}; use a number from 0 to {MAX_WEIGHT:g}.")
        folders = {name: self.resolve(name) for name in mix}
        for name, folder in folders.items():
            if mix[name] and MivaConfig.load(folder).masked and (regions or {}).get(name) is None:
                raise ValueError(f"'{name}' is an M-MIVA and moves only its subject: in the Mix tab, paint the "
                                 "subject on the first frame or describe it in its row.")
        masks = self.region_masks(image, regions or {})
        with self.lock:
            weights, keys = {}, {}
            for name, folder in folders.items():
                source = "t" if folder.parent == self.trained else "s" if folder.parent == self.shipped else "h"
                keys[name] = self.pipe.load_adapter(folder, name=f"{source}-{check_adapter_name(name)}")
                weights[keys[name]] = float(mix[name])
            callback = (lambda i, n: progress(i / n, f"denoising step {i}/{n}")) if progress else None
            out = self.pipe(image, adapters=weights, num_frames=frames, num_inference_steps=steps, seed=seed,
                            shared_noise_ratio=float(shared_noise), dct_init=None if dct_init is None else bool(dct_init), adain=bool(adain),
                            guidance_scale=float(guidance), callback=callback,
                            masks={keys.get(name, name): mask for name, mask in masks.items()})
        return out.save(self.out_path("miva"))

    def train(self, clips: list, motion: str, steps: int = 300, resume: bool = False, chunk_steps: int | None = None,
              progress: Callable[[int, int, float, float], None] | None = None,
              should_stop: Callable[[], bool] | None = None, owner: str | None = None) -> tuple[Path | None, dict]:
        """Train a new adapter named `motion` from uploaded clips; `request_stop(owner)` stops it.

        With `chunk_steps`, at most that many steps run in this call and the run checkpoints, so a
        time-limited GPU finishes it over several calls (`resume=True`). Returns (adapter folder or
        None while unfinished, status dict with step/steps/losses/warnings).
        """
        from . import data
        from .loop import CHECKPOINT_DIR
        from .train import train_adapter

        name = check_adapter_name((motion or "").strip().lower().replace(" ", "-"))
        out = self.trained / name
        if (out / "adapter_model.safetensors").is_file():
            raise ValueError(f"an adapter named '{name}' was already trained here; pick another motion name.")
        if (out / CHECKPOINT_DIR).is_dir() and not resume:
            raise ValueError(f"a run for '{name}' is unfinished; press Resume to continue it or pick another name.")
        # registered before the clips are decoded, so a Stop pressed from now on is never lost
        running, stop = self._marker(owner, "running"), self._marker(owner, "stop")
        stop.unlink(missing_ok=True)  # a Stop pressed before this run began is not for it
        running.touch()
        try:
            base = self.pipe.base
            clipset = data.load_clips([Path(c) for c in clips or []], frames=base.frames,
                                      size=(base.height, base.width))
            steps = int(steps)
            losses = _checkpoint_losses(out) if resume else []
            stop_at = min(steps, len(losses) + int(chunk_steps)) if chunk_steps else steps

            def chunked_stop() -> bool:
                return len(losses) >= stop_at or stop.exists() or (should_stop is not None and should_stop())

            def count(step, total, loss, eta):
                losses.append(loss)
                if progress is not None:
                    progress(step, total, loss, eta)

            with self.lock:
                folder = train_adapter(self.pipe, clipset.clips, out, motion, name=name, steps=steps,
                                       resume=resume, callback=count, should_stop=chunked_stop,
                                       sources=clipset.names)
        finally:
            running.unlink(missing_ok=True)
            stop.unlink(missing_ok=True)
        return folder, {"name": name, "step": len(losses), "steps": steps, "warnings": clipset.warnings,
                        "losses": losses}


def _checkpoint_losses(out: Path) -> list[float]:
    """The losses of the steps an unfinished run in `out` has checkpointed (one per step)."""
    state = out / "checkpoint" / "state.json"
    return list(json.loads(state.read_text())["losses"]) if state.is_file() else []
