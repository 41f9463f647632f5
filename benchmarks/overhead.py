"""Cost of one MIVA over the base: measured time, counted FLOPs and peak memory, side by side.

    python benchmarks/overhead.py                 # mid-size config on the CPU
    python benchmarks/overhead.py --config full   # SD1.5 + AnimateDiff v3 at 16x512x320 (GPU)
    python benchmarks/overhead.py --config wan-mid      # Wan2.1 1.3B blocks, 4 of 30 layers, 17x240x416 (CPU)
    python benchmarks/overhead.py --config wan-full     # Wan2.1-T2V-1.3B at 17x480x832 (GPU)
    python benchmarks/overhead.py --config full --masked  # M-MIVA sampling with and without the mask cache
    python benchmarks/overhead.py --config full --compile  # both denoisers under torch.compile

The base and base+MIVA denoisers (random weights: values do not change cost) run interleaved in one
process, so machine noise hits both alike. The FLOP ratio of the same two models on the same input
is counted with torch.utils.flop_counter on the meta device: it is the floor that no implementation
of the method can beat. The number of kernels a step launches (every non-view aten op, counted on the
meta device with a dispatch mode) is the launch-bound proxy that needs no GPU. The MIVA model runs as
the sampler runs it: inside a call, with its temporal LoRA folded in. Last line:
`overhead_ratio X flop_ratio Y kernel_ratio Z` (X = denoiser step time ratio).

`--masked` instead times whole calls of the base, of one M-MIVA regenerating its masks
at every step, and of the same M-MIVA with the mask-step cache (the paper's mask steps, B.1.3),
interleaved. Last line: `mask_cache_ratio X mmiva_ratio Y` (cached / uncached call, cached / base).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from miva.adapter import adapters_of, attach  # noqa: E402
from miva.backends import Base, animatediff, wan  # noqa: E402
from miva.config import MivaConfig  # noqa: E402
from miva.pipeline import MivaPipeline  # noqa: E402


WAN = {"wan-full": (30, (5, 60, 104)), "wan-mid": (4, (5, 30, 52))}  # layers, latents of 17x480x832 / 17x240x416
SMALL = "MIVA_BENCH_SMALL"  # set (by --small): the same models on the smallest latents, a smoke run of this script


def small_latents(f: int, h: int, w: int) -> tuple[int, int, int]:
    import os

    return (min(f, 2), min(h, 8), min(w, 8)) if os.environ.get(SMALL) else (f, h, w)


def configs(name: str) -> tuple[dict, dict, dict, tuple[int, int, int]]:
    """(unet, motion adapter, vae) configs and the latent (frames, h, w) of a UNet benchmark config."""
    unet = json.loads((animatediff.CONFIGS / "sd15_unet.json").read_text())
    adapter = json.loads((animatediff.CONFIGS / "animatediff_motion_adapter_v1_5_3.json").read_text())
    vae = json.loads((animatediff.CONFIGS / "sd15_vae.json").read_text())
    if name == "full":
        return unet, adapter, vae, (16, 40, 64)  # 16 x 320 x 512 pixels
    # mid: SD1.5's topology (4 levels, 2 layers, 16 spatial / 20 motion attentions) at half width with
    # 4 heads, so the head sizes stay SD1.5's (40-160): attention kernels run as efficiently as at full size.
    channels = [160, 320, 640, 640]
    unet.update(block_out_channels=channels, attention_head_dim=4, cross_attention_dim=384)
    adapter.update(block_out_channels=channels, motion_num_attention_heads=4)
    vae.update(block_out_channels=[32, 64, 64, 64])
    return unet, adapter, vae, (16, 16, 24)  # 16 x 128 x 192 pixels


def miva_config(name: str) -> MivaConfig:
    return MivaConfig.for_base(wan.BASE_ID if name in WAN else name)


def build(name: str, device: str, dtype: torch.dtype, miva: bool):
    """(denoiser, sample, prompt embeds) with random weights; Wan configs keep the 1.3B's block widths
    (wan-mid: fewer of its identical blocks, so the per-block ratio is the full model's at that size)."""
    if name in WAN:
        layers, (f, h, w) = WAN[name][0], small_latents(*WAN[name][1])
        config = json.loads((wan.CONFIGS / "wan2.1_t2v_1.3b_transformer.json").read_text())
        unet = wan.build_transformer({**config, "num_layers": layers}, device=device)
        sample = torch.randn(1, 16, f, h, w, device=device, dtype=dtype)
        embeds = torch.randn(1, wan.PROMPT_TOKENS, config["text_dim"], device=device, dtype=dtype)
    else:
        unet_cfg, adapter_cfg, _, shape = configs(name)
        f, h, w = small_latents(*shape)
        unet = animatediff.build_unet(unet_cfg, adapter_cfg, device=device)  # random init where it runs
        sample = torch.randn(1, 4, f, h, w, device=device, dtype=dtype)
        embeds = torch.randn(f, 77, unet_cfg["cross_attention_dim"], device=device, dtype=dtype)
    unet.requires_grad_(False).eval()
    if device != "meta" and name in WAN:
        wan.cast_transformer(unet, dtype)  # as Wan's from_pretrained loads it: norms and modulation in fp32
    elif device != "meta":
        with animatediff.quiet_diffusers():
            unet.to(dtype=dtype)
    if miva:
        add_miva(unet, name)
    return unet, sample, embeds


def add_miva(unet, name: str, masked: bool = False) -> None:
    """Attach one MIVA (an M-MIVA if `masked`) with trained-like (non-zero) weights, so nothing is skipped."""
    torch.manual_seed(0)
    config = miva_config(name)
    config.masked = masked
    manager = attach(unet, config)
    if unet.device.type != "meta":
        with torch.no_grad():
            for p in manager.parameters("default").values():
                p.normal_(0, 0.02)


def step(unet, sample, embeds):
    """One denoiser call at t = 500."""
    t = torch.tensor([500.0], device=sample.device)
    return unet(sample, t, encoder_hidden_states=embeds)


@contextlib.contextmanager
def as_sampled(unet):
    """The state the sampler runs an attached MIVA in for a whole call: its temporal LoRA folded in."""
    manager = adapters_of(unet)
    if manager is None:
        yield
        return
    with manager.call(), manager.merged_lora():
        yield


class KernelCount(TorchDispatchMode):
    """Counts the aten ops that launch a kernel: views and allocations launch none, and an attention
    call counts once (one fused kernel on a GPU or CPU; the meta device runs it as its math decomposition)."""

    FREE = {"_unsafe_view", "detach", "empty", "new_empty", "empty_like", "empty_strided", "lift_fresh",
            "_local_scalar_dense"}

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.fused = 0  # > 0 inside an attention call

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.fused and not func.is_view and func.overloadpacket.__name__ not in self.FREE:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        counter = self

        class Attention(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func is not torch.nn.functional.scaled_dot_product_attention:
                    return func(*args, **(kwargs or {}))
                counter.ops["scaled_dot_product_attention"] += 1
                counter.fused += 1
                try:
                    return func(*args, **(kwargs or {}))
                finally:
                    counter.fused -= 1

        self._attention = Attention()
        self._attention.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._attention.__exit__(*exc)


def count_step(name: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """((base, MIVA) FLOPs, (base, MIVA) kernels) of one denoiser step, on the meta device."""
    flops, kernels = [], []
    for miva in (False, True):
        unet, sample, embeds = build(name, "meta", torch.float32, miva)
        with torch.no_grad(), as_sampled(unet):
            with FlopCounterMode(display=False) as counter:
                step(unet, sample, embeds)
            with KernelCount() as launched:
                step(unet, sample, embeds)
        flops.append(counter.get_total_flops())
        kernels.append(sum(launched.ops.values()))
    return (flops[0], flops[1]), (kernels[0], kernels[1])


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(models, device, repeats, warmup=2) -> list[float]:
    """Median seconds per UNet step of each (unet, sample, embeds), interleaved."""
    times = [[] for _ in models]
    with torch.no_grad(), contextlib.ExitStack() as stack:
        for unet, _, _ in models:
            stack.enter_context(as_sampled(unet))
        for r in range(warmup + repeats):
            for i, (unet, sample, embeds) in enumerate(models):
                sync(device)
                start = time.perf_counter()
                step(unet, sample, embeds)
                sync(device)
                if r >= warmup:
                    times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def pipelines(name, models, device, dtype) -> list[MivaPipeline]:
    """A pipeline over each (denoiser, sample, embeds) with the config's VAE (random weights)."""
    pipes = []
    if name in WAN:
        from diffusers import AutoencoderKLWan

        f, h, w = small_latents(*WAN[name][1])
        vae = AutoencoderKLWan().to(device=device).eval()  # Wan2.1's VAE config; fp32 as in Wan's pipeline
        factor = vae.config.scale_factor_spatial
        for unet, _, embeds in models:
            pipes.append(MivaPipeline(wan.WanBase(id=wan.BASE_ID, unet=unet, vae=vae, scheduler=wan.scheduler(),
                                                  null_prompt_embeds=embeds, height=h * factor, width=w * factor,
                                                  frames=(f - 1) * 4 + 1)))
        return pipes
    _, _, vae_cfg, shape = configs(name)
    f, h, w = small_latents(*shape)
    from diffusers import AutoencoderKL

    with animatediff.quiet_diffusers():
        vae = AutoencoderKL.from_config(vae_cfg).to(device=device, dtype=dtype).eval()
    factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    for unet, _, embeds in models:
        pipes.append(MivaPipeline(Base(id=name, unet=unet, vae=vae, scheduler=animatediff.tiny_scheduler(),
                                       null_prompt_embeds=embeds[:1], height=h * factor, width=w * factor, frames=f)))
    return pipes


def time_calls(calls, device, repeats, warmup=0) -> list[float]:
    """Median seconds of each zero-argument call, interleaved, after `warmup` untimed rounds."""
    times = [[] for _ in calls]
    for r in range(warmup + repeats):
        for i, call in enumerate(calls):
            sync(device)
            start = time.perf_counter()
            call()
            sync(device)
            if r >= warmup:
                times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def time_sampling(name, models, device, dtype, steps, repeats, warmup=0) -> list[float]:
    """Median seconds of a whole image-to-video call (VAE encode, `steps` sampler steps, decode)."""
    pipes = pipelines(name, models, device, dtype)
    image = torch.rand(3, pipes[0].base.height, pipes[0].base.width)
    return time_calls([lambda pipe=pipe: pipe(image, num_inference_steps=steps, seed=0) for pipe in pipes], device,
                      repeats, warmup)


def time_mask_cache(name, device, dtype, steps, repeats) -> list[float]:
    """Median seconds of a call of the base, of an M-MIVA with masks at every step, and with the mask cache."""
    base = build(name, device, dtype, miva=False)
    masked = (copy.deepcopy(base[0]), base[1], base[2])
    add_miva(masked[0], name, masked=True)
    plain, mmiva = pipelines(name, [base, masked], device, dtype)
    height, width = plain.base.height, plain.base.width
    image, subject = torch.rand(3, height, width), torch.zeros(height, width)
    subject[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 1
    run = dict(num_inference_steps=steps, seed=0)
    return time_calls([lambda: plain(image, **run),
                       lambda: mmiva(image, masks={"default": subject}, mask_steps="all", **run),
                       lambda: mmiva(image, masks={"default": subject}, **run)], device, repeats)


def peak_memory(name, device, dtype, miva) -> int:
    """Peak bytes one UNet step adds: CUDA allocator peak, or on the CPU the rise of a fresh process's
    peak RSS over its RSS before the step (activations and workspace; weights excluded)."""
    if device.startswith("cuda"):
        unet, sample, embeds = build(name, device, dtype, miva)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad(), as_sampled(unet):
            step(unet, sample, embeds)
        peak = torch.cuda.max_memory_allocated()
        del unet
        torch.cuda.empty_cache()
        return peak
    code = (f"import gc, sys, torch; sys.argv=['x']; sys.path.insert(0, {str(Path(__file__).parent)!r});"
            f"import overhead as o; u, s, e = o.build({name!r}, 'cpu', torch.float32, {miva}); torch.no_grad().__enter__();"
            "o.as_sampled(u).__enter__(); gc.collect();"
            "kb = lambda key: int([l for l in open('/proc/self/status') if l.startswith(key)][0].split()[1]);"
            "open('/proc/self/clear_refs', 'w').write('5'); before = kb('VmRSS');"  # reset the peak (VmHWM)
            "o.step(u, s, e); print(kb('VmHWM') - before)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=["mid", "full", *WAN], default="mid")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sampling-steps", type=int, default=10)
    parser.add_argument("--sampling-repeats", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="the smallest latents: a quick smoke run of the script")
    parser.add_argument("--flops-only", action="store_true", help="count FLOPs and kernels on the meta device and stop")
    parser.add_argument("--masked", action="store_true", help="time M-MIVA calls with and without the mask cache")
    parser.add_argument("--compile", action="store_true", help="torch.compile both denoisers (timed after compiling)")
    args = parser.parse_args()
    if args.small:
        import os

        os.environ[SMALL] = "1"  # read by build() here and in the memory subprocesses
    device = args.device
    dtype = torch.float32 if not device.startswith("cuda") else torch.bfloat16 if args.config in WAN else torch.float16
    torch.manual_seed(0)
    if args.masked:
        machine = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
        plain, uncached, cached = time_mask_cache(args.config, device, dtype, args.sampling_steps, args.sampling_repeats)
        print(f"config {args.config}, {dtype}, {machine}, {args.sampling_steps} steps + VAE: base {plain:.2f} s, "
              f"M-MIVA masks every step {uncached:.2f} s, with the mask cache {cached:.2f} s")
        print(f"mask_cache_ratio {cached / uncached:.3f} mmiva_ratio {cached / plain:.3f}")
        return

    (base_flops, miva_flops), (base_kernels, miva_kernels) = count_step(args.config)
    flop_ratio, kernel_ratio = miva_flops / base_flops, miva_kernels / base_kernels
    counts = (f"denoiser step FLOPs: base {base_flops / 1e12:.3f} T, +MIVA {miva_flops / 1e12:.3f} T; "
              f"kernels launched: base {base_kernels}, +MIVA {miva_kernels}")
    if args.flops_only:
        print(f"config {args.config}: {counts}")
        print(f"flop_ratio {flop_ratio:.3f} kernel_ratio {kernel_ratio:.3f}")
        return
    base = build(args.config, device, dtype, miva=False)
    miva = (copy.deepcopy(base[0]), base[1], base[2])
    add_miva(miva[0], args.config)
    if args.compile:
        for unet in (base[0], miva[0]):
            unet.compile(dynamic=False)
    f, h, w = base[1].shape[2:]
    machine = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"config {args.config}: latents {f}x{h}x{w}, {dtype}, {machine}{', compiled' if args.compile else ''}")
    print(counts)

    step_base, step_miva = time_steps([base, miva], device, args.repeats)
    print(f"denoiser step time: base {step_base * 1e3:.1f} ms, +MIVA {step_miva * 1e3:.1f} ms "
          f"(median of {args.repeats}, interleaved)")
    if args.sampling_steps:
        sample_base, sample_miva = time_sampling(args.config, [base, miva], device, dtype, args.sampling_steps,
                                                 args.sampling_repeats, warmup=int(args.compile))
        print(f"sampling ({args.sampling_steps} steps + VAE): base {sample_base:.2f} s, +MIVA {sample_miva:.2f} s, "
              f"end-to-end ratio {sample_miva / sample_base:.3f}")
    del base, miva
    mem_base, mem_miva = (peak_memory(args.config, device, dtype, m) for m in (False, True))
    kind = "CUDA allocator peak, weights included" if device.startswith("cuda") else "peak RSS rise during one step"
    print(f"memory ({kind}): base {mem_base / 2**20:.0f} MiB, +MIVA {mem_miva / 2**20:.0f} MiB, "
          f"ratio {mem_miva / mem_base:.3f}")
    print(f"overhead_ratio {step_miva / step_base:.3f} flop_ratio {flop_ratio:.3f} kernel_ratio {kernel_ratio:.3f}")


if __name__ == "__main__":
    main()
