"""Few-shot adapter training: a MIVA (or an M-MIVA, with its mask clips) taught from a few clips.

Only the adapter's parameters learn; the loop, its checkpoints and the denoising loss are `miva.loop`'s.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import masks as masks_lib
from . import schedules
from .adapter import attach, check_adapter_name, detach
from .adapter_files import read_adapter, save_adapter
from .backends.base import set_gradient_checkpointing
from .config import WEIGHTS_NAME, MivaConfig
from .mask_streams import decode_masks
from .loop import CHECKPOINT_DIR, Part, ProgressCallback, diffusion_loss, part_rows, plot_losses, run_training

DEFAULT_LR = {"animatediff-v3": 1e-5, "wan2.1-1.3b": 1e-5}  # the paper's Adam lr for the real bases; others: FALLBACK_LR
FALLBACK_LR = 1e-3


COLOUR_ORDERS = ((0, 1, 2), (1, 2, 0), (2, 0, 1), (0, 2, 1), (2, 1, 0), (1, 0, 2))


def colour_variants(clips: list[np.ndarray], n: int) -> list[np.ndarray]:
    """Each (F, H, W, 3) clip in `n` colourings (1 <= n <= 6): itself, then its RGB channels permuted.

    A channel permutation keeps every edge, shape and motion exactly and changes only hues.
    """
    if not 1 <= n <= len(COLOUR_ORDERS):
        raise ValueError(f"augment must be 1 to {len(COLOUR_ORDERS)} colour variants, not {n}.")
    return [clip[..., list(order)] for clip in clips for order in COLOUR_ORDERS[:n]]


class MaskTraining:
    """How an M-MIVA trains (§3.4, B.1.2): each clip's mask clip joins the batch (video clips, then
    their mask clips, at the same timestep), and the video's attention is biased by the subject
    masks — the ground truth with probability p(step) = 0.5 (1 + cos(π step / steps)), else the
    one-step prediction of the masks from the same noisy batch (decoded through the VAE).

    `mask_loss_weight` weighs the mask clips' loss against the video's (1: the paper's single
    denoising objective over both). Binary mask clips have sharp, high-contrast edges, so their loss
    can dwarf the video's, and with gradient clipping the video then barely learns (see the README).
    """

    def __init__(self, pipe, call, name: str, masks: list[np.ndarray], steps: int, augment: int = 1,
                 mask_loss_weight: float = 1.0):
        self.pipe, self.call, self.name, self.steps, self.augment = pipe, call, name, steps, augment
        self.mask_loss_weight = mask_loss_weight
        pixels = [np.repeat((np.asarray(m, dtype=np.float32) * 255).round().astype(np.uint8)[..., None], 3, -1)
                  for m in masks]
        self.latents = pipe.encode_clips(pixels)  # (n, c, f, h, w)
        grid = self.latents.shape[-2:]
        truth = pipe.base.latent_subjects(torch.from_numpy(np.stack(masks)).float())  # (n, latent frames, H, W)
        self.truth = masks_lib.to_latent_grid(truth, *grid).to(self.latents)

    def loss(self, latents: torch.Tensor, index: torch.Tensor, generator: torch.Generator, step: int,
             part: Part | None = None) -> torch.Tensor:
        """The loss of the step's clips `index` ((b, c, f, h, w) `latents`), or of their `part` (a row
        block of the video clips with their own mask clips), after the whole batch's draws."""
        base, full = self.pipe.base, len(index)
        rows = part_rows(full, part)
        b = len(rows)  # the clips this part trains on
        index = index // self.augment  # colour variant k of clip i is row i * augment + k; masks are per clip
        truth = self.truth[index[rows].to(self.truth.device)]
        use_truth = float(torch.rand((), generator=generator)) < schedules.mask_dropout_probability(step, self.steps)
        timesteps = base.sample_timesteps(full, generator).repeat(2)
        streams = (None, self.name)  # the batch: the video clips, then their mask clips

        def set_masks(noisy, t, first):
            subjects = truth
            if not use_truth:  # the one-step prediction, as sampling will see it
                self.call.set(subjects={self.name: truth[:, :1].expand_as(truth)}, streams=streams)  # the prior
                with torch.no_grad():
                    out = base.model_output(base.denoise(base.model_input(noisy, first), t, base.null_prompt_embeds), first)
                    x0 = base.predicted_sample(out[b:], noisy[b:], t[b:].reshape(-1, *[1] * (noisy.ndim - 1)))
                    x0[:, :, 0] = first[b:]
                    decoded = torch.stack([decode_masks(base, x0[k : k + 1]) for k in range(b)])
                    subjects = masks_lib.to_latent_grid(base.latent_subjects(decoded), *noisy.shape[-2:]).to(truth)
                    subjects[:, 0] = truth[:, 0]
            self.call.set(subjects={self.name: subjects}, streams=streams)

        try:
            both = torch.cat([latents, self.latents[index.to(self.latents.device)]])
            weights = torch.tensor([1.0] * full + [self.mask_loss_weight] * full)
            return diffusion_loss(base, both, generator, timesteps=timesteps, before_forward=set_masks, clip_weights=weights,
                                  rows=torch.cat([rows, rows + full]))
        finally:
            self.call.set(subjects={}, streams=(None,))


