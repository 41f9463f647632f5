"""How fast the toy world renders: milliseconds per 16-frame 32x32 clip, per motion.

    python benchmarks/toy_world_speed.py [--repeat 5]

Base training renders every clip it sees (batch 32: 32 clips a step), so this must stay small
against a training step. Best of --repeat per motion. Last line: `worst_ms X`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from miva.toy.base import TOY_WORLD  # noqa: E402
from miva.toy.train_base import BASE_MOTIONS  # noqa: E402
from miva.toy.world import make_clip  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    worst = 0.0
    for motion in BASE_MOTIONS:
        make_clip(motion, 0, TOY_WORLD)  # warm up
        times = []
        for seed in range(1, args.repeat + 1):
            start = time.perf_counter()
            make_clip(motion, seed, TOY_WORLD)
            times.append(time.perf_counter() - start)
        worst = max(worst, min(times) * 1000)
        print(f"{motion:18s} {min(times) * 1000:6.2f} ms")
    print(f"worst_ms {worst:.2f}")


if __name__ == "__main__":
    main()
