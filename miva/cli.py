"""`python -m miva ...`: animate a first frame, train, export a LoRA, print parameter counts."""

from __future__ import annotations

import argparse
import sys
import time
import warnings

from .backends import BASES as BASE_CHOICES
from .catalogue import resolve_adapter
from .pipeline import MIX_MODES


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
    from .card import PART_NAMES, part_of
    from .config import MivaConfig

    unet = meta_unet(args.base)  # full size, meta device: shapes only
    base_count = sum(p.numel() for p in unet.parameters())
    manager = attach(unet, MivaConfig.for_base(args.base, masked=args.masked))
    counts = manager.parameter_report("default")
    weighting = sum(p.numel() for k, p in manager.parameters("default").items()
                    if ".weighting." in k and part_of(k) == "cross_frame_attention")
    denoiser = type(unet).__name__
    kind = "M-MIVA" if args.masked else "MIVA"
    print(f"{kind} parameters on {args.base} ({denoiser} {base_count:,} parameters, meta device)")
    for part, title in PART_NAMES.items():
        if part == "mask_stream" and not args.masked:
            continue
        print(f"  {title:<38} {counts[part]:>12,}")
        if part == "cross_frame_attention":
            print(f"    {'of which the weighting φ(c_t)':<36} {weighting:>12,}")
    print(f"  {'share of the base ' + denoiser:<38} {counts['total'] / base_count:>12.2%}")
    print(f"total {counts['total']}")
    return 0


def cmd_animate(args) -> int:
    from .media import check_video_path

    check_video_path(args.out)  # before the base loads and the frames are made
    pipe = load_pipeline(args)
    weights = {}
    for spec in args.adapter:
        path, weight = parse_adapter_spec(spec)
        weights[pipe.load_adapter(path)] = weight
    masks = {}
    for option, items in (("--mask", args.mask), ("--mask-text", args.mask_text)):
        for item in items:
            name, _, value = item.partition("=")
            if not name or not value:
                raise ValueError(f"{option} '{item}' needs the form ADAPTER=VALUE, e.g. {option} move-left=left.png.")
            if option == "--mask-text":
                from .segment import text_mask

                value = text_mask(args.image, value)
            masks[name] = value
    if args.compile:
        pipe.compile()
    start = time.perf_counter()
    out = pipe(
        args.image, adapters=weights, num_frames=args.frames, num_inference_steps=args.steps, seed=args.seed,
        guidance_scale=args.guidance, shared_noise_ratio=args.shared_noise, dct_init=args.dct_init,
        adain=not args.no_adain, fps=args.fps, masks=masks, mix=args.mix,
    )
    path = out.save(args.out)
    print(f"wrote {path} ({len(out.frames)} frames, {time.perf_counter() - start:.1f} s)")
    return 0


def cmd_segment(args) -> int:
    from .segment import save_mask, text_mask

    mask = text_mask(args.image, args.text)
    print(f"wrote {save_mask(mask, args.out)} ({mask.mean():.1%} of the image)")
    return 0


def cmd_export_lora(args) -> int:
    from .export import export_lora

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        path = export_lora(args.adapter, args.out)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    print(f"wrote {path} (load it with AnimateDiffPipeline.load_lora_weights)")
    return 0


def load_pipeline(args):
    from .pipeline import MivaPipeline

    return MivaPipeline.from_base(args.base, device=args.device)


def _training_clips(args, frames: int, size: tuple[int, int]):
    """The clips to learn from: --clips (a folder of clips) or --stills with --camera."""
    from pathlib import Path

    from . import data

    if args.stills:
        if args.masked or args.mask_text:
            raise ValueError("--masked trains from clips with subject masks beside them; use --clips, not --stills.")
        if not args.camera:
            raise ValueError("--stills needs --camera (zoom-in, zoom-out, pan-left or pan-right).")
        clipset = data.camera_clips(args.stills, args.camera, per_still=args.per_still, frames=frames, size=size,
                                    seed=args.seed, on_error=args.on_error)
        return clipset, args.motion or args.camera
    if args.clips:
        from_text = bool(args.mask_text)
        clipset = data.load_clips(args.clips, frames=frames, stride=args.stride, size=size, on_error=args.on_error,
                                  masks=args.masked and not from_text)
        if from_text:  # an M-MIVA's subject found by a phrase on each clip's first frame and tracked
            from .segment import shared_segmenter

            segmenter = shared_segmenter()
            clipset.masks = [segmenter.segment_video(clip, args.mask_text).astype("float32") for clip in clipset.clips]
        return clipset, args.motion or Path(args.out).name
    raise ValueError("give --clips DIR (videos of the motion) or --stills DIR with --camera MOTION.")


