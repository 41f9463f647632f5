"""Training: the denoising loss with a clean first frame, and a resumable training loop.

One loop serves both the few-shot adapter training (only the MIVA's parameters learn) and the toy
base (every UNet parameter learns). Every random draw of step s comes from a generator seeded by
(seed, s), and the data of step s is a function of s, so a run resumed from its last checkpoint
continues exactly as if it had never stopped: checkpoints hold the step, the parameters, the
optimiser state and the loss history (safetensors + JSON, nothing pickled).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import masks as masks_lib
from . import schedules
from .adapter import attach, check_adapter_name, detach, read_adapter, save_adapter
from .backends import Base, encode_frames
from .config import WEIGHTS_NAME, MivaConfig
from .data import clips_to_tensor

CHECKPOINT_DIR = "checkpoint"


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of training step `step`: independent of how the run was split into sessions."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63 - 1))


def diffusion_loss(base: Base, latents: torch.Tensor, generator: torch.Generator, min_snr: float | None = None,
                   timesteps: torch.Tensor | None = None,
                   before_forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
                   prompt_embeds: torch.Tensor | None = None, clip_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Denoising loss on (b, c, f, h, w) clean latents; frame 0 stays clean and is not in the loss.

    The target follows the base's schedule (ε, v or the clean sample; the flow for flow matching); `min_snr` applies
    Min-SNR-γ loss weighting (Hang et al. 2023); None (the paper's setting) is plain MSE.
    `before_forward(noisy, timesteps, first)` runs after noising, before the denoiser (M-MIVA sets its masks there).
    `prompt_embeds` (1 or b, tokens, d) defaults to the empty prompt, which is what MIVAs train on.
    `clip_weights` (b,) weighs each clip's loss (None: all 1); the result is their weighted mean.
    """
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    if timesteps is None:
        timesteps = base.sample_timesteps(b, generator)
    timesteps = timesteps.to(latents.device)
    noisy = base.add_noise(latents, noise, timesteps)
    first = latents[:, :, 0]
    noisy[:, :, 0] = first  # the clean first frame, as at sampling time
    if before_forward is not None:
        before_forward(noisy, timesteps, first)
    prompt = base.null_prompt_embeds if prompt_embeds is None else prompt_embeds
    pred = base.model_output(base.denoise(base.model_input(noisy, first), timesteps, prompt), first)
    target = base.training_target(latents, noise, timesteps)
    per_clip = (pred[:, :, 1:] - target[:, :, 1:]).pow(2).mean(dim=(1, 2, 3, 4))  # (b,)
    if min_snr is not None:
        per_clip = per_clip * base.min_snr_weights(timesteps, min_snr).to(per_clip)
    if clip_weights is not None:
        return (per_clip * clip_weights.to(per_clip)).sum() / clip_weights.sum().to(per_clip)
    return per_clip.mean()


@dataclass
class TrainState:
    step: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)  # what the run was (checked on resume)


def save_checkpoint(folder: Path, state: TrainState, params: dict[str, torch.Tensor], optimizer, extra: dict[str, torch.Tensor] | None = None) -> None:
    """Write params, optimiser moments and the JSON state atomically enough: state.json last."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"param.{k}": v.detach().cpu().contiguous() for k, v in params.items()}
    names = list(params)
    for index, moments in optimizer.state_dict()["state"].items():
        for key, value in moments.items():
            if torch.is_tensor(value):
                tensors[f"optim.{names[index]}.{key}"] = value.detach().cpu().contiguous().reshape(value.shape)
    for key, value in (extra or {}).items():
        tensors[f"extra.{key}"] = value.detach().cpu().contiguous()
    shards = _shards(tensors)
    for old in folder.glob("state*.safetensors"):
        old.unlink()
    for index, shard in enumerate(shards):
        tmp = folder / f"state-{index:05d}.tmp"
        save_file(shard, str(tmp))
        tmp.replace(folder / f"state-{index:05d}-of-{len(shards):05d}.safetensors")
    groups = optimizer.state_dict()["param_groups"]
    (folder / "state.json").write_text(json.dumps({
        "step": state.step, "losses": state.losses, "seconds": state.seconds, "meta": state.meta,
        "param_groups": groups}, indent=1) + "\n")


SHARD_BYTES = 15 * 2**20  # checkpoint files stay small enough to commit, upload and copy between machines


def _shards(tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    shards, size = [{}], 0
    for key, value in tensors.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    return shards


def read_checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (its `state*.safetensors` shards)."""
    files = sorted(Path(folder).glob("state*.safetensors"))
    if not files:
        raise FileNotFoundError(f"checkpoint '{folder}' has no state*.safetensors; it is incomplete.")
    tensors = {}
    for file in files:
        tensors.update(load_file(str(file)))
    return tensors