def save_preview(pipe, name: str, first: np.ndarray, out: Path, frames: int, steps: int = 25, seed: int = 0,
                 mask: np.ndarray | None = None) -> Path:
    """The adapter card's preview.gif: loaded adapter `name` animating `first` (an M-MIVA gets `mask`)."""
    video = pipe(first, adapters={name: 1.0}, num_frames=frames, num_inference_steps=steps, seed=seed,
                 masks={name: mask} if mask is not None else None)
    return video.save(Path(out) / "preview.gif")


def start_from(manager, name: str, folder: str | Path) -> None:
    """Set adapter `name`'s weights to those of the trained adapter in `folder` (same base and ranks).

    An M-MIVA started from a plain MIVA takes its CFA, implicit prompt and temporal LoRA, and its
    mask stream's twin CFA starts as a copy of that CFA (§3.4: "identically initialized"), so the
    mask stream begins by moving the mask the way the video moves. A MIVA started from an M-MIVA
    takes the parts they share.
    """
    folder = Path(folder)
    config, tensors = read_adapter(folder)
    if config.base != manager.base:
        raise ValueError(f"the adapter to start from, '{folder.name}', was made for base '{config.base}' "
                         f"but this run trains on '{manager.base}'; start from an adapter of the same base.")
    twins = {k: k.replace(".mask_adapters.", ".adapters.") for k in manager.parameters(name)}
    start = {k: tensors[k if k in tensors else twin] for k, twin in twins.items() if k in tensors or twin in tensors}
    manager.load_state_dict(name, start, source=f"the adapter to start from ({folder / WEIGHTS_NAME})")


