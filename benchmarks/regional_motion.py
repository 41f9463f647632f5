"""Do M-MIVAs move only their own subject? Measured from the frames of two-object toy clips.

    python benchmarks/regional_motion.py [--n 20] [--steps 25] [--a adapters/move-left-masked]
                                         [--b adapters/move-up-masked] [--plain adapters/move-right]
                                         [--mix composite|attention]

For N held-out first frames with two objects (A, B; colours and shapes never in any training clip):
  mix      M-MIVA a on A's mask + M-MIVA b on B's mask: is A moved in a's direction and B in b's?
  a alone  M-MIVA a on A's mask: leakage = displacement of B / displacement of A (B should stay)
  b alone  the same for b, B and A
  plain    MIVA `plain` (unmasked: it acts on the background, B.2.1) + M-MIVA b on B: B's direction
Objects are tracked by their soft centroids (`miva.toy.metrics.object_tracks`), matched to A and B by
their first-frame positions. Leakage is only defined where the subject moved (net displacement at
least `DIRECTION_MIN` of the frame side, the classifier's threshold); it is NaN when none did. Last line: `regional_accuracy X leakage Y` (mix accuracy over both
objects; median leakage of the single-adapter runs). Goals: accuracy >= 0.9, leakage <= 0.05.
Also printed: how many stills got both motions, only one or neither (does one M-MIVA win the
still?), how often each M-MIVA's mask stream predicts its subject moving as asked in the mix, and
how often the video then follows (a mix can fail in the masks or in the video), each M-MIVA's
direction accuracy alone on the same stills (the ceiling of the mix), and the mix accuracy for the
nearer and the farther half of the stills by how far apart A's and B's centres start (does it matter
that the toy UNet's lowest level has 4x4 tokens of 8x8 px, which two nearby 7-11 px objects share?).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from miva.toy.metrics import DIRECTION_MIN, _direction, object_tracks  # noqa: E402
from miva.pipeline import MIX_MODES, MivaPipeline  # noqa: E402
from miva.toy.base import TOY_WORLD, load_toy  # noqa: E402
from miva.toy.world import make_clip  # noqa: E402


def displacements(frames: np.ndarray, starts: list[np.ndarray]) -> list[np.ndarray]:
    """Net (dx, dy) of the tracked object nearest each start centre; NaN when no object is found or
    when the nearest one is another start's (objects merged or one was lost: no honest displacement)."""
    tracks = object_tracks(frames)  # (F, K, 2)
    if tracks.shape[1] == 0 or np.isnan(tracks[0, :, 0]).all():
        return [np.full(2, np.nan) for _ in starts]
    distance = np.stack([np.linalg.norm(tracks[0] - start, axis=-1) for start in starts])  # (starts, K)
    nearest = [int(np.nanargmin(row)) for row in distance]
    out = []
    for i, k in enumerate(nearest):
        if sum(k == other for other in nearest) > 1:
            out.append(np.full(2, np.nan))
            continue
        valid = np.flatnonzero(~np.isnan(tracks[:, k, 0]))
        out.append(tracks[valid[-1], k] - tracks[valid[0], k])
    return out


def mask_shift(mask) -> np.ndarray:
    """Net (dx, dy) of a predicted subject mask sequence (F, H, W): its centroid, last frame - first."""
    m = np.asarray(mask, dtype=np.float64)
    ys, xs = np.mgrid[: m.shape[1], : m.shape[2]]
    total = m.sum(axis=(1, 2))
    if total[0] <= 0 or total[-1] <= 0:
        return np.full(2, np.nan)
    centre = [np.array([(xs * m[i]).sum(), (ys * m[i]).sum()]) / total[i] for i in (0, -1)]
    return centre[1] - centre[0]