def load_checkpoint(folder: Path, params: dict[str, torch.Tensor], optimizer) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """Restore params and optimiser from `folder`; returns the state and the extra tensors."""
    info = json.loads((folder / "state.json").read_text())
    tensors = read_checkpoint_tensors(folder)
    missing = [k for k in params if f"param.{k}" not in tensors]
    if missing:
        raise ValueError(f"checkpoint '{folder}' lacks {len(missing)} parameters (e.g. '{missing[0]}'); it is from another run.")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[f"param.{key}"])
    index = {name: i for i, name in enumerate(params)}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            name, moment = key[len("optim."):].rsplit(".", 1)  # "optim.<param name>.<exp_avg|...>"
            state.setdefault(index[name], {})[moment] = value
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    return TrainState(info["step"], info["losses"], info["seconds"], info.get("meta", {})), extra


ProgressCallback = Callable[[int, int, float, float], None]  # (step, total, loss, eta_seconds)


def run_training(
    params: dict[str, torch.nn.Parameter],
    loss_fn: Callable[[int, torch.Generator], torch.Tensor],
    steps: int,
    folder: Path,
    seed: int = 0,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    warmup: int = 0,
    grad_clip: float = 1.0,
    checkpoint_every: int = 100,
    resume: bool = False,
    meta: dict | None = None,
    callback: ProgressCallback | None = None,
    ema: float | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainState:
    """AdamW on `params` for `steps` steps of `loss_fn(step, generator)`, checkpointing to folder/checkpoint.

    `ema` keeps an exponential moving average of the parameters (saved with the checkpoint and
    returned in state.meta['ema'] as tensors' names); `should_stop` lets a UI stop between steps.
    """
    folder = Path(folder)
    ckpt = folder / CHECKPOINT_DIR
    optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=weight_decay)
    averages = {k: p.detach().clone() for k, p in params.items()} if ema else {}
    state = TrainState(meta=dict(meta or {}))
    if resume and (ckpt / "state.json").is_file():
        saved = json.loads((ckpt / "state.json").read_text()).get("meta", {})  # checked before any tensor is read
        if meta and {k: saved.get(k) for k in meta} != {k: meta[k] for k in meta}:
            raise ValueError(f"the checkpoint in '{folder}' is from a different run ({saved}); use another --out folder or drop --resume.")
        state, extra = load_checkpoint(ckpt, params, optimizer)
        averages = {k: extra[f"ema.{k}"].to(p) if f"ema.{k}" in extra else p.detach().clone()
                    for k, p in params.items()} if ema else {}  # a run may resume on another device
    elif (ckpt / "state.json").is_file():
        raise ValueError(f"'{folder}' already holds a training run; pass --resume to continue it or choose another --out folder.")

    def schedule(step: int) -> float:
        return min(1.0, (step + 1) / warmup) if warmup else 1.0

    def checkpoint() -> None:
        extra = {f"ema.{k}": v for k, v in averages.items()}
        save_checkpoint(ckpt, state, params, optimizer, extra)

    start = time.perf_counter()
    first_step = state.step
    while state.step < steps:
        if should_stop is not None and should_stop():
            if state.step > first_step:
                state.seconds += time.perf_counter() - start
                checkpoint()  # a stop keeps all finished steps
            break
        for group in optimizer.param_groups:
            group["lr"] = lr * schedule(state.step)
        loss = loss_fn(state.step, step_generator(seed, state.step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), grad_clip)
        optimizer.step()
        if ema:
            with torch.no_grad():
                for k, p in params.items():
                    averages[k].lerp_(p.detach(), 1 - ema)
        state.step += 1
        value = float(loss.detach())
        state.losses.append(value)
        elapsed = time.perf_counter() - start
        eta = elapsed / (state.step - first_step) * (steps - state.step)
        if callback is not None:
            callback(state.step, steps, value, eta)
        if state.step % checkpoint_every == 0 or state.step == steps:
            state.seconds += time.perf_counter() - start
            start = time.perf_counter()
            first_step = state.step
            checkpoint()
    if ema:
        state.meta["ema"] = averages
    return state


