"""Train the shipped toy adapters in adapters/ with the public CLI, from at most 8 toy clips each.

    python scripts/train_toy_adapters.py [--steps 400] [--clips 8] [--only move-left ...]
    python scripts/train_toy_adapters.py --masked --only move-left move-up   # the shipped M-MIVAs: adapters/NAME-masked
    python scripts/train_toy_adapters.py --previews-only [--masked]  # redraw the cards' preview.gif only

Each motion's clips are rendered from the toy world the shipped base was trained on (`TOY_WORLD`,
train split) to .gif files in a temporary folder (exact for these few colours; mp4's chroma
subsampling smears 32 px edges), then `python -m miva train --base toy --clips DIR --out
adapters/NAME` learns them, exactly as a user would with their own clips. With --masked each clip has a second object that stays
still, the moving object's exact mask is written beside it (NAME.mask.gif, lossless) and the command
gets --masked: an M-MIVA, taught to move its subject and nothing else (its mask clips' loss weighted
0.1: at the paper's 1 it is ten times the video's and the video barely learns to move).
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from miva.media import save_video  # noqa: E402
from miva.toy.base import TOY_WORLD  # noqa: E402
from miva.toy.world import make_dataset  # noqa: E402

SEED0 = 1000  # the training clips' seeds: SEED0, SEED0 + 1, ...
MOTIONS = ("move-left", "move-right", "move-up", "rotate-cw", "camera-zoom-in", "bounce")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--augment", type=int, default=6, help="colour variants per clip (see miva.train)")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--masked", action="store_true", help="train M-MIVAs from the clips' object masks")
    parser.add_argument("--mask-loss-weight", type=float, default=0.1,
                        help="with --masked: the mask clips' loss weight (their sharp binary edges dwarf the video's loss at 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "adapters")
    parser.add_argument("--device", default=None, help="passed to `python -m miva train` (e.g. cuda)")
    parser.add_argument("--previews-only", action="store_true",
                        help="keep the trained weights; redraw each adapter's preview.gif with today's sampling defaults")
    args = parser.parse_args()
    world = dataclasses.replace(TOY_WORLD, **(dict(num_objects=2, moving_objects=1) if args.masked else {}))
    if args.previews_only:
        return redraw_previews(args, world)
    for motion in args.only or MOTIONS:
        with tempfile.TemporaryDirectory(prefix=f"miva-{motion}-") as tmp:
            for clip in make_dataset(motion, args.clips, seed0=SEED0, config=world):
                save_video(clip.frames, Path(tmp) / f"{motion}-{clip.seed}.gif")
                if args.masked:
                    mask = np.repeat(clip.masks[:, 0, :, :, None] * np.uint8(255), 3, axis=-1)
                    save_video(mask, Path(tmp) / f"{motion}-{clip.seed}.mask.gif")
            name = f"{motion}-masked" if args.masked else motion
            command = [sys.executable, "-m", "miva", "train", "--base", "toy", "--clips", tmp, "--motion", motion,
                       "--out", str(args.out / name), "--steps", str(args.steps), "--batch", str(args.batch),
                       "--augment", str(args.augment)]
            command += ["--masked", "--mask-loss-weight", str(args.mask_loss_weight)] if args.masked else []
            command += ["--lr", str(args.lr)] if args.lr else []
            command += ["--device", args.device] if args.device else []
            print(" ".join(command[1:]), flush=True)
            subprocess.run(command, check=True, cwd=ROOT)


def redraw_previews(args, world) -> None:
    """What training ends with (`miva.train.save_preview`): the first training clip's first frame, seed
    0, 25 steps; an M-MIVA gets that clip's subject mask."""
    from miva.config import MivaConfig
    from miva.pipeline import MivaPipeline
    from miva.toy.base import load_toy
    from miva.train import save_preview

    pipe = MivaPipeline(load_toy())
    for motion in args.only or MOTIONS:
        folder = args.out / (f"{motion}-masked" if args.masked else motion)
        clip = make_dataset(motion, 1, seed0=SEED0, config=world)[0]
        name = pipe.load_adapter(folder)
        seed = MivaConfig.load(folder).training.get("seed", 0)
        print(save_preview(pipe, name, clip.frames[0], folder, len(clip.frames), seed=seed,
                           mask=clip.masks[0, 0].astype(np.float32) if args.masked else None), flush=True)
        pipe.unload_adapter(name)


if __name__ == "__main__":
    main()
