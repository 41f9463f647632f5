"""How well the toy base draws: sample it with no adapter from toy first frames and measure the frames.

    python benchmarks/toy_base_quality.py [--weights assets/toy-base] [--n 20] [--steps 25]

Per split (train-world stills and held-out stills): `coherence` = fraction of frames holding exactly
one object of plausible size (miva.metrics.coherence), `shape_kept` = fraction of frames whose
object area stays within 0.6x-1.6x of frame 0's, and the motion the base happens to produce.
Writes a grid of sampled clips (GIF) to --grid. Last line: `coherence X shape_kept Y` (train split).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from miva import metrics  # noqa: E402
from miva.media import save_video  # noqa: E402
from miva.pipeline import MivaPipeline  # noqa: E402
from miva.toy.base import ASSET, load_toy  # noqa: E402
from miva.toy.world import WorldConfig, make_still  # noqa: E402


def shape_kept(frames: np.ndarray) -> float:
    """Fraction of frames whose largest foreground component keeps 0.6x-1.6x of frame 0's area."""
    masks = metrics.object_masks(frames)  # (F, K, H, W)
    if masks.shape[1] == 0:
        return 0.0
    areas = masks.sum(axis=(2, 3)).max(axis=1).astype(float)  # (F,)
    if areas[0] == 0:
        return 0.0
    ratio = areas / areas[0]
    return float(np.mean((ratio >= 0.6) & (ratio <= 1.6)))


def grid(clips: list[np.ndarray], columns: int = 5) -> np.ndarray:
    """(F, rows*H, columns*W, 3) tiles of clips, for a GIF to look at."""
    f, h, w, _ = clips[0].shape
    rows = -(-len(clips) // columns)
    out = np.zeros((f, rows * h, columns * w, 3), np.uint8)
    for i, clip in enumerate(clips):
        r, c = divmod(i, columns)
        out[:, r * h : (r + 1) * h, c * w : (c + 1) * w] = clip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, default=ASSET)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--grid", type=Path, default=Path("toy-base-samples.gif"))
    args = parser.parse_args()
    pipe = MivaPipeline(load_toy(args.weights))
    world = WorldConfig(size=32, frames=16)
    result = {}
    for split in ("train", "heldout"):
        clips, coherence, kept, motions = [], [], [], Counter()
        start = time.perf_counter()
        for i in range(args.n):
            seed = 10_000_000 + i  # base training draws train-split seeds 0..steps*batch, never these
            frames = pipe(make_still(seed, world, split=split), num_inference_steps=args.steps, seed=i).frames
            clips.append(frames)
            coherence.append(metrics.coherence(frames))
            kept.append(shape_kept(frames))
            motions[metrics.classify_motion(frames)] += 1
        seconds = (time.perf_counter() - start) / args.n
        result[split] = (float(np.mean(coherence)), float(np.mean(kept)))
        print(f"{split:8s} coherence {result[split][0]:.3f}  shape_kept {result[split][1]:.3f}  "
              f"{seconds:.2f} s/clip  motions: {dict(motions.most_common(6))}")
        if split == "train":
            save_video(grid(clips), args.grid, fps=8)
    print(f"coherence {result['train'][0]:.3f} shape_kept {result['train'][1]:.3f}")


if __name__ == "__main__":
    main()