def smoothed(values: Iterable[float], window: int = 20) -> list[float]:
    values = list(values)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_losses(losses: list[float], path: Path, title: str = "training loss") -> Path:
    """A loss-curve PNG (raw and smoothed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.plot(losses, alpha=0.3, label="loss")
    ax.plot(smoothed(losses, max(1, len(losses) // 20)), label="smoothed")
    ax.set_xlabel("step")
    ax.set_yscale("log" if min(losses, default=1) > 0 else "linear")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def format_eta(seconds: float) -> str:
    seconds = max(0, int(math.ceil(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


# -- few-shot adapter training ---------------------------------------------------------------------
DEFAULT_LR = {"animatediff-v3": 1e-5, "wan2.1-1.3b": 1e-5}  # the paper's Adam lr for the real bases; others: FALLBACK_LR
FALLBACK_LR = 1e-3


def encode_clips(encode: Callable[[torch.Tensor], torch.Tensor], clips: list[np.ndarray], chunk: int = 8) -> torch.Tensor:
    """(F, H, W, 3) uint8 clips -> (n, c, F, h, w) latents, `encode` taking (b, 3, H, W) in [-1, 1]."""
    return encode_frames(encode, clips_to_tensor(clips), chunk)


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

    def __init__(self, pipe, manager, name: str, masks: list[np.ndarray], steps: int, augment: int = 1,
                 mask_loss_weight: float = 1.0):
        self.pipe, self.manager, self.name, self.steps, self.augment = pipe, manager, name, steps, augment
        self.mask_loss_weight = mask_loss_weight
        pixels = [np.repeat((np.asarray(m, dtype=np.float32) * 255).round().astype(np.uint8)[..., None], 3, -1)
                  for m in masks]
        self.latents = pipe.encode_clips(pixels)  # (n, c, f, h, w)
        grid = self.latents.shape[-2:]
        self.truth = masks_lib.to_latent_grid(torch.from_numpy(np.stack(masks)).float(), *grid).to(self.latents)

    def loss(self, latents: torch.Tensor, index: torch.Tensor, generator: torch.Generator, step: int) -> torch.Tensor:
        base, b = self.pipe.base, len(index)
        index = index // self.augment  # colour variant k of clip i is row i * augment + k; masks are per clip
        truth = self.truth[index.to(self.truth.device)]
        use_truth = float(torch.rand((), generator=generator)) < schedules.mask_dropout_probability(step, self.steps)
        timesteps = base.sample_timesteps(b, generator).repeat(2)
        context = self.manager.context

        def set_masks(noisy, t, first):
            subjects = truth
            if not use_truth:  # the one-step prediction, as sampling will see it
                prior = truth[:, :1].expand_as(truth)
                context.set_subjects({self.name: prior}, streams=(None, self.name))
                with torch.no_grad():
                    out = base.model_output(base.denoise(base.model_input(noisy, first), t, base.null_prompt_embeds), first)
                    x0 = base.predicted_sample(out[b:], noisy[b:], t[b:].reshape(-1, *[1] * (noisy.ndim - 1)))
                    x0[:, :, 0] = first[b:]
                    decoded = torch.stack([self.pipe.decode_unit(x0[k : k + 1]) for k in range(b)])
                    subjects = masks_lib.to_latent_grid(decoded, *noisy.shape[-2:]).to(truth)
                    subjects[:, 0] = truth[:, 0]
            context.set_subjects({self.name: subjects}, streams=(None, self.name))

        try:
            both = torch.cat([latents, self.latents[index.to(self.latents.device)]])
            weights = torch.tensor([1.0] * b + [self.mask_loss_weight] * b)
            return diffusion_loss(base, both, generator, timesteps=timesteps, before_forward=set_masks, clip_weights=weights)
        finally:
            context.set_subjects({})


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
) -> Path | None:
    """Teach `pipe`'s base a motion from `clips`; write the adapter (card, preview GIF, loss curve) to `out`.

    `augment` > 1 trains on that many colour variants of each clip (`colour_variants`), so a motion
    taught from a few clips is not tied to their colours. `masks` (one (F, H, W) subject mask
    sequence in [0, 1] per clip) trains an M-MIVA (§3.4) instead of a MIVA, its mask clips' loss
    weighted by `mask_loss_weight` (see `MaskTraining`). `init` (an adapter folder) starts from that
    adapter's weights instead of the zero-initialised ones (`start_from`).

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
        manager.set_trainable(name)
        manager.set_weights({name: 1.0})
        if init is not None:  # a resumed run's checkpoint replaces these weights
            start_from(manager, name, init)
        if gradient_checkpointing:
            base.unet.enable_gradient_checkpointing()
        params = manager.parameters(name)
        autocast = (torch.autocast(device_type=base.device.type, dtype=getattr(torch, mixed_precision))
                    if mixed_precision else contextlib.nullcontext())

        mask_training = None
        if config.masked:
            mask_training = MaskTraining(pipe, manager, name, masks, steps, augment, mask_loss_weight)

        def loss_fn(step: int, generator: torch.Generator) -> torch.Tensor:
            index = torch.randint(0, len(latents), (batch,), generator=generator)
            with autocast:
                if mask_training is not None:
                    return mask_training.loss(latents[index.to(latents.device)], index, generator, step)
                return diffusion_loss(base, latents[index.to(latents.device)], generator)

        base.unet.train()
        state = run_training(
            params, loss_fn, steps, out, seed=seed, lr=lr, checkpoint_every=checkpoint_every, resume=resume,
            meta={"what": "adapter", "base": base.id, "motion": motion, "clips": len(clips), "batch": batch,
                  "seed": seed, "lr": lr, "augment": augment,
                  # an M-MIVA's mask-dropout schedule depends on the run's length
                  **({"masked": True, "steps": steps} if config.masked else {}),
                  **({"mask_loss_weight": mask_loss_weight} if config.masked and mask_loss_weight != 1 else {}),
                  **started},
            callback=callback, should_stop=should_stop,
        )
        base.unet.eval()
        if gradient_checkpointing:
            base.unet.disable_gradient_checkpointing()
        if state.step < steps:
            return None
        config.training["seconds"] = round(state.seconds, 1)
        config.training["final_loss"] = round(float(np.mean(state.losses[-20:])), 5)
        out.mkdir(parents=True, exist_ok=True)
        plot_losses(state.losses, out / "loss.png", f"{motion}: training loss")
        save_preview(pipe, name, clips[0][0], out, frames, preview_steps, seed, masks[0][0] if config.masked else None)
        save_adapter(base.unet, name, out)
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
        return out
    finally:
        base.unet.eval()
        detach(base.unet, name)
