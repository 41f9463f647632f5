"""Train the embedded toy base on random-motion toy-world clips (`python -m miva.toy train-base`).

Seeded and resumable: step s always sees the clips with seeds s * batch ... s * batch + batch - 1
and the noise of `step_generator(seed, s)`, so stopping and resuming changes nothing. Checkpoints
(parameters, AdamW moments, EMA) go to OUT/checkpoint every --checkpoint-every steps; the EMA
weights are exported to OUT/model.safetensors, which `load_toy` reads.

Each clip is captioned with its motion's words (`motion_prompt`), replaced by the empty prompt with
probability --text-dropout (decided per step and clip from the seed, so resuming still changes
nothing); the empty prompt is what MIVAs run on. `--init FOLDER` starts from an exported base's
weights (a new run: fresh optimiser, step 0). `--world free` renders the clips of the "free" toy
world (`WORLDS`), where the first frame does not tell the motion; the export's config.json records it.
`--fine-attention` gives the UNet spatial attention at its 16x16 level too (`toy_configs`); from an
`--init` base without it, the new layers start as the identity, so the run starts from exactly that
base. `--emphasis rotate-cw ...` shows those motions twice as often (the ones a base draws worst).
`--multi 0.3` makes that share of the clips two-object clips where each object has its own motion
(the world's "random" motion, uncaptioned): a base trained on one object per clip has never seen
two things move differently at once, which is what a mix of regional MIVAs asks of it.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from ..backends import Base
from ..loop import diffusion_loss, encode_clips, run_training
from .base import (ASSET, BASE_ID, FRAMES, SIZE, WORLDS, PixelShuffleVAE, export_checkpoint, load_toy_weights,
                   motion_prompt, new_toy, toy_parameters, toy_scheduler)
from .world import CAMERA_MOTIONS, OBJECT_MOTIONS, make_clip

BASE_MOTIONS = OBJECT_MOTIONS + CAMERA_MOTIONS
VAE = PixelShuffleVAE()


def motion_cycle(emphasis: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The motions training clips cycle through: every base motion once, then the `emphasis` ones again."""
    unknown = set(emphasis) - set(BASE_MOTIONS)
    if unknown:
        raise ValueError(f"--emphasis takes base motions ({', '.join(BASE_MOTIONS)}), not {', '.join(sorted(unknown))}.")
    return BASE_MOTIONS + tuple(emphasis)


MULTI = "random"  # the world's motion where each object draws its own


def _is_multi(seed: int, multi: float) -> bool:
    return multi > 0 and np.random.default_rng([0x6D756C74, seed]).random() < multi


def base_motions(step: int, batch: int, emphasis: tuple[str, ...] = (), multi: float = 0.0) -> list[str]:
    """The motions of training step `step`'s clips (clip seed s has motion s mod the cycle's length,
    or `MULTI`, two objects moving each their own way, for a share `multi` of the seeds)."""
    cycle = motion_cycle(emphasis)
    return [MULTI if _is_multi(seed, multi) else cycle[seed % len(cycle)]
            for seed in range(step * batch, (step + 1) * batch)]


def base_clips(step: int, batch: int, world: str = "fit", emphasis: tuple[str, ...] = (),
               multi: float = 0.0) -> list[np.ndarray]:
    """The (F, H, W, 3) uint8 clips of training step `step`: random motions, deterministic in `step`."""
    two = replace(WORLDS[world], num_objects=2)
    return [make_clip(motion, step * batch + i, two if motion == MULTI else WORLDS[world]).frames
            for i, motion in enumerate(base_motions(step, batch, emphasis, multi))]


def base_prompts(step: int, batch: int, dropout: float, seed: int = 0, emphasis: tuple[str, ...] = (),
                 multi: float = 0.0) -> list[str]:
    """Step `step`'s captions: each clip's motion words, or '' with probability `dropout` (seeded by
    step); a two-motion clip has no words for its motions and gets ''."""
    keep = np.random.default_rng([seed, step]).random(batch) >= dropout
    return [motion_prompt(m) if k and m != MULTI else "" for m, k in zip(base_motions(step, batch, emphasis, multi), keep)]


def _encode(pixels: torch.Tensor) -> torch.Tensor:
    return VAE.encode(pixels).latent_dist.mode()


def base_batch(step: int, batch: int, world: str = "fit") -> torch.Tensor:
    """The latents (b, 12, f, h/2, w/2) of training step `step`."""
    return encode_clips(_encode, base_clips(step, batch, world))


def _one_thread() -> None:
    torch.set_num_threads(1)


