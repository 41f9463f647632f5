"""Memory of training one MIVA / M-MIVA on SD1.5 + AnimateDiff v3 at 16x512x320 (random weights).

    python benchmarks/train_memory.py                  # a few steps per option set: peak memory
    python benchmarks/train_memory.py --static-only    # parameter + gradient + optimiser bytes (meta)
    python benchmarks/train_memory.py --config tiny --device cpu   # the same code on the tiny base

Each row trains for `--steps` AdamW steps with one option set: the frozen base in fp32 or half
precision, bf16/fp16 autocast, gradient checkpointing. Every row prints the peak of the bytes held by
live tensors, tracked op by op (the weights plus every tensor an op creates, until it is freed); on a
GPU the CUDA allocator's peak is printed beside it. Without a GPU the default `--device fake` runs
the full-size step on fake tensors (`FakeTensorMode`: real shapes, dtypes and autograd, no data), so
the same tracked peak is measured on a CPU in seconds; the CPU's attention kernel keeps O(tokens)
state as the GPU's fused kernels do. The static part (weights, the adapter's gradients and AdamW's two
moments) is counted exactly on the meta device. The paper reports 9.8 GB (MIVA) and 11.0 GB (M-MIVA).
An M-MIVA step is its real batch (the video clip and its mask clip, with the subject mask biasing
the attention, here the ground-truth path of `miva.train.MaskTraining`).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import weakref
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from miva.adapter import attach  # noqa: E402
from miva.backends import animatediff  # noqa: E402
from miva.backends.base import set_gradient_checkpointing  # noqa: E402
from miva.config import MivaConfig  # noqa: E402

FAKE = FakeTensorMode()  # one mode per process: tensors cached between runs (frame indices) stay valid
# (frozen base dtype, autocast dtype, gradient checkpointing)
OPTIONS = {
    "fp32": (torch.float32, None, False),
    "fp32 + checkpointing": (torch.float32, None, True),
    "half base + autocast": ("half", "half", False),
    "half base + autocast + checkpointing": ("half", "half", True),
}


def configs(name: str):
    """(unet, motion adapter) configs and latent (frames, h, w) of the benchmark config."""
    if name == "tiny":
        unet, adapter, _ = animatediff.tiny_configs()
        return unet, adapter, (4, 8, 8)
    return (animatediff._config("sd15_unet.json"), animatediff._config("animatediff_motion_adapter_v1_5_3.json"),
            (16, 40, 64))  # 16 x 320 x 512 pixels


class LiveBytes(TorchDispatchMode):
    """Bytes held by live tensor storages created while active (`now`, and its `peak`); the storages of
    `existing` tensors (the weights, counted apart) are never counted, nor are views of them."""

    def __init__(self, existing=()):
        super().__init__()
        self.now = self.peak = 0
        self._seen = WeakIdKeyDictionary()
        for tensor in existing:
            self._seen[tensor.untyped_storage()] = 0

    def _free(self, nbytes: int) -> None:
        self.now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage not in self._seen:
                    self._seen[storage] = nbytes = storage.nbytes()
                    weakref.finalize(storage, self._free, nbytes)
                    self.now += nbytes
                    self.peak = max(self.peak, self.now)
        return out


def build(name: str, device: str, dtype: torch.dtype, masked: bool, fake: FakeTensorMode | None = None):
    """The frozen denoiser in `dtype` with one trainable (fp32) MIVA attached; its parameters. With
    `fake` (and `device` "cpu"), every weight is an empty fake tensor of its real shape and dtype."""
    unet_cfg, adapter_cfg, _ = configs(name)
    unet = animatediff.build_unet(unet_cfg, adapter_cfg, device="meta" if fake else device)
    unet.requires_grad_(False)
    if device != "meta" and not fake:
        with animatediff.quiet_diffusers():
            unet.to(dtype=dtype)
    base_id = "animatediff-v3" if name == "full" else "tiny"
    manager = attach(unet, MivaConfig.for_base(base_id, masked=masked), "default", base=base_id)
    manager.set_trainable("default")
    if fake:
        fake_weights(unet, fake, dtype)
    params = manager.parameters("default")
    for p in params.values():
        p.data = p.data.float()  # the adapter learns in fp32 whatever the base's dtype
    return unet, manager, params


def fake_weights(model: torch.nn.Module, mode: FakeTensorMode, dtype: torch.dtype) -> None:
    """Replace `model`'s meta parameters and buffers in place by fake CPU tensors (frozen floating ones in
    `dtype`), keeping shared ones shared. (`Module.to` cannot move meta tensors into a fake mode.)"""
    made = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for key, value in store.items():
                if value is None:
                    continue
                if id(value) not in made:
                    kind = dtype if value.is_floating_point() and not value.requires_grad else value.dtype
                    with mode:
                        empty = torch.empty(value.shape, dtype=kind, device="cpu")
                    made[id(value)] = (torch.nn.Parameter(empty, requires_grad=value.requires_grad)
                                       if isinstance(value, torch.nn.Parameter) else empty)
                store[key] = made[id(value)]


def static_bytes(name: str, masked: bool, base_bytes_per_param: int) -> dict[str, int]:
    """Exact bytes of the frozen weights, the adapter's fp32 weights, gradients and AdamW moments."""
    unet, _, params = build(name, "meta", torch.float32, masked)
    trainable = sum(p.numel() for p in params.values())
    frozen = sum(p.numel() for p in unet.parameters()) - trainable
    return {"frozen": frozen * base_bytes_per_param, "adapter": trainable * 4, "grads": trainable * 4,
            "adam": trainable * 8, "trainable_params": trainable}


