"""Can adapters steer a candidate toy base? Train one MIVA per motion on it and score it.

    python benchmarks/candidate_adapter.py --weights FOLDER [--motions move-left move-up]
        [--steps 400] [--n 12]

For a base folder that is not (yet) the shipped one: each motion's MIVA learns from 8 train-split
clips of the world the base was trained on (`toy_world`), as `scripts/train_toy_adapters.py` does
for the shipped base (lr 1e-3, augment 6), in a temporary folder; then N held-out stills are
animated with weight 1 and without the adapter, and `classify_motion` says how many make the motion.
Last line: `mean_accuracy X base Y`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from miva.metrics import classify_motion  # noqa: E402
from miva.pipeline import MivaPipeline  # noqa: E402
from miva.toy.base import load_toy, toy_world  # noqa: E402
from miva.toy.world import CAMERA_MOTIONS, heldout_stills, make_dataset  # noqa: E402
from miva.train import train_adapter  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--motions", nargs="+", default=["move-left", "move-up"])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--n", type=int, default=12)
    args = parser.parse_args()
    pipe, world = MivaPipeline(load_toy(args.weights)), toy_world(args.weights)
    accuracies, chances, alone_on = [], [], {}  # the base alone, per kind of stills (camera motion or not)
    for motion in args.motions:
        stills = heldout_stills(args.n, world, motion)
        camera = motion in CAMERA_MOTIONS
        if camera not in alone_on:
            alone_on[camera] = [classify_motion(pipe(s, num_inference_steps=25, seed=i).frames) for i, s in enumerate(stills)]
        alone = alone_on[camera]
        clips = [c.frames for c in make_dataset(motion, 8, seed0=1000, config=world)]
        with tempfile.TemporaryDirectory(prefix=f"miva-{motion}-") as tmp:
            start = time.perf_counter()
            train_adapter(pipe, clips, Path(tmp) / motion, motion, steps=args.steps, lr=1e-3, augment=6, preview_steps=5)
            seconds = time.perf_counter() - start
            name = pipe.load_adapter(Path(tmp) / motion)
            made = [classify_motion(pipe(s, adapters={name: 1.0}, num_inference_steps=25, seed=i).frames)
                    for i, s in enumerate(stills)]
            pipe.unload_adapter(name)
        accuracies.append(np.mean([m == motion for m in made]))
        chances.append(np.mean([m == motion for m in alone]))
        print(f"{motion:16s} accuracy {accuracies[-1]:.2f}  base alone {chances[-1]:.2f}  train {seconds:.0f} s  "
              f"most common {Counter(made).most_common(3)}", flush=True)
    print(f"mean_accuracy {np.mean(accuracies):.3f} base {np.mean(chances):.3f}")


if __name__ == "__main__":
    main()
