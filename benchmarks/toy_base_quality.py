"""How well the toy base draws: sample it with no adapter from toy first frames and measure the frames.

    python benchmarks/toy_base_quality.py [--weights assets/toy-base] [--n 20] [--steps 25]
        [--named rotate-cw camera-zoom-in ...] [--prompted-only] [--device cuda]

Per split (train-world stills and held-out stills): `coherence` = fraction of frames holding exactly
one object of plausible size (miva.toy.metrics.coherence), `shape_kept` = fraction of frames whose
object area stays within 0.6x-1.6x of frame 0's, and the motion the base happens to produce.
Then, for a base with its text encoder, the same held-out stills with a motion named in words
(`motion_prompt`, cycling through the named motions): coherence, and `obeys` = fraction whose
classified motion is the one named, and how often another named motion with the same seed draws
the same classified motion, with the count per named motion (`--named` picks the motions; `--prompted-only`
skips the other measures). MIVAs never use text; this says what prior they steer.
Last, `first_frame_tells_motion`: the base alone (no words) on the first frames of held-out clips
that translate (left, right, up, down in turn, in the world the base was trained on): the fraction
it animates with that clip's own motion. Near chance (about 0.06) the first frame does not decide the
motion; high, the base reads the motion from where the object starts, and an adapter must fight it.
Writes a grid of sampled clips (GIF) to --grid. Last line: `coherence X shape_kept Y` (train split).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from miva import metrics  # noqa: E402
from miva.media import save_video  # noqa: E402
from miva.pipeline import MivaPipeline  # noqa: E402
from miva.toy.base import ASSET, TOY_WORLD, UNNAMED, load_toy, motion_prompt  # noqa: E402
from miva.toy.train_base import BASE_MOTIONS  # noqa: E402
from miva.toy.world import make_clip, make_still  # noqa: E402


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
    parser.add_argument("--named", nargs="+", default=None, metavar="MOTION",
                        help="motions to name in words (default: every named base motion)")
    parser.add_argument("--prompted-only", action="store_true", help="only the motions named in words")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    named = args.named or [m for m in BASE_MOTIONS if m not in UNNAMED]
    unknown = set(named) - set(BASE_MOTIONS) | set(named) & set(UNNAMED)
    if unknown:
        parser.error(f"--named takes motions the toy base has words for, not {', '.join(sorted(unknown))}.")
    base = load_toy(args.weights, device=args.device)
    pipe = MivaPipeline(base)
    world = TOY_WORLD
    result = {}
    for split in () if args.prompted_only else ("train", "heldout"):
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
    if base.encode_prompts is not None:
        coherence, obeys, agree, start = [], [], [], time.perf_counter()
        per_motion = {m: Counter() for m in named}

        def told(motion: str, still: np.ndarray, seed: int) -> np.ndarray:
            embeds = base.prompt_embeds([motion_prompt(motion)])
            return MivaPipeline(dataclasses.replace(base, null_prompt_embeds=embeds))(
                still, num_inference_steps=args.steps, seed=seed).frames

        for i in range(args.n):
            motion, other = named[i % len(named)], named[(i + 5) % len(named)]
            if other == motion:
                other = next(m for m in BASE_MOTIONS if m not in UNNAMED and m != motion)
            still = make_still(10_000_000 + i, world, split="heldout")
            frames = told(motion, still, i)
            coherence.append(metrics.coherence(frames))
            drawn = metrics.classify_motion(frames)
            obeys.append(drawn == motion)
            per_motion[motion][drawn] += 1
            agree.append(metrics.classify_motion(told(other, still, i)) == metrics.classify_motion(frames))
        print(f"prompted coherence {np.mean(coherence):.3f}  obeys {np.mean(obeys):.3f}  "
              f"same_seed_other_prompt_agree {np.mean(agree):.3f}  "
              f"{(time.perf_counter() - start) / args.n / 2:.2f} s/clip  (held-out stills, motion named in words; "
              "agreement near 1: the starting noise, not the words, picks the motion)")
        for motion, drawn in per_motion.items():
            print(f"  named {motion:16s} obeys {drawn[motion]}/{sum(drawn.values())}  drawn: {dict(drawn.most_common(4))}")
    if args.prompted_only:
        return
    translations = ("move-left", "move-right", "move-up", "move-down")
    follows = []
    for i in range(args.n):
        motion = translations[i % len(translations)]
        first = make_clip(motion, 10_000_000 + i, world, split="heldout").frames[0]
        follows.append(metrics.classify_motion(pipe(first, num_inference_steps=args.steps, seed=i).frames) == motion)
    print(f"first_frame_tells_motion {np.mean(follows):.3f}  (base alone on first frames of held-out translation "
          f"clips, placement '{world.placement}'; chance about 0.06)")
    print(f"coherence {result['train'][0]:.3f} shape_kept {result['train'][1]:.3f}")


if __name__ == "__main__":
    main()
