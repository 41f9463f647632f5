"""The denoising loss with a clean first frame, and a resumable training loop with its checkpoints.

One loop serves both the few-shot adapter training (`miva.train`: only the MIVA's parameters learn)
and the toy base (every UNet parameter learns). Every random draw of step s comes from a generator seeded by
(seed, s), and the data of step s is a function of s, so a run resumed from its last checkpoint
continues exactly as if it had never stopped: checkpoints hold the step, the parameters, the
optimiser state and the loss history (safetensors + JSON, nothing pickled).

The same draws make data parallelism exact: under `accelerate launch` every process draws step s's
whole batch (clips, timesteps, noise), keeps its own equal part of the rows, and the parameters'
gradients are averaged across processes, so n processes (and `accumulate` micro-batches each) take
the step one process takes on the whole batch. Only the adapter learns, inside a frozen denoiser
that `Base` calls directly, so the gradients are averaged with accelerate's `reduce` rather than by
wrapping the denoiser in DistributedDataParallel.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .backends.base import Base, encode_frames
from .data import clips_to_tensor

CHECKPOINT_DIR = "checkpoint"


Part = tuple[int, int]  # (k, n): the k-th of n equal parts of a step's batch


def part_rows(batch: int, part: Part | None) -> torch.Tensor:
    """The rows of a `batch`-row step that part (k, n) trains on (all of them for None)."""
    if part is None:
        return torch.arange(batch)
    k, n = part
    if batch % n:
        raise ValueError(f"a batch of {batch} clips does not split into {n} equal parts (processes x accumulation "
                         f"steps); use a batch that is a multiple of {n}.")
    size = batch // n
    return torch.arange(k * size, (k + 1) * size)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of training step `step`: independent of how the run was split into sessions."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63 - 1))


def diffusion_loss(base: Base, latents: torch.Tensor, generator: torch.Generator, timesteps: torch.Tensor | None = None,
                   before_forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
                   prompt_embeds: torch.Tensor | None = None, clip_weights: torch.Tensor | None = None,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
    """Denoising loss on (b, c, f, h, w) clean latents; frame 0 stays clean and is not in the loss.

    The target follows the base's schedule (ε, v or the clean sample; the flow for flow matching); plain MSE.
    `before_forward(noisy, timesteps, first)` runs after noising, before the denoiser (M-MIVA sets its masks there).
    `prompt_embeds` (1 or b, tokens, d) defaults to the empty prompt, which is what MIVAs train on.
    `clip_weights` (b,) weighs each clip's loss (None: all 1); the result is their weighted mean.
    `rows` keeps only those clips, after the whole batch's noise and timesteps are drawn (`part_rows`).
    """
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    if timesteps is None:
        timesteps = base.sample_timesteps(b, generator)
    if rows is not None:
        latents, noise, timesteps = latents[rows.to(latents.device)], noise[rows.to(latents.device)], timesteps[rows]
        clip_weights = None if clip_weights is None else clip_weights[rows]
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
    if clip_weights is not None:
        return (per_clip * clip_weights.to(per_clip)).sum() / clip_weights.sum().to(per_clip)
    return per_clip.mean()


@dataclass
class TrainState:
    step: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)  # what the run was (checked on resume)
    grad_scaler: dict = field(default_factory=dict)  # fp16 loss scaling's state (empty without it)


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
        "grad_scaler": state.grad_scaler, "param_groups": groups}, indent=1) + "\n")


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
    return TrainState(info["step"], info["losses"], info["seconds"], info.get("meta", {}),
                      info.get("grad_scaler", {})), extra


ProgressCallback = Callable[[int, int, float, float], None]  # (step, total, loss, eta_seconds)


def run_training(
    params: dict[str, torch.nn.Parameter],
    loss_fn: Callable[..., torch.Tensor],
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
    accelerator=None,
    accumulate: int = 1,
    loss_scaling: bool = False,
) -> TrainState:
    """AdamW on `params` for `steps` steps of `loss_fn(step, generator)`, checkpointing to folder/checkpoint.

    `ema` keeps an exponential moving average of the parameters (saved with the checkpoint and
    returned in state.meta['ema'] as tensors' names); `should_stop` lets a UI stop between steps.
    With an `accelerate.Accelerator` of n processes or `accumulate` > 1, each step's batch is split
    into n x accumulate parts and `loss_fn(step, generator, part)` is the mean loss of `part` (see
    the module's docstring); the main process alone writes checkpoints. `loss_scaling` (for float16
    autocast, whose small gradients would flush to zero) scales the loss with `torch.amp.GradScaler`,
    skipping the steps whose gradients overflow; its scale is checkpointed with the run.
    """
    if accumulate < 1:
        raise ValueError(f"accumulate must be at least 1, not {accumulate}.")
    world, rank = (accelerator.num_processes, accelerator.process_index) if accelerator is not None else (1, 0)
    parts = world * accumulate
    main = rank == 0
    folder = Path(folder)
    ckpt = folder / CHECKPOINT_DIR
    optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=weight_decay)
    scaler = torch.amp.GradScaler(next(iter(params.values())).device.type, enabled=loss_scaling)
    averages = {k: p.detach().clone() for k, p in params.items()} if ema else {}
    state = TrainState(meta=dict(meta or {}))
    if resume and (ckpt / "state.json").is_file():
        saved = json.loads((ckpt / "state.json").read_text()).get("meta", {})  # checked before any tensor is read
        if meta and {k: saved.get(k) for k in meta} != {k: meta[k] for k in meta}:
            raise ValueError(f"the checkpoint in '{folder}' is from a different run ({saved}); use another --out folder or drop --resume.")
        state, extra = load_checkpoint(ckpt, params, optimizer)
        if loss_scaling and state.grad_scaler:
            scaler.load_state_dict(state.grad_scaler)
        averages = {k: extra[f"ema.{k}"].to(p) if f"ema.{k}" in extra else p.detach().clone()
                    for k, p in params.items()} if ema else {}  # a run may resume on another device
    elif (ckpt / "state.json").is_file():
        raise ValueError(f"'{folder}' already holds a training run; pass --resume to continue it or choose another --out folder.")

    def schedule(step: int) -> float:
        return min(1.0, (step + 1) / warmup) if warmup else 1.0

    def checkpoint() -> None:
        if main:
            state.grad_scaler = scaler.state_dict()
            extra = {f"ema.{k}": v for k, v in averages.items()}
            save_checkpoint(ckpt, state, params, optimizer, extra)
        if world > 1:
            accelerator.wait_for_everyone()

    def backward() -> torch.Tensor:
        """Step `state.step`'s gradients on this process's parts; returns the step's mean loss."""
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros(())
        for k in range(accumulate):
            generator = step_generator(seed, state.step)  # the same whole-batch draws for every part
            loss = loss_fn(state.step, generator) if parts == 1 else loss_fn(state.step, generator,
                                                                              (rank * accumulate + k, parts))
            scaler.scale(loss / accumulate).backward()
            total += loss.detach().float().cpu() / accumulate
        if world > 1:
            grads = [p.grad for p in params.values() if p.grad is not None]
            flat = accelerator.reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
            for g, mean in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(mean.view_as(g))
            total = accelerator.reduce(total.to(accelerator.device), reduction="mean").cpu()
        return total

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
        loss = backward()
        scaler.unscale_(optimizer)  # after the processes' mean: an overflow anywhere skips the step everywhere
        torch.nn.utils.clip_grad_norm_(params.values(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if ema:
            with torch.no_grad():
                for k, p in params.items():
                    averages[k].lerp_(p.detach(), 1 - ema)
        state.step += 1
        value = float(loss)
        state.losses.append(value)
        elapsed = time.perf_counter() - start
        eta = elapsed / (state.step - first_step) * (steps - state.step)
        if callback is not None and main:
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


def encode_clips(encode: Callable[[torch.Tensor], torch.Tensor], clips: list[np.ndarray], chunk: int = 8) -> torch.Tensor:
    """(F, H, W, 3) uint8 clips -> (n, c, F, h, w) latents, `encode` taking (b, 3, H, W) in [-1, 1]."""
    return encode_frames(encode, clips_to_tensor(clips), chunk)
