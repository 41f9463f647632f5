"""`python -m miva ...`: animate a first frame, print parameter counts."""

from __future__ import annotations

import argparse
import sys
import time

BASE_CHOICES = ("animatediff-v3", "tiny")


def parse_adapter_spec(spec: str) -> tuple[str, float]:
    """'PATH_OR_NAME[:WEIGHT]' -> (path or name, weight); the weight defaults to 1."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def cmd_params(args) -> int:
    from .adapter import attach
    from .backends import meta_unet
    from .card import PART_NAMES
    from .config import MivaConfig

    unet = meta_unet(args.base)  # full size, meta device: shapes only
    base_count = sum(p.numel() for p in unet.parameters())
    counts = attach(unet, MivaConfig(base=args.base)).parameter_report("default")
    print(f"MIVA parameters on {args.base} (UNet {base_count:,} parameters, meta device)")
    for part, title in PART_NAMES.items():
        print(f"  {title:<38} {counts[part]:>12,}")
    print(f"  {'share of the UNet':<38} {counts['total'] / base_count:>12.2%}")
    print(f"total {counts['total']}")
    return 0


def cmd_animate(args) -> int:
    import torch

    from .pipeline import MivaPipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.startswith("cuda") and args.base != "tiny" else torch.float32
    pipe = MivaPipeline.from_base(args.base, device=device, dtype=dtype)
    weights = {}
    for spec in args.adapter:
        path, weight = parse_adapter_spec(spec)
        weights[pipe.load_adapter(path)] = weight
    start = time.perf_counter()
    out = pipe(
        args.image, adapters=weights, num_frames=args.frames, num_inference_steps=args.steps, seed=args.seed,
        guidance_scale=args.guidance, shared_noise_ratio=args.shared_noise, dct_init=not args.no_dct_init,
        adain=not args.no_adain, fps=args.fps,
    )
    path = out.save(args.out)
    print(f"wrote {path} ({len(out.frames)} frames, {time.perf_counter() - start:.1f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m miva", description="Modular Image-to-Video Adapters.")
    sub = parser.add_subparsers(dest="command", required=True)

    params = sub.add_parser("params", help="print the exact MIVA parameter counts of a base (no download)")
    params.add_argument("--base", default="animatediff-v3", choices=BASE_CHOICES)
    params.set_defaults(run=cmd_params)

    animate = sub.add_parser("animate", help="animate a first frame with one or more adapters")
    animate.add_argument("--image", required=True, help="first frame (PNG, JPEG, WebP)")
    animate.add_argument("--adapter", action="append", default=[], metavar="PATH_OR_NAME[:WEIGHT]",
                         help="adapter folder or name in adapters/, optional weight 0-2 (repeat to mix)")
    animate.add_argument("--out", default="out.mp4", help="output .mp4 or .gif")
    animate.add_argument("--frames", type=int, default=None, help="frame count (default: the base's, 16)")
    animate.add_argument("--steps", type=int, default=25, help="DDIM steps")
    animate.add_argument("--seed", type=int, default=0)
    animate.add_argument("--guidance", type=float, default=1.0, help="motion guidance (1 = off, the paper's)")
    animate.add_argument("--shared-noise", type=float, default=0.05, help="shared noise ratio (0 = off)")
    animate.add_argument("--no-dct-init", action="store_true", help="start from plain noise")
    animate.add_argument("--no-adain", action="store_true", help="skip AdaIN post-processing")
    animate.add_argument("--fps", type=int, default=8)
    animate.add_argument("--base", default="animatediff-v3", choices=BASE_CHOICES)
    animate.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    animate.set_defaults(run=cmd_animate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, KeyError, TypeError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