def launched_accelerator():
    """The `accelerate.Accelerator` of a run started by `accelerate launch` on several processes, else None."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    from accelerate import Accelerator

    return Accelerator()


def cmd_train(args) -> int:
    from .loop import format_eta
    from .train import train_adapter

    if args.mask_loss_weight != 1 and not (args.masked or args.mask_text):  # in flags, before loading (train_adapter refuses it too)
        raise ValueError("--mask-loss-weight weighs an M-MIVA's mask clips; add --masked (or --mask-text), or leave it out.")
    init = resolve_adapter(args.init) if args.init else None  # before the base is loaded
    accelerator = launched_accelerator()
    if accelerator is not None:
        args.device = args.device or str(accelerator.device)
    pipe = load_pipeline(args)
    with warnings.catch_warnings():  # skipped files are printed below, once each
        warnings.simplefilter("ignore", UserWarning)
        clipset, motion = _training_clips(args, args.frames or pipe.base.frames, (pipe.base.height, pipe.base.width))
    for warning in clipset.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if accelerator is None or accelerator.is_main_process:
        print(f"training '{motion}' on {len(clipset.clips)} clips of {clipset.clips[0].shape[0]} frames ({args.base} base)"
              + (f" on {accelerator.num_processes} processes" if accelerator is not None else ""))

    def progress(step, total, loss, eta):
        if step == 1 or step % max(1, total // 20) == 0 or step == total:
            print(f"step {step}/{total}  loss {loss:.4f}  eta {format_eta(eta)}", flush=True)

    folder = train_adapter(
        pipe, clipset.clips, args.out, motion, name=args.name, steps=args.steps, lr=args.lr, batch=args.batch,
        seed=args.seed, resume=args.resume, checkpoint_every=args.checkpoint_every, callback=progress,
        mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
        sources=clipset.names, augment=args.augment, masks=clipset.masks, mask_loss_weight=args.mask_loss_weight,
        init=init, accelerator=accelerator, accumulate=args.accumulate,
    )
    if accelerator is None or accelerator.is_main_process:
        print(f"wrote adapter {folder}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m miva", description="Modular Image-to-Video Adapters.")
    sub = parser.add_subparsers(dest="command", required=True)

    params = sub.add_parser("params", help="print the exact MIVA parameter counts of a base (no download)")
    params.add_argument("--base", default="animatediff-v3", choices=BASE_CHOICES)
    params.add_argument("--masked", action="store_true", help="an M-MIVA: add its mask stream (§3.4)")
    params.set_defaults(run=cmd_params)

    animate = sub.add_parser("animate", help="animate a first frame with one or more adapters")
    animate.add_argument("--image", required=True, help="first frame (PNG, JPEG, WebP)")
    animate.add_argument("--adapter", action="append", default=[], metavar="PATH_OR_NAME[:WEIGHT]",
                         help="adapter folder or name in adapters/, optional weight 0-2 (repeat to mix)")
    animate.add_argument("--out", default="out.mp4", help="output .mp4, .webm, .mov, .gif or .webp (by the suffix)")
    animate.add_argument("--frames", type=int, default=None, help="frame count (default: the base's, 16)")
    animate.add_argument("--steps", type=int, default=25, help="DDIM steps")
    animate.add_argument("--seed", type=int, default=0)
    animate.add_argument("--guidance", type=float, default=1.0, help="motion guidance (1 = off, the paper's)")
    animate.add_argument("--shared-noise", type=float, default=0.05, help="shared noise ratio (0 = off)")
    animate.add_argument("--dct-init", action=argparse.BooleanOptionalAction, default=None,
                         help="start from the first frame's low frequencies (DCTInit; default: the base's choice, "
                              "off for the toy base)")
    animate.add_argument("--no-adain", action="store_true", help="skip AdaIN post-processing")
    animate.add_argument("--fps", type=int, default=8)
    animate.add_argument("--mask", action="append", default=[], metavar="ADAPTER=FILE",
                         help="confine an adapter to a region: a mask image, white = region, fitted like the image")
    animate.add_argument("--mask-text", action="append", default=[], metavar="ADAPTER=PHRASE",
                         help="confine an adapter to what a phrase names (Grounding DINO + SAM 2)")
    animate.add_argument("--mix", default="composite", choices=MIX_MODES,
                         help="a mix with M-MIVAs: one pass per M-MIVA, composited by subject (default), or one shared pass (eq. S4)")
    animate.add_argument("--base", default="toy", choices=BASE_CHOICES)
    animate.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    animate.add_argument("--compile", action="store_true", help="torch.compile the denoiser (pays off over many steps)")
    animate.set_defaults(run=cmd_animate)

    segment = sub.add_parser("segment", help="a mask of what a phrase names in an image (Grounding DINO + SAM 2)")
    segment.add_argument("--image", required=True)
    segment.add_argument("--text", required=True, help='e.g. "the red square"')
    segment.add_argument("--out", default="mask.png")
    segment.set_defaults(run=cmd_segment)

    export = sub.add_parser("export-lora", help="write an adapter's temporal LoRA as a diffusers LoRA file")
    export.add_argument("adapter", metavar="ADAPTER", help="adapter folder or name in adapters/ (AnimateDiff bases)")
    export.add_argument("--out", required=True, help="the .safetensors file to write")
    export.set_defaults(run=cmd_export_lora)

    train = sub.add_parser("train", help="teach a new motion from a few clips (or stills + a camera motion)")
    train.add_argument("--clips", help="folder of clips (mp4, webm, gif, or folders of frames)")
    train.add_argument("--stills", help="folder of still images, turned into camera-motion clips")
    train.add_argument("--camera", help="with --stills: zoom-in, zoom-out, pan-left, pan-right")
    train.add_argument("--per-still", type=int, default=5, help="clips made from each still")
    train.add_argument("--out", required=True, help="adapter folder to write (its name is the adapter's name)")
    train.add_argument("--name", default=None, help="adapter name (default: the --out folder's name)")
    train.add_argument("--motion", default=None, help="motion described in the card (default: the name)")
    train.add_argument("--steps", type=int, default=500)
    train.add_argument("--lr", type=float, default=None, help="AdamW lr (default: 1e-5 real base, 1e-3 toy)")
    train.add_argument("--batch", type=int, default=1,
                       help="clips per step, split across `accelerate launch` processes and --accumulate")
    train.add_argument("--accumulate", type=int, default=1, help="micro-batches per step (gradient accumulation)")
    train.add_argument("--augment", type=int, default=1, help="colour variants per clip, 1-6 (1: none)")
    train.add_argument("--masked", action="store_true",
                       help="train an M-MIVA: each clip NAME.mp4 needs its subject masks beside it (NAME.mask.mp4 or NAME.mask/)")
    train.add_argument("--mask-text", default=None, metavar="PHRASE",
                       help="train an M-MIVA whose subject masks come from this phrase (Grounding DINO + SAM 2)")
    train.add_argument("--mask-loss-weight", type=float, default=1.0,
                       help="M-MIVA: weight of the mask clips' loss against the video's (1: the paper's; toy adapters: 0.1)")
    train.add_argument("--init", default=None, metavar="PATH_OR_NAME",
                       help="start from a trained adapter of the same base (e.g. an M-MIVA from the MIVA of its motion)")
    train.add_argument("--frames", type=int, default=None, help="frames per clip (default: the base's, 16)")
    train.add_argument("--stride", type=int, default=1, help="take every N-th frame of each clip")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--checkpoint-every", type=int, default=50)
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument("--on-error", choices=["skip", "raise"], default="skip", help="unreadable clips: skip or stop")
    train.add_argument("--mixed-precision", choices=["float16", "bfloat16"], default=None, help="GPU autocast")
    train.add_argument("--gradient-checkpointing", action="store_true")
    train.add_argument("--base", default="toy", choices=BASE_CHOICES)
    train.add_argument("--device", default=None)
    train.set_defaults(run=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .segment import SegmentationUnavailable

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, KeyError, TypeError, ConnectionError, SegmentationUnavailable) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