def train_adapter(
    pipe,
    clips: list[np.ndarray],
    out: str | Path,
    motion: str,
    name: str | None = None,
    steps: int = 500,
    lr: float | None = None,
    batch: int = 1,
    seed: int = 0,
    resume: bool = False,
    checkpoint_every: int = 50,
    config: MivaConfig | None = None,
    callback: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    mixed_precision: str | None = None,
    gradient_checkpointing: bool = False,
    preview_steps: int = 25,
    sources: list[str] | None = None,
    augment: int = 1,
    masks: list[np.ndarray] | None = None,
    mask_loss_weight: float = 1.0,
    init: str | Path | None = None,
    accelerator=None,
    accumulate: int = 1,
) -> Path | None:
    """Teach `pipe`'s base a motion from `clips`; write the adapter (card, preview GIF, loss curve) to `out`.

    `augment` > 1 trains on that many colour variants of each clip (`colour_variants`), so a motion
    taught from a few clips is not tied to their colours. `masks` (one (F, H, W) subject mask
    sequence in [0, 1] per clip) trains an M-MIVA (§3.4) instead of a MIVA, its mask clips' loss
    weighted by `mask_loss_weight` (see `MaskTraining`). `init` (an adapter folder) starts from that
    adapter's weights instead of the zero-initialised ones (`start_from`). With an `accelerator`
    (under `accelerate launch`) and/or `accumulate` > 1 micro-batches, each step's `batch` is split
    across processes and micro-batches and the step is the one a single process takes on all of it
    (`miva.loop`); the main process writes the adapter.

    Returns the adapter folder, or None when `should_stop` ended the run early (its checkpoint stays,
    so `resume=True` continues it).
    """
    base, out = pipe.base, Path(out)
    name = check_adapter_name(name or out.name)
    if not clips:
        raise ValueError("no clips to train on; give at least one clip of the motion.")
    if steps < 1 or batch < 1:
        raise ValueError(f"steps ({steps}) and batch ({batch}) must be at least 1.")
    if masks is None and mask_loss_weight != 1:  # a plain MIVA has no mask clips to weigh
        raise ValueError(f"mask_loss_weight ({mask_loss_weight}) weighs an M-MIVA's mask clips; give masks, or leave it at 1.")
    if masks is not None and not mask_loss_weight > 0:  # before any clip is encoded
        raise ValueError(f"mask_loss_weight must be above 0, not {mask_loss_weight}; 1 is the paper's objective.")
    if (out / WEIGHTS_NAME).is_file() and not (out / CHECKPOINT_DIR).is_dir():
        raise ValueError(f"'{out}' already holds a finished adapter; choose another --out folder.")
    if name in pipe.adapters:
        raise ValueError(f"an adapter named '{name}' is loaded; unload it or train under another name.")
    lr = lr if lr is not None else DEFAULT_LR.get(base.id, FALLBACK_LR)
    frames = clips[0].shape[0]
    latents = pipe.encode_clips(colour_variants(clips, augment)).to(base.device)  # (n, c, f, h, w)
    if masks is not None:
        if len(masks) != len(clips):
            raise ValueError(f"an M-MIVA needs one mask sequence per clip; got {len(masks)} for {len(clips)} clips.")
        for i, (m, c) in enumerate(zip(masks, clips)):
            if np.shape(m) != c.shape[:3]:
                raise ValueError(f"the masks of clip {i} are {np.shape(m)} but the clip is {c.shape[:3]}; "
                                 "give one (frames, height, width) mask per frame.")
    config = config or MivaConfig.for_base(base.id, masked=masks is not None)
    if config.masked and masks is None:
        raise ValueError("an M-MIVA (masked=True) trains from clips with subject masks; pass masks=, one per clip.")
    config.motion = motion
    started = {"init": Path(init).name} if init is not None else {}  # recorded in the card and the checkpoint
    config.training = {"clips": len(clips), "frames": frames, "steps": steps, "lr": lr, "batch": batch,
                       "seed": seed, "augment": augment, "sources": list(sources or [])[:16],
                       **({"mask_loss_weight": mask_loss_weight} if masks is not None else {}),
                       **started}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        manager = attach(base.unet, config, name, base=base.id)
    try:
        with manager.call(weights={name: 1.0}) as call:  # only this adapter acts, at its trained weight
            manager.set_trainable(name)
            if init is not None:  # a resumed run's checkpoint replaces these weights
                start_from(manager, name, init)
            if gradient_checkpointing:
                set_gradient_checkpointing(base.unet, True)
            params = manager.parameters(name)
            autocast = (torch.autocast(device_type=base.device.type, dtype=getattr(torch, mixed_precision))
                        if mixed_precision else contextlib.nullcontext())

            mask_training = None
            if config.masked:
                mask_training = MaskTraining(pipe, call, name, masks, steps, augment, mask_loss_weight)

            def loss_fn(step: int, generator: torch.Generator, part: Part | None = None) -> torch.Tensor:
                index = torch.randint(0, len(latents), (batch,), generator=generator)
                with autocast:
                    if mask_training is not None:
                        return mask_training.loss(latents[index.to(latents.device)], index, generator, step, part)
                    return diffusion_loss(base, latents[index.to(latents.device)], generator,
                                          rows=None if part is None else part_rows(batch, part))

            base.unet.train()
            state = run_training(
                params, loss_fn, steps, out, seed=seed, lr=lr, checkpoint_every=checkpoint_every, resume=resume,
                meta={"what": "adapter", "base": base.id, "motion": motion, "clips": len(clips), "batch": batch,
                      "seed": seed, "lr": lr, "augment": augment,
                      # an M-MIVA's mask-dropout schedule depends on the run's length
                      **({"masked": True, "steps": steps} if config.masked else {}),
                      **({"mask_loss_weight": mask_loss_weight} if config.masked and mask_loss_weight != 1 else {}),
                      **started},
                callback=callback, should_stop=should_stop, accelerator=accelerator, accumulate=accumulate,
                loss_scaling=mixed_precision == "float16",
            )
            base.unet.eval()
            if state.step < steps:
                return None
            if accelerator is not None and not accelerator.is_main_process:
                accelerator.wait_for_everyone()  # the main process writes the adapter
                return out
            config.training["seconds"] = round(state.seconds, 1)
            config.training["final_loss"] = round(float(np.mean(state.losses[-20:])), 5)
            out.mkdir(parents=True, exist_ok=True)
            plot_losses(state.losses, out / "loss.png", f"{motion}: training loss")
            save_preview(pipe, name, clips[0][0], out, frames, preview_steps, seed, masks[0][0] if config.masked else None)
            save_adapter(base.unet, name, out)
            shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
            if accelerator is not None:
                accelerator.wait_for_everyone()
            return out
    finally:  # a failed or interrupted run leaves the shared base as it found it
        base.unet.eval()
        if gradient_checkpointing:
            set_gradient_checkpointing(base.unet, False)
        detach(base.unet, name)
