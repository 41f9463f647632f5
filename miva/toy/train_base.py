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

import numpy as np
import torch
from tqdm import tqdm

from ..backends import Base
from ..train import diffusion_loss, plot_losses, run_training
from .base import ASSET, BASE_ID, FRAMES, SIZE, PixelShuffleVAE, export_checkpoint, new_toy, toy_scheduler
from .world import CAMERA_MOTIONS, OBJECT_MOTIONS, WorldConfig, make_clip

BASE_MOTIONS = OBJECT_MOTIONS + CAMERA_MOTIONS
WORLD = WorldConfig(size=SIZE, frames=FRAMES)


def clips_to_latents(frames: np.ndarray) -> torch.Tensor:
    """(b, f, h, w, 3) uint8 -> (b, 12, f, h/2, w/2) pixel-unshuffled latents in [-1, 1]."""
    x = torch.from_numpy(frames).float().div(127.5).sub(1.0)  # (b, f, h, w, 3)
    b, f = x.shape[:2]
    x = x.permute(0, 1, 4, 2, 3).reshape(b * f, 3, SIZE, SIZE)
    z = torch.nn.functional.pixel_unshuffle(x, 2)  # (b f, 12, h/2, w/2)
    return z.reshape(b, f, *z.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()


def base_batch(step: int, batch: int) -> torch.Tensor:
    """The clips of training step `step`: random motions, one object, deterministic in `step`."""
    clips = []
    for i in range(batch):
        seed = step * batch + i
        clips.append(make_clip(BASE_MOTIONS[seed % len(BASE_MOTIONS)], seed, WORLD).frames)
    return clips_to_latents(np.stack(clips))


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
    base = Base(id=BASE_ID, unet=unet, vae=PixelShuffleVAE(), scheduler=toy_scheduler(), null_prompt_embeds=prompt,
                height=SIZE, width=SIZE, frames=FRAMES, vae_scale_factor=2, concat_first_frame=True)
    params = {f"unet.{k}": p for k, p in unet.named_parameters()} | {"null_prompt_embeds": prompt}
    bar = tqdm(total=args.steps, desc="toy base", unit="step")

    def progress(step, total, loss, eta):
        bar.n = step
        bar.set_postfix(loss=f"{loss:.4f}")
        bar.refresh()

    started = time.perf_counter()
    state = run_training(
        params, lambda step, gen: diffusion_loss(base, base_batch(step, args.batch), gen), args.steps, args.out,
        seed=args.seed, lr=args.lr, weight_decay=0.01, warmup=200, checkpoint_every=args.checkpoint_every,
        resume=args.resume, meta={"what": "toy-base", "batch": args.batch, "seed": args.seed, "lr": args.lr},
        callback=progress, ema=args.ema,
    )
    bar.close()
    if state.step >= args.steps:
        export_checkpoint(args.out)
        plot_losses(state.losses, args.out / "loss.png", "toy base training loss")
    print(f"saved {args.out} at step {state.step} ({time.perf_counter() - started:.0f} s this run)")
