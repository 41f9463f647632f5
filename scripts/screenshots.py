"""Regenerate the README's pictures: a screenshot of each tab of the running app (headless Chromium)
and docs/demo.gif, every shipped adapter animating the example first frame side by side.

    python scripts/screenshots.py [--backend toy] [--no-gif]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app import TABS, build_app, build_studio, serve  # noqa: E402
from miva import browser  # noqa: E402
from miva.media import save_video  # noqa: E402


def demo_gif(studio, image: Path, out: Path, seed: int = 0) -> Path:
    """Each catalogue adapter on the same first frame and seed, in a row, with the base alone first
    (an M-MIVA gets the frame's objects, segmented from the background, as its subject)."""
    from PIL import Image, ImageDraw

    from miva.metrics import object_masks

    names = [("", "base alone")] + [(a.name, a.label) for a in studio.catalogue()]
    columns = []
    for name, label in names:
        if not name:
            frames = studio.pipe(image, adapters={}, seed=seed).frames
        else:
            key = studio.pipe.load_adapter(studio.resolve(name), name=f"demo-{name}")
            masked = studio.pipe.adapters[key].masked
            subject = object_masks(np.asarray(Image.open(image).convert("RGB"))[None])[0].any(0) if masked else None
            frames = studio.pipe(image, adapters={key: 1.0}, seed=seed, masks={key: subject} if masked else None).frames
            studio.pipe.unload_adapter(key)
        big = np.stack([np.asarray(Image.fromarray(f).resize((128, 128), Image.Resampling.NEAREST)) for f in frames])
        caption = Image.new("RGB", (128, 18), (255, 255, 255))
        ImageDraw.Draw(caption).text((4, 3), label, fill=(0, 0, 0))
        columns.append(np.concatenate([np.broadcast_to(np.asarray(caption), (len(big), 18, 128, 3)), big], axis=1))
    return save_video(np.concatenate(columns, axis=2), out, fps=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="toy")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--no-gif", action="store_true")
    args = parser.parse_args()
    studio = build_studio(args.backend)
    if not args.no_gif:
        print(demo_gif(studio, ROOT / "assets" / "example.png", args.out / "demo.gif"))
    demo = build_app(studio)
    serve(demo, server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        for tab in TABS:
            print(browser.screenshot(f"{demo.local_url}?tab={tab}", args.out / f"screenshot-{tab}.png", height=1000))
    finally:
        demo.close()


if __name__ == "__main__":
    main()