class Prefetcher:
    """`base_clips(step, batch)` rendered by worker processes a few steps ahead of the trainer.

    Batches depend on the step alone, so this changes nothing but the speed; it keeps a GPU busy.
    """

    def __init__(self, batch: int, workers: int, ahead: int = 16, world: str = "fit", emphasis: tuple[str, ...] = (),
                 multi: float = 0.0):
        self.batch, self.ahead, self.pending, self.world, self.emphasis = batch, ahead, {}, world, tuple(emphasis)
        self.multi = multi
        self.pool = ProcessPoolExecutor(workers, initializer=_one_thread) if workers > 0 else None

    def __call__(self, step: int) -> list[np.ndarray]:
        if self.pool is None:
            return base_clips(step, self.batch, self.world, self.emphasis, self.multi)
        for s in range(step, step + self.ahead):
            if s not in self.pending:
                self.pending[s] = self.pool.submit(base_clips, s, self.batch, self.world, self.emphasis, self.multi)
        for s in [s for s in self.pending if s < step]:  # a resumed run skips ahead
            self.pending.pop(s).cancel()
        return self.pending.pop(step).result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def run_meta(args) -> dict:
    """What identifies a run (checked on --resume); options at their toy-v1 values are left out, so
    toy-v1's checkpoint resumes with `--text-dropout 1`."""
    meta = {"what": "toy-base", "batch": args.batch, "seed": args.seed, "lr": args.lr}
    optional = {"text_dropout": (args.text_dropout, 1.0), "init": (str(args.init) if args.init else None, None),
                "zero_snr": (args.zero_snr, False), "world": (args.world, "fit"),
                "emphasis": (list(args.emphasis), []), "multi": (args.multi, 0.0),
                "fine_attention": (args.fine_attention, False)}
    return meta | {k: value for k, (value, old) in optional.items() if value != old}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m miva.toy train-base", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ASSET)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
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
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--zero-snr", action="store_true", help="train on the zero-terminal-SNR schedule (see toy_scheduler)")
    parser.add_argument("--world", choices=sorted(WORLDS), default="fit", help="the toy world's placement (see WORLDS)")
    parser.add_argument("--emphasis", nargs="*", default=[], metavar="MOTION",
                        help="base motions to show twice as often (added to the cycle of clips once more each)")
    parser.add_argument("--multi", type=float, default=0.0, metavar="SHARE",
                        help="share of clips with two objects moving each their own way (uncaptioned)")
    parser.add_argument("--fine-attention", action="store_true",
                        help="spatial attention at the 16x16 level too (grown from an --init base without it)")
    args = parser.parse_args(argv)
    if not 0 <= args.multi <= 1:
        parser.error(f"--multi is a share of the clips, from 0 to 1, not {args.multi}.")
    emphasis = tuple(args.emphasis)
    try:
        motion_cycle(emphasis)
    except ValueError as error:
        parser.error(str(error))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    clips = Prefetcher(args.batch, args.workers, world=args.world, emphasis=emphasis, multi=args.multi)  # before CUDA starts: the workers are forked

    unet, prompt, text = new_toy(args.seed, args.fine_attention)
    if args.init and not (args.resume and (args.out / "checkpoint" / "state.json").is_file()):  # resuming: the checkpoint has them
        weights = args.init / "model.safetensors"
        if not weights.is_file():
            parser.error(f"--init {args.init} holds no model.safetensors; give a folder written by `python -m miva.toy export`.")
        try:
            load_toy_weights(load_file(str(weights)), unet, prompt, text, grow=args.fine_attention)
        except (RuntimeError, ValueError) as error:  # a state-dict mismatch (torch) or a grown UNet's other misfit
            parser.error(f"--init {args.init} is a toy base of another shape{'' if args.fine_attention else ' (with --fine-attention?)'}: {str(error).splitlines()[0]}")
    unet.to(args.device).train()
    text.to(args.device)
    prompt = torch.nn.Parameter(prompt.detach().to(args.device))
    base = Base(id=BASE_ID, unet=unet, vae=VAE, scheduler=toy_scheduler(args.zero_snr), null_prompt_embeds=prompt,
                height=SIZE, width=SIZE, frames=FRAMES, vae_scale_factor=2, concat_first_frame=True,
                residual_to_first_frame=True, encode_prompts=lambda prompts: text(prompts, prompt))
    captions = args.text_dropout < 1  # --text-dropout 1: the empty prompt only, as toy-v1 was trained
    params = {k: v for k, v in toy_parameters(unet, prompt, text).items() if captions or not k.startswith("text.")}
    bar = tqdm(total=args.steps, desc="toy base", unit="step")

    def progress(step, total, loss, eta):
        bar.n = step
        bar.set_postfix(loss=f"{loss:.4f}")
        bar.refresh()

    def loss(step, gen):
        latents = encode_clips(_encode, clips(step)).to(args.device)
        embeds = base.prompt_embeds(base_prompts(step, args.batch, args.text_dropout, args.seed, emphasis, args.multi))
        return diffusion_loss(base, latents, gen, prompt_embeds=embeds)

    started = time.perf_counter()
    stop = (lambda: time.perf_counter() - started > args.minutes * 60) if args.minutes else None
    state = run_training(
        params, loss, args.steps, args.out,
        seed=args.seed, lr=args.lr, weight_decay=0.01, warmup=args.warmup, checkpoint_every=args.checkpoint_every,
        resume=args.resume, meta=run_meta(args),
        callback=progress, ema=args.ema, should_stop=stop,
    )
    bar.close()
    clips.close()
    if state.step >= args.steps:
        export_checkpoint(args.out)
    print(f"saved {args.out} at step {state.step} ({time.perf_counter() - started:.0f} s this run)")
