"""What the Space does, without the UI: a catalogue of adapters and the animate / mix / train jobs.

`app.py` lays out the page and calls these methods; they take plain values (paths, numbers, names)
and return paths, so the same calls serve the browser, `gradio_client` and tests. Every request
writes into its own temporary folder and gets its own seed; adapter names from requests are looked
up inside the catalogue folders only, never used as paths.
"""

from __future__ import annotations

import json
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .adapter import MAX_WEIGHT, check_adapter_name
from .config import MivaConfig
from .pipeline import ADAPTERS_DIR, MivaPipeline, resolve_adapter

MAX_MIX = 4  # adapters in one mix
MAX_FRAMES = 32
MAX_STEPS = 100
Progress = Callable[[float, str], None]  # (fraction done, message)


@dataclass
class AdapterInfo:
    name: str
    motion: str
    base: str
    folder: Path
    preview: Path | None
    trained: bool  # trained in this Studio (vs. shipped)


class Studio:
    """One base model, its adapter catalogue, and the jobs users run on it."""

    def __init__(self, pipe: MivaPipeline, shipped: Path = ADAPTERS_DIR, workdir: str | Path | None = None):
        self.pipe = pipe
        self.shipped = Path(shipped)
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="miva-studio-"))
        self.trained = self.workdir / "adapters"
        self.trained.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()  # one model job at a time: the pipeline's adapter weights are shared
        self.stop = threading.Event()  # set by the UI's Stop button; a training run checkpoints and returns

    # -- catalogue -------------------------------------------------------------------------------
    def catalogue(self) -> list[AdapterInfo]:
        """Adapters for this base: shipped ones, then ones trained here (a trained name wins)."""
        found: dict[str, AdapterInfo] = {}
        for folder, trained in ((self.shipped, False), (self.trained, True)):
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                try:
                    config = MivaConfig.load(path)
                except (FileNotFoundError, ValueError, TypeError, NotADirectoryError):
                    continue
                if config.base != self.pipe.base.id:
                    continue
                preview = path / "preview.gif"
                found[path.name] = AdapterInfo(path.name, config.motion or path.name, config.base, path,
                                               preview if preview.is_file() else None, trained)
        return list(found.values())

    def resolve(self, name: str) -> Path:
        """A catalogue name -> its folder; anything else is refused with the known names."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError("choose an adapter from the catalogue.")
        return resolve_adapter(name.strip(), search=(self.trained, self.shipped), allow_paths=False)

    def describe(self) -> list[dict]:
        return [{"name": a.name, "motion": a.motion, "base": a.base, "trained_here": a.trained}
                for a in self.catalogue()]

    def request_stop(self) -> None:
        self.stop.set()

    # -- jobs ------------------------------------------------------------------------------------
    def _out(self, stem: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{stem}-", dir=self.workdir)) / f"{stem}.mp4"

    def animate(self, image, mix: dict[str, float], frames: int = 16, steps: int = 25, seed: int = 0,
                shared_noise: float = 0.05, dct_init: bool = True, adain: bool = True, guidance: float = 1.0,
                progress: Progress | None = None) -> Path:
        """Animate `image` with {adapter name: weight}: none (the base alone), one, or up to 4 mixed."""
        if image is None:
            raise ValueError("upload a first frame (an image) to animate.")
        if len(mix) > MAX_MIX:
            raise ValueError(f"{len(mix)} adapters were given; mix at most {MAX_MIX}.")
        frames, steps, seed = int(frames), int(steps), int(seed)
        if not 2 <= frames <= MAX_FRAMES or not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"use 2 to {MAX_FRAMES} frames and 1 to {MAX_STEPS} steps.")
        for name, weight in mix.items():
            if not 0 <= float(weight) <= MAX_WEIGHT:
                raise ValueError(f"the weight of '{name}' is {weight}; use a number from 0 to {MAX_WEIGHT:g}.")
        folders = {name: self.resolve(name) for name in mix}
        with self.lock:
            weights = {}
            for name, folder in folders.items():
                key = f"{'t' if folder.parent == self.trained else 's'}-{check_adapter_name(name)}"
                weights[self.pipe.load_adapter(folder, name=key)] = float(mix[name])
            callback = (lambda i, n: progress(i / n, f"denoising step {i}/{n}")) if progress else None
            out = self.pipe(image, adapters=weights, num_frames=frames, num_inference_steps=steps, seed=seed,
                            shared_noise_ratio=float(shared_noise), dct_init=bool(dct_init), adain=bool(adain),
                            guidance_scale=float(guidance), callback=callback)
        return out.save(self._out("miva"))

    def train(self, clips: list, motion: str, steps: int = 300, resume: bool = False, chunk_steps: int | None = None,
              progress: Callable[[int, int, float, float], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> tuple[Path | None, dict]:
        """Train a new adapter named `motion` from uploaded clips.

        With `chunk_steps`, at most that many steps run in this call and the run checkpoints, so a
        time-limited GPU finishes it over several calls (`resume=True`). Returns (adapter folder or
        None while unfinished, status dict with step/steps/losses/warnings).
        """
        from . import data
        from .train import CHECKPOINT_DIR, train_adapter

        name = check_adapter_name((motion or "").strip().lower().replace(" ", "-"))
        out = self.trained / name
        if (out / "adapter_model.safetensors").is_file():
            raise ValueError(f"an adapter named '{name}' was already trained here; pick another motion name.")
        if (out / CHECKPOINT_DIR).is_dir() and not resume:
            raise ValueError(f"a run for '{name}' is unfinished; press Resume to continue it or pick another name.")
        base = self.pipe.base
        clipset = data.load_clips([Path(c) for c in clips or []], frames=base.frames, size=(base.height, base.width))
        steps = int(steps)
        losses = _checkpoint_losses(out) if resume else []
        stop_at = min(steps, len(losses) + int(chunk_steps)) if chunk_steps else steps

        def chunked_stop() -> bool:
            return len(losses) >= stop_at or self.stop.is_set() or (should_stop is not None and should_stop())

        def count(step, total, loss, eta):
            losses.append(loss)
            if progress is not None:
                progress(step, total, loss, eta)

        with self.lock:
            self.stop.clear()
            folder = train_adapter(self.pipe, clipset.clips, out, motion, name=name, steps=steps, resume=resume,
                                   callback=count, should_stop=chunked_stop, sources=clipset.names)
        return folder, {"name": name, "step": len(losses), "steps": steps, "warnings": clipset.warnings,
                        "losses": losses}


def _checkpoint_losses(out: Path) -> list[float]:
    """The losses of the steps an unfinished run in `out` has checkpointed (one per step)."""
    state = out / "checkpoint" / "state.json"
    return list(json.loads(state.read_text())["losses"]) if state.is_file() else []
