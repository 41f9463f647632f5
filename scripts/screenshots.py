"""Regenerate docs/screenshot.png: launch the app on loopback and screenshot it in headless Chromium.

    python scripts/screenshots.py [--backend toy]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app import build_app, build_studio  # noqa: E402
from miva import browser  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="toy")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshot.png")
    args = parser.parse_args()
    demo = build_app(build_studio(args.backend))
    demo.queue().launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        print(browser.screenshot(demo.local_url, args.out, height=900))
    finally:
        demo.close()


if __name__ == "__main__":
    main()
