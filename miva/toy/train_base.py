"""Train the embedded toy base on random-motion toy-world clips (`python -m miva.toy train-base`).

Seeded and resumable: step s always sees the clips with seeds s * batch ... s * batch + batch - 1
and the noise of `step_generator(seed, s)`, so stopping and resuming changes nothing. Checkpoints
(parameters, AdamW moments, EMA) go to RUN/checkpoint every --checkpoint-every steps (RUN defaults
to runs/toy-base, outside the tracked tree); at the last step the EMA weights are exported to
OUT/model.safetensors (default assets/toy-base), which `load_toy` reads.

Each clip is captioned with its motion's words (`motion_prompt`), replaced by the empty prompt with
probability --text-dropout (decided per step and clip from the seed, so resuming still changes
nothing); the empty prompt is what MIVAs run on. `--init FOLDER` starts from an exported base's
weights (a new run: fresh optimiser, step 0); `--init assets/toy-base` continues the shipped base.
`--emphasis rotate-cw ...` shows those motions once more per cycle each (default: the shipped
recipe's, `EMPHASIS`). The defaults are the recipe of the shipped base (docs/toy-world.md).
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from ..loop import CHECKPOINT_DIR, diffusion_loss, encode_clips, run_training
from .base import (ASSET, TOY_WORLD, PixelShuffleVAE, export_checkpoint, load_toy_weights, motion_prompt, new_toy,
                   toy_base, toy_parameters)
from .world import CAMERA_MOTIONS, OBJECT_MOTIONS, make_clip

BASE_MOTIONS = OBJECT_MOTIONS + CAMERA_MOTIONS
EMPHASIS = ("rotate-cw", "rotate-ccw", "camera-zoom-in", "camera-zoom-out") * 2 + ("camera-pan-left", "camera-pan-right")
RUN = Path("runs") / "toy-base"
VAE = PixelShuffleVAE()


def motion_cycle(emphasis: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The motions training clips cycle through: every base motion once, then the `emphasis` ones again."""
    unknown = set(emphasis) - set(BASE_MOTIONS)
    if unknown:
        raise ValueError(f"--emphasis takes base motions ({', '.join(BASE_MOTIONS)}), not {', '.join(sorted(unknown))}.")
    return BASE_MOTIONS + tuple(emphasis)


def base_motions(step: int, batch: int, emphasis: tuple[str, ...] = ()) -> list[str]:
    """The motions of training step `step`'s clips (clip seed s has motion s mod the cycle's length)."""
    cycle = motion_cycle(emphasis)
    return [cycle[seed % len(cycle)] for seed in range(step * batch, (step + 1) * batch)]


def base_clips(step: int, batch: int, emphasis: tuple[str, ...] = ()) -> list[np.ndarray]:
    """The (F, H, W, 3) uint8 clips of training step `step`: random motions, deterministic in `step`."""
    return [make_clip(motion, step * batch + i, TOY_WORLD).frames for i, motion in enumerate(base_motions(step, batch, emphasis))]


def base_prompts(step: int, batch: int, dropout: float, seed: int = 0, emphasis: tuple[str, ...] = ()) -> list[str]:
    """Step `step`'s captions: each clip's motion words, or '' with probability `dropout` (seeded by step)."""
    keep = np.random.default_rng([seed, step]).random(batch) >= dropout
    return [motion_prompt(m) if k else "" for m, k in zip(base_motions(step, batch, emphasis), keep)]


def _encode(pixels: torch.Tensor) -> torch.Tensor:
    return VAE.encode(pixels).latent_dist.mode()


def base_batch(step: int, batch: int) -> torch.Tensor:
    """The latents (b, 12, f, h/2, w/2) of training step `step`."""
    return encode_clips(_encode, base_clips(step, batch))


def _one_thread() -> None:
    torch.set_num_threads(1)


