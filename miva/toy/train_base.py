"""Train the embedded toy base on random-motion toy-world clips (`python -m miva.toy train-base`).

Seeded and resumable: step s always sees the clips with seeds s * batch ... s * batch + batch - 1
and the noise of `step_generator(seed, s)`, so stopping and resuming changes nothing. Checkpoints
(parameters, AdamW moments, EMA) go to OUT/checkpoint every --checkpoint-every steps; the EMA
weights are exported to OUT/model.safetensors, which `load_toy` reads.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..backends import Base
from ..train import diffusion_loss, encode_clips, plot_losses, run_training
from .base import ASSET, BASE_ID, FRAMES, SIZE, PixelShuffleVAE, export_checkpoint, new_toy, toy_scheduler
from .world import CAMERA_MOTIONS, OBJECT_MOTIONS, WorldConfig, make_clip

BASE_MOTIONS = OBJECT_MOTIONS + CAMERA_MOTIONS
WORLD = WorldConfig(size=SIZE, frames=FRAMES)
VAE = PixelShuffleVAE()


def base_batch(step: int, batch: int) -> torch.Tensor:
    """The clips of training step `step`: random motions, one object, deterministic in `step`."""
    seeds = range(step * batch, (step + 1) * batch)
    clips = [make_clip(BASE_MOTIONS[seed % len(BASE_MOTIONS)], seed, WORLD).frames for seed in seeds]
    return encode_clips(lambda x: VAE.encode(x).latent_dist.mode(), clips)  # (b, 12, f, h/2, w/2)


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
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    unet, prompt = new_toy(args.seed)
    unet.train()
    base = Base(id=BASE_ID, unet=unet, vae=VAE, scheduler=toy_scheduler(), null_prompt_embeds=prompt,
                height=SIZE, width=SIZE, frames=FRAMES, vae_scale_factor=2, concat_first_frame=True,
                residual_to_first_frame=True)
    params = {f"unet.{k}": p for k, p in unet.named_parameters()} | {"null_prompt_embeds": prompt}
    bar = tqdm(total=args.steps, desc="toy base", unit="step")

    def progress(step, total, loss, eta):
        bar.n = step
        bar.set_postfix(loss=f"{loss:.4f}")
        bar.refresh()

    started = time.perf_counter()
    state = run_training(
        params, lambda step, gen: diffusion_loss(base, base_batch(step, args.batch), gen), args.steps, args.out,
        seed=args.seed, lr=args.lr, weight_decay=0.01, warmup=100, checkpoint_every=args.checkpoint_every,
        resume=args.resume, meta={"what": "toy-base", "batch": args.batch, "seed": args.seed, "lr": args.lr},
        callback=progress, ema=args.ema,
    )
    bar.close()
    if state.step >= args.steps:
        export_checkpoint(args.out)
        plot_losses(state.losses, args.out / "loss.png", "toy base training loss")
    print(f"saved {args.out} at step {state.step} ({time.perf_counter() - started:.0f} s this run)")
