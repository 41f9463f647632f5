"""Regenerate the README's pictures: a screenshot of each tab of the running app (headless Chromium),
docs/demo.gif, every shipped adapter animating the example first frame side by side, and
docs/mix.gif, two M-MIVAs mixed on the two-object example, in one pass and composited.

    python scripts/screenshots.py [--backend toy] [--no-gif]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app import TABS, build_app, serve  # noqa: E402
from miva import browser  # noqa: E402
from miva.media import save_video  # noqa: E402
from miva.studio import Studio  # noqa: E402


def column(frames: np.ndarray, label: str, side: int = 128) -> np.ndarray:
    """(F, H, W, 3) frames enlarged to side x side (nearest) under a white caption."""
    from PIL import Image, ImageDraw

    big = np.stack([np.asarray(Image.fromarray(f).resize((side, side), Image.Resampling.NEAREST)) for f in frames])
    caption = Image.new("RGB", (side, 18), (255, 255, 255))
    ImageDraw.Draw(caption).text((4, 3), label, fill=(0, 0, 0))
    return np.concatenate([np.broadcast_to(np.asarray(caption), (len(big), 18, side, 3)), big], axis=1)


def objects_of(image: Path) -> np.ndarray:
    """(K, H, W) masks of the objects of a toy first frame, segmented from its background, top to bottom."""
    from PIL import Image

    from miva.toy.metrics import object_masks

    masks = object_masks(np.asarray(Image.open(image).convert("RGB"))[None])[0]
    return masks[np.argsort([np.nonzero(m)[0].mean() for m in masks])]


def demo_gif(studio, image: Path, out: Path, seed: int = 0) -> Path:
    """Each catalogue adapter on the same first frame and seed, in a row, with the base alone first
    (an M-MIVA gets the frame's objects, segmented from the background, as its subject)."""
    names = [("", "base alone")] + [(a.name, a.label) for a in studio.catalogue()]
    columns, subject = [], objects_of(image).any(0)
    for name, label in names:
        if not name:
            frames = studio.pipe(image, adapters={}, seed=seed).frames
        else:
            key = studio.pipe.load_adapter(studio.resolve(name), name=f"demo-{name}")
            masked = studio.pipe.adapters[key].masked
            frames = studio.pipe(image, adapters={key: 1.0}, seed=seed, masks={key: subject} if masked else None).frames
            studio.pipe.unload_adapter(key)
        columns.append(column(frames, label))
    return save_video(np.concatenate(columns, axis=2), out, fps=8)


def mix_gif(studio, image: Path, out: Path, seed: int = 0,
            adapters: tuple[str, str] = ("move-up-masked", "move-left-masked")) -> Path:
    """Two M-MIVAs, the first on the frame's upper object and the second on the other, mixed both
    ways side by side: the paper's one shared pass (`mix="attention"`) and composited (the default)."""
    keys = [studio.pipe.load_adapter(studio.resolve(name), name=f"demo-{name}") for name in adapters]
    masks = dict(zip(keys, objects_of(image)[:2]))
    columns = [column(studio.pipe(image, adapters={k: 1.0 for k in keys}, masks=masks, seed=seed, mix=mix).frames,
                      label) for mix, label in (("attention", "one pass"), ("composite", "composited"))]
    for key in keys:
        studio.pipe.unload_adapter(key)
    return save_video(np.concatenate(columns, axis=2), out, fps=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="toy")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--no-gif", action="store_true")
    args = parser.parse_args()
    studio = Studio.from_base(args.backend)
    if not args.no_gif:
        print(demo_gif(studio, ROOT / "assets" / "example.png", args.out / "demo.gif"))
        print(mix_gif(studio, ROOT / "assets" / "example-two-objects.png", args.out / "mix.gif"))
    demo = build_app(studio)
    serve(demo, server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        for tab in TABS:
            print(browser.screenshot(f"{demo.local_url}?tab={tab}", args.out / f"screenshot-{tab}.png", height=1000))
    finally:
        demo.close()


if __name__ == "__main__":
    main()