class Prefetcher:
    """`base_clips(step, batch)` rendered by worker processes a few steps ahead of the trainer.

    Batches depend on the step alone, so this changes nothing but the speed; it keeps a GPU busy.
    """

    def __init__(self, batch: int, workers: int, ahead: int = 16, emphasis: tuple[str, ...] = ()):
        self.batch, self.ahead, self.pending, self.emphasis = batch, ahead, {}, tuple(emphasis)
        self.pool = ProcessPoolExecutor(workers, initializer=_one_thread) if workers > 0 else None

    def __call__(self, step: int) -> list[np.ndarray]:
        if self.pool is None:
            return base_clips(step, self.batch, self.emphasis)
        for s in range(step, step + self.ahead):
            if s not in self.pending:
                self.pending[s] = self.pool.submit(base_clips, s, self.batch, self.emphasis)
        for s in [s for s in self.pending if s < step]:  # a resumed run skips ahead
            self.pending.pop(s).cancel()
        return self.pending.pop(step).result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def run_meta(args) -> dict:
    """What identifies a run (checked on --resume)."""
    return {"what": "toy-base", "batch": args.batch, "seed": args.seed, "lr": args.lr, "text_dropout": args.text_dropout,
            "init": str(args.init) if args.init else None, "emphasis": list(args.emphasis)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m miva.toy train-base", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ASSET, help="folder the exported weights go to")
    parser.add_argument("--run", type=Path, default=RUN, help="folder of the resumable training checkpoint")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=0, help="processes rendering clips ahead (0: inline)")
    parser.add_argument("--minutes", type=float, default=None, help="checkpoint and stop after this long")
    parser.add_argument("--text-dropout", type=float, default=0.2, help="share of clips trained on the empty prompt")
    parser.add_argument("--init", type=Path, default=None, help="start from this exported base folder's weights")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--emphasis", nargs="*", default=list(EMPHASIS), metavar="MOTION",
                        help="base motions shown once more per cycle each (default: the shipped recipe's)")
    args = parser.parse_args(argv)
    emphasis = tuple(args.emphasis)
    try:
        motion_cycle(emphasis)
    except ValueError as error:
        parser.error(str(error))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    clips = Prefetcher(args.batch, args.workers, emphasis=emphasis)  # before CUDA starts: the workers are forked

    unet, prompt, text = new_toy(args.seed)
    if args.init and not (args.resume and (args.run / CHECKPOINT_DIR / "state.json").is_file()):  # resuming: the checkpoint has them
        weights = args.init / "model.safetensors"
        if not weights.is_file():
            parser.error(f"--init {args.init} holds no model.safetensors; give a folder written by `python -m miva.toy export`.")
        try:
            load_toy_weights(load_file(str(weights)), unet, prompt, text)
        except RuntimeError as error:  # a state-dict mismatch
            parser.error(f"--init {args.init} is a toy base of another shape: {str(error).splitlines()[0]}")
    unet.to(args.device).train()
    text.to(args.device)
    prompt = torch.nn.Parameter(prompt.detach().to(args.device))
    base = toy_base(unet, prompt, text)
    params = toy_parameters(unet, prompt, text)
    bar = tqdm(total=args.steps, desc="toy base", unit="step")

    def progress(step, total, loss, eta):
        bar.n = step
        bar.set_postfix(loss=f"{loss:.4f}")
        bar.refresh()

    def loss(step, gen):
        latents = encode_clips(_encode, clips(step)).to(args.device)
        embeds = base.prompt_embeds(base_prompts(step, args.batch, args.text_dropout, args.seed, emphasis))
        return diffusion_loss(base, latents, gen, prompt_embeds=embeds)

    started = time.perf_counter()
    stop = (lambda: time.perf_counter() - started > args.minutes * 60) if args.minutes is not None else None
    state = run_training(
        params, loss, args.steps, args.run,
        seed=args.seed, lr=args.lr, weight_decay=0.01, warmup=args.warmup, checkpoint_every=args.checkpoint_every,
        resume=args.resume, meta=run_meta(args),
        callback=progress, ema=args.ema, should_stop=stop,
    )
    bar.close()
    clips.close()
    if state.step >= args.steps:
        export_checkpoint(args.run, args.out)
        print(f"saved {args.out} at step {state.step} ({time.perf_counter() - started:.0f} s this run)")
    else:
        print(f"checkpointed {args.run} at step {state.step}; continue with the same options and --resume")
