"""One denoising step of each full-size base, random weights, on the CPU, with a MIVA attached.

    python benchmarks/full_size_smoke.py               # both bases, each in its own process
    python benchmarks/full_size_smoke.py --model unet  # SD1.5 UNet + AnimateDiff v3 motion adapter v1-5-3
    python benchmarks/full_size_smoke.py --model wan   # Wan2.1-T2V-1.3B transformer

The denoisers are built from the full configs kept in miva/backends/configs (`animatediff.build_unet`,
`wan.build_transformer`) with random weights (fp32: about 5 GB each), get the base's default MIVA
(`MivaConfig.for_base`) with non-zero weights, and run one sampler step as `MivaPipeline.__call__` does
without the VAE: Algorithm 1's initial latents from a random first-frame latent, the clean first frame
in frame 0, `MivaPipeline.predict` (so `Base.denoise`) inside the adapters' call with the temporal LoRA
merged, and the scheduler's step. The VAEs sit on the meta device (only their configs are read) and
the prompt is zeros of the text encoder's shape (77 x 768 for SD1.5, 512 x 4096 for Wan).

Sizes are the smallest each model takes: the UNet downsamples 3 times after the VAE's 8x, so 64 x 64
pixels (8 x 8 latents), here with 4 frames; Wan takes 4k + 1 frames (5 frames: 2 latent frames) and
latents in multiples of its 2 x 2 patch (2 x 2 latents, 16 x 16 pixels), also run at 16 x 16 latents.
One model at a time, each in a child process, so its peak RSS is its own and its memory is returned.
The first size runs again at the end (a warm step). Last line of each:
`smoke MODEL ok build_s B step_s FIRST warm_step_s WARM peak_rss_gb R`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from miva.adapter import adapters_of, attach  # noqa: E402
from miva.backends import Base, animatediff, wan  # noqa: E402
from miva.config import MivaConfig  # noqa: E402
from miva.pipeline import MivaPipeline  # noqa: E402

MODELS = ("unet", "wan")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def config(name: str) -> dict:
    return json.loads((animatediff.CONFIGS / name).read_text())


def build(model: str) -> tuple[Base, list[tuple[int, int, int]]]:
    """The full-size base (random weights, meta VAE) and the (frames, latent h, latent w) to run."""
    if model == "unet":
        from diffusers import AutoencoderKL

        unet = animatediff.build_unet(config("sd15_unet.json"), config("animatediff_motion_adapter_v1_5_3.json"))
        with torch.device("meta"):
            vae = AutoencoderKL.from_config(config("sd15_vae.json"))
        prompt = torch.zeros(1, 77, unet.config.cross_attention_dim)
        base = Base(id=animatediff.BASE_ID, unet=unet, vae=vae, scheduler=animatediff.tiny_scheduler(),
                    null_prompt_embeds=prompt, height=64, width=64, frames=4)  # tiny_scheduler: SD1.5's betas
        return base, [(4, 8, 8)]
    from diffusers import AutoencoderKLWan

    transformer = wan.build_transformer(config("wan2.1_t2v_1.3b_transformer.json"))
    with torch.device("meta"):
        vae = AutoencoderKLWan()  # the Wan2.1 VAE's defaults: 8x spatial, 4x temporal
    prompt = torch.zeros(1, wan.PROMPT_TOKENS, transformer.config.text_dim)
    base = wan.WanBase(id=wan.BASE_ID, unet=transformer, vae=vae, scheduler=wan.scheduler(), null_prompt_embeds=prompt,
                       height=16, width=16, frames=5)
    return base, [(5, 2, 2), (5, 16, 16)]


@torch.no_grad()
def sampler_step(pipe: MivaPipeline, frames: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of `MivaPipeline.__call__` on latents of this size, from a random first-frame latent."""
    base = pipe.base
    generator = torch.Generator().manual_seed(0)
    channels = base.unet.config.in_channels
    first = torch.randn(1, channels, h, w, generator=generator)
    scheduler = type(base.scheduler).from_config(base.scheduler.config)
    scheduler.set_timesteps(1)
    latents = pipe.initial_latents(first, base.latent_frames(frames), scheduler, generator, shared_noise_ratio=0.05,
                                   dct_init=True, dct_cutoff=0.23, dct_timestep=975)
    manager = adapters_of(base.unet)
    with manager.call(weights={"default": 1.0}) as call, manager.merged_lora():
        t = scheduler.timesteps[0]
        latents[:, :, 0] = first
        model_input = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
        prediction = pipe.predict(model_input, first, t, {"default": 1.0}, 1.0, call=call)
        latents = scheduler.step(prediction, t, latents, generator=generator).prev_sample
    return prediction, latents


def run(model: str) -> int:
    torch.manual_seed(0)
    start = time.perf_counter()
    base, sizes = build(model)
    base.unet.requires_grad_(False).eval()
    built = time.perf_counter() - start
    base_params = sum(p.numel() for p in base.unet.parameters())
    manager = attach(base.unet, MivaConfig.for_base(base.id))
    with torch.no_grad():
        for p in manager.parameters("default").values():
            p.normal_(0, 0.02)  # trained-like weights: every part of the MIVA contributes
    counts = manager.parameter_report("default")
    print(f"{model}: {type(base.unet).__name__} {base_params:,} parameters built in {built:.1f} s; "
          f"MIVA {counts['total']:,} ({', '.join(f'{k} {v:,}' for k, v in counts.items() if k != 'total' and v)}); "
          f"rss {peak_rss_gb():.2f} GB", flush=True)
    pipe = MivaPipeline(base)
    steps = []
    for frames, h, w in [*sizes, sizes[0]]:  # the first size again: a warm step, without first-call costs
        start = time.perf_counter()
        prediction, latents = sampler_step(pipe, frames, h, w)
        steps.append(time.perf_counter() - start)
        ok = bool(torch.isfinite(prediction).all() and torch.isfinite(latents).all())
        print(f"  {frames} frames at {h * base.vae_scale_factor}x{w * base.vae_scale_factor} px: latents "
              f"{tuple(latents.shape)}, prediction {tuple(prediction.shape)}, finite {ok}, step {steps[-1]:.2f} s",
              flush=True)
        if not ok or prediction.shape != latents.shape:
            print(f"smoke {model} FAILED")
            return 1
    print(f"smoke {model} ok build_s {built:.1f} step_s {steps[0]:.2f} warm_step_s {steps[-1]:.2f} "
          f"peak_rss_gb {peak_rss_gb():.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=(*MODELS, "all"), default="all")
    args = parser.parse_args(argv)
    if args.model != "all":
        return run(args.model)
    codes = [subprocess.run([sys.executable, __file__, "--model", model]).returncode for model in MODELS]
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