def direction(d: np.ndarray, side: int) -> str:
    return "lost" if np.isnan(d).any() else _direction(d[0], d[1], DIRECTION_MIN * side)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--a", type=Path, default=ROOT / "adapters" / "move-left-masked")
    parser.add_argument("--b", type=Path, default=ROOT / "adapters" / "move-up-masked")
    parser.add_argument("--plain", type=Path, default=ROOT / "adapters" / "move-right")
    parser.add_argument("--device", default="cpu", help="cpu (the figures in the README) or cuda")
    parser.add_argument("--mix", default="composite", choices=MIX_MODES,
                        help="how the two M-MIVAs share the video (MivaPipeline's `mix`)")
    args = parser.parse_args()
    pipe = MivaPipeline(load_toy(device=args.device))
    a, b, plain = (pipe.load_adapter(p) for p in (args.a, args.b, args.plain))
    motion = {name: pipe.adapters[name].motion for name in (a, b, plain)}
    config = dataclasses.replace(TOY_WORLD, num_objects=2)
    hits, leaks, plain_hits, moved_px, alone, apart, mask_hits, seconds = [], [], [], [], [], [], [], {}
    for seed in range(args.n):
        clip = make_clip("move-left", 5000 + seed, config, split="heldout")  # its first frame: two still objects
        first, (mask_a, mask_b) = clip.frames[0], clip.masks[0].astype(np.float32)
        starts = [np.asarray(o["start_centre"]) for o in clip.params["objects"]]
        side = first.shape[0]

        def run(weights, masks, predicted=None):
            start = time.perf_counter()
            out = pipe(first, adapters=weights, masks=masks, num_inference_steps=args.steps, seed=seed, mix=args.mix)
            seconds.setdefault(len(weights), []).append(time.perf_counter() - start)
            if predicted is not None:  # where the mask streams say each subject went
                predicted += [direction(mask_shift(out.subject_masks[name].cpu()), side) == motion[name] for name in weights]
            return displacements(out.frames, starts)

        da, db = run({a: 1.0, b: 1.0}, {a: mask_a, b: mask_b}, mask_hits)
        hits += [direction(da, side) == motion[a], direction(db, side) == motion[b]]
        apart += [float(np.linalg.norm(starts[0] - starts[1]))] * 2
        for name, (moved, still) in ((a, run({a: 1.0}, {a: mask_a})), (b, run({b: 1.0}, {b: mask_b})[::-1])):
            alone.append(direction(moved, side) == motion[name])
            if np.isnan(moved).any() or np.isnan(still).any():
                continue
            moved_px.append(float(np.linalg.norm(moved)))
            if moved_px[-1] >= DIRECTION_MIN * side:  # leakage is a ratio to the subject's motion: only when it moved
                leaks.append(float(np.linalg.norm(still) / moved_px[-1]))
        _, db = run({plain: 1.0, b: 1.0}, {b: mask_b})
        plain_hits.append(direction(db, side) == motion[b])
    accuracy = float(np.mean(hits))
    leakage = statistics.median(leaks) if leaks else float("nan")
    print(f"toy base, {args.n} held-out two-object first frames, {args.steps} DDIM steps, mix={args.mix}")
    print(f"mix {a} ({motion[a]}) on A + {b} ({motion[b]}) on B: per-object direction accuracy {accuracy:.2f}")
    got_a, got_b = np.asarray(hits[0::2]), np.asarray(hits[1::2])
    print(f"mix per still: both as asked {np.sum(got_a & got_b)}, only A {np.sum(got_a & ~got_b)}, "
          f"only B {np.sum(~got_a & got_b)}, neither {np.sum(~got_a & ~got_b)} (of {args.n})")
    follows = np.asarray(hits)[np.asarray(mask_hits)]
    print(f"mix, the mask streams: A's predicted mask moves {motion[a]} {np.mean(mask_hits[0::2]):.2f}, B's {motion[b]} "
          f"{np.mean(mask_hits[1::2]):.2f}; where it did, the video moved that object so in {follows.sum()} of {follows.size}")
    print(f"single M-MIVA runs: subject moved {statistics.median(moved_px) if moved_px else float('nan'):.2f} px "
          f"(median); median leakage (other object's displacement / subject's) {leakage:.3f} over the "
          f"{len(leaks)} of {len(moved_px)} runs where the subject moved at least {DIRECTION_MIN * side:.1f} px")
    print(f"alone on the same stills: {a} moves A {motion[a]} {np.mean(alone[0::2]):.2f}, "
          f"{b} moves B {motion[b]} {np.mean(alone[1::2]):.2f}")
    middle = float(np.median(apart))
    near = np.asarray(apart) < middle
    for label, pick in ((f"< {middle:.1f} px", near), (f">= {middle:.1f} px", ~near)):
        print(f"mix accuracy with A and B starting {label} apart (centres): "
              f"{np.mean(np.asarray(hits)[pick]) if pick.any() else float('nan'):.2f} ({pick.sum() // 2} stills)")
    print(f"MIVA {plain} (background) + M-MIVA {b} on B: B's direction accuracy {np.mean(plain_hits):.2f}")
    print(f"seconds per video (median): one M-MIVA {statistics.median(seconds[1]):.2f}, "
          f"two adapters {statistics.median(seconds[2]):.2f}")
    print(f"regional_accuracy {accuracy:.3f} leakage {leakage:.3f}")


if __name__ == "__main__":
    main()
