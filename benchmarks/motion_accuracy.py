"""Do the shipped toy adapters make the motion they were taught? Measured from the frames.

    python benchmarks/motion_accuracy.py [--n 20] [--steps 25] [--adapters adapters] [--guidance 1]

For each adapter in the folder (toy base; an M-MIVA gets the still's object as its mask): animate
N held-out first frames (colours and shapes never in any training clip; textured backgrounds for a
camera motion, as its clips have, since over a flat one a camera move looks like the object moving),
classify the motion of each video with miva.toy.metrics.classify_motion, and count those equal to the
adapter's motion. The base alone on the same frames and seeds gives the chance level. Also: CPU
seconds to train (from the adapter card) and to animate 16 frames, and for a turn, in how many
stills the object turned keeping its shape (`keeps_shape`: a cross drawn as a turning
triangle-like shape counts as a turn, but not as kept). Last line: `mean_accuracy X`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from miva.config import MivaConfig  # noqa: E402
from miva.toy.metrics import classify_motion, keeps_shape, object_masks  # noqa: E402
from miva.pipeline import MivaPipeline  # noqa: E402
from miva.toy.base import TOY_WORLD, load_toy  # noqa: E402
from miva.toy.world import CAMERA_MOTIONS, heldout_stills  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--adapters", type=Path, default=ROOT / "adapters")
    parser.add_argument("--guidance", type=float, default=1.0, help="motion guidance g (1 = off, the paper's and the default)")
    parser.add_argument("--device", default="cpu", help="cpu (the figures in the README) or cuda")
    args = parser.parse_args()
    pipe = MivaPipeline(load_toy(device=args.device))
    folders = sorted(p for p in args.adapters.iterdir() if (p / "adapter_config.json").is_file())
    if not folders:
        sys.exit(f"no adapters in {args.adapters}; train them with scripts/train_toy_adapters.py")
    world, alone = TOY_WORLD, {}  # the base alone on each set of stills: {camera motion?: motions}
    print(f"{'adapter':<16} {'accuracy':>8} {'base':>6} {'train s':>8} {'animate s':>9}  most common")
    accuracies = []
    for folder in folders:
        config = MivaConfig.load(folder)
        stills = heldout_stills(args.n, world, config.motion)
        camera = config.motion in CAMERA_MOTIONS
        if camera not in alone:
            alone[camera] = [classify_motion(pipe(s, adapters={}, num_inference_steps=args.steps, seed=i).frames)
                             for i, s in enumerate(stills)]
        name = pipe.load_adapter(folder)
        motions, seconds, kept = [], [], []
        for i, still in enumerate(stills):
            # an M-MIVA gets its subject: the still's object, segmented from the background
            masks = {name: object_masks(still[None])[0].any(0)} if config.masked else None
            start = time.perf_counter()
            frames = pipe(still, adapters={name: 1.0}, num_inference_steps=args.steps, seed=i, masks=masks,
                          guidance_scale=args.guidance).frames
            seconds.append(time.perf_counter() - start)
            motions.append(classify_motion(frames))
            kept.append(motions[-1] == config.motion and keeps_shape(frames))
        pipe.unload_adapter(name)
        accuracy = float(np.mean([m == config.motion for m in motions]))
        chance = float(np.mean([m == config.motion for m in alone[camera]]))
        accuracies.append(accuracy)
        common = max(set(motions), key=motions.count)
        print(f"{folder.name:<16} {accuracy:>8.2f} {chance:>6.2f} {config.training.get('seconds', float('nan')):>8.0f} "
              f"{np.median(seconds):>9.2f}  {common}")
        if config.motion.startswith("rotate"):
            print(f"  {folder.name}: turned keeping its shape in {sum(kept)} of {len(stills)}")
    print(f"mean_accuracy {np.mean(accuracies):.3f}")


if __name__ == "__main__":
    main()