def train_steps(name: str, device: str, masked: bool, option: str, steps: int,
                half: torch.dtype) -> tuple[int, int | None]:
    """(tracked peak bytes: weights + live tensors, the CUDA allocator's peak or None) of `steps` training
    steps; `device` "fake" runs them on fake CPU tensors of the process's one `FAKE` mode."""
    base_dtype, autocast_dtype, checkpointing = OPTIONS[option]
    base_dtype = half if base_dtype == "half" else base_dtype
    fake = FAKE if device == "fake" else None
    device = "cpu" if fake else device
    unet, manager, params = build(name, device, base_dtype, masked, fake)
    weights = [*unet.parameters(), *unet.buffers()]
    tracker = LiveBytes(weights)
    with fake or contextlib.nullcontext():
        set_gradient_checkpointing(unet, checkpointing)
        unet.train()
        optimizer = torch.optim.AdamW(params.values(), lr=1e-5)
        (f, h, w), cross = configs(name)[2], unet.config.cross_attention_dim
        clips = 2 if masked else 1  # an M-MIVA's batch: the video clip, then its mask clip
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        autocast = torch.autocast(device_type=torch.device(device).type, dtype=half, enabled=autocast_dtype is not None)
        with tracker, manager.call(weights={"default": 1.0}) as call:
            generator = torch.Generator(device).manual_seed(0)
            embeds = torch.randn(clips * f, 77, cross, device=device, dtype=base_dtype, generator=generator)
            if masked:
                call.set(streams=(None, "default"), subjects={"default": torch.ones(1, f, h, w, device=device)})
            for _ in range(steps):
                noisy = torch.randn(clips, 4, f, h, w, device=device, dtype=base_dtype, generator=generator)
                target = torch.randn(noisy.shape, device=device, generator=generator)
                with autocast:
                    out = unet(noisy, torch.tensor([500], device=device), encoder_hidden_states=embeds).sample
                loss = (out.float()[:, :, 1:] - target[:, :, 1:]).pow(2).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
                optimizer.step()
    tracked = sum(t.untyped_storage().nbytes() for t in {id(t): t for t in weights}.values()) + tracker.peak
    if not cuda:
        return tracked, None
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del unet, manager, params, optimizer
    torch.cuda.empty_cache()
    return tracked, peak


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=["full", "tiny"], default="full")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "fake",
                        help="cuda, cpu (real tensors) or fake (real shapes, no data: full size on a CPU)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--options", nargs="*", default=list(OPTIONS), choices=list(OPTIONS))
    parser.add_argument("--static-only", action="store_true", help="count the static bytes on the meta device and stop")
    args = parser.parse_args(argv)
    half = torch.bfloat16 if args.device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float16
    if not args.device.startswith("cuda"):
        half = torch.bfloat16  # CPU autocast runs in bf16
    gb = 1e9
    print(f"config {args.config}: static bytes (exact, meta device)")
    for masked in (False, True):
        for label, per_param in (("fp32 base", 4), ("half base", 2)):
            s = static_bytes(args.config, masked, per_param)
            total = s["frozen"] + s["adapter"] + s["grads"] + s["adam"]
            print(f"  {'M-MIVA' if masked else 'MIVA':<6} {label}: frozen {s['frozen'] / gb:.2f} GB + adapter "
                  f"{s['trainable_params'] / 1e6:.1f}M params x (weights, grads, 2 AdamW moments) "
                  f"{(s['adapter'] + s['grads'] + s['adam']) / gb:.2f} GB = {total / gb:.2f} GB")
    if args.static_only:
        return
    cuda = args.device.startswith("cuda")
    machine = torch.cuda.get_device_name() if cuda else f"{args.device} tensors on the CPU"
    print(f"training peak ({args.steps} AdamW steps, {machine}, half = {half}): tracked (weights + live "
          f"tensors){', CUDA allocator' if cuda else ''}")
    rows = []
    for masked in (False, True):
        for option in args.options:
            tracked, allocated = train_steps(args.config, args.device, masked, option, args.steps, half)
            rows.append(("M-MIVA" if masked else "MIVA", option, allocated if cuda else tracked))
            print(f"  {rows[-1][0]:<6} {option:<38} {tracked / gb:7.3f} GB"
                  + (f"  {allocated / gb:7.3f} GB" if cuda else ""), flush=True)
    best = {kind: min(p for k, _, p in rows if k == kind) for kind in ("MIVA", "M-MIVA")}
    print(f"train_memory_gb miva {best['MIVA'] / gb:.3f} mmiva {best['M-MIVA'] / gb:.3f} "
          f"({'CUDA allocator' if cuda else 'tracked, ' + args.device + ' tensors'}, {args.config})")


if __name__ == "__main__":
    main()
