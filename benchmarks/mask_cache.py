"""What M-MIVA's mask-step cache saves, and what it costs in quality. Side by side in one run.

    python benchmarks/mask_cache.py [--steps 50] [--n 3] [--tolerance 0.01] [--adapter FOLDER]

On the toy base, with one M-MIVA (a shipped/trained one via --adapter, else a freshly attached one
with small random weights, which has the real cost), the same held-out first frames and seeds are
sampled five ways, interleaved so machine noise hits all alike:
  base        the base alone (no adapter)
  miva        a plain MIVA of the same shape (random weights): the floor a mask cache can approach
  uncached    M-MIVA, masks regenerated at every step (the mask stream runs every step)
  paper       M-MIVA, masks regenerated at the paper's steps {0, 5, ..., 35} of 50 (scaled)
  settled     as `paper`, but no more mask steps once the predicted masks change less than
              --tolerance (mean |dS| between two mask steps): the pipeline's `mask_tolerance`
Quality of each cached schedule against `uncached`: IoU of the final predicted masks (at 0.5) and the
mean absolute difference of the videos' frames (0-255). Last line: `cached_ratio X` (settled / base).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from miva.adapter import attach  # noqa: E402
from miva.config import MivaConfig  # noqa: E402
from miva.pipeline import MivaPipeline  # noqa: E402
from miva.toy.base import load_toy  # noqa: E402
from miva.toy.world import make_clip  # noqa: E402


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a > 0.5, b > 0.5
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--n", type=int, default=3, help="held-out first frames")
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--adapter", type=Path, default=None, help="a trained M-MIVA folder (default: random)")
    args = parser.parse_args()
    torch.manual_seed(0)
    pipe = MivaPipeline(load_toy())
    if args.adapter is not None:
        name = pipe.load_adapter(args.adapter)
        if not pipe.adapters[name].masked:
            sys.exit(f"{args.adapter} is a plain MIVA; give an M-MIVA (masked) adapter folder.")
    else:
        name = "m"
        manager = attach(pipe.base.unet, MivaConfig(base=pipe.base.id, masked=True), name)
        with torch.no_grad():
            for p in manager.parameters(name).values():
                p.normal_(0, 0.02)
    attach(pipe.base.unet, MivaConfig(base=pipe.base.id), "plain")
    clips = [make_clip("move-left", seed, split="heldout") for seed in range(args.n)]
    runs = {"base": dict(adapters={}), "miva": dict(adapters={"plain": 1.0}), "uncached": dict(mask_steps="all"),
            "paper": dict(), "settled": dict(mask_tolerance=args.tolerance)}
    times = {k: [] for k in runs}
    outputs = {k: [] for k in runs}
    for clip in clips:
        first, subject = clip.frames[0], clip.masks[0, 0].astype(np.float32)
        for kind, extra in runs.items():
            kwargs = dict(adapters={name: 1.0}, masks={name: subject}, num_inference_steps=args.steps, seed=clip.seed)
            kwargs.update(extra)
            if name not in kwargs["adapters"]:
                kwargs.pop("masks")
            start = time.perf_counter()
            outputs[kind].append(pipe(first, **kwargs))
            times[kind].append(time.perf_counter() - start)
    base = statistics.median(times["base"])
    print(f"toy base, {args.steps} DDIM steps, 16 frames, {args.n} held-out first frames, "
          f"{'adapter ' + str(args.adapter) if args.adapter else 'random M-MIVA weights'}, CPU {torch.get_num_threads()} threads")
    print(f"{'run':<10} {'seconds':>8} {'ratio':>6} {'mask steps':>10} {'mask IoU':>9} {'frame diff':>10}")
    for kind in runs:
        seconds = statistics.median(times[kind])
        passes = statistics.mean(o.mask_passes for o in outputs[kind])
        quality = ""
        if kind in ("paper", "settled"):
            ious = [iou(o.subject_masks[name][1:], u.subject_masks[name][1:]) for o, u in zip(outputs[kind], outputs["uncached"])]
            diffs = [np.abs(o.frames.astype(float) - u.frames.astype(float)).mean() for o, u in zip(outputs[kind], outputs["uncached"])]
            quality = f"{statistics.mean(ious):>9.3f} {statistics.mean(diffs):>10.2f}"
        print(f"{kind:<10} {seconds:>8.2f} {seconds / base:>6.3f} {passes:>10.1f} {quality}")
    print(f"cached_ratio {statistics.median(times['settled']) / base:.3f}")


if __name__ == "__main__":
    main()
