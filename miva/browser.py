"""Headless Chromium (Debian's `chromium`) for looking at the running app: DOM dumps and screenshots."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

# Flags that work as root in a sandbox with no network beyond loopback.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--virtual-time-budget=15000"]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _run(url: str, extra: list[str], timeout: float) -> subprocess.CompletedProcess:
    binary = chromium()
    if binary is None:
        raise FileNotFoundError("chromium is not installed; `apt-get install chromium` to take screenshots.")
    with tempfile.TemporaryDirectory(prefix="miva-chromium-") as profile:
        return subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", *extra, url],
                              capture_output=True, text=True, timeout=timeout)


def dump_dom(url: str, timeout: float = 90) -> str:
    """The page's DOM after its scripts ran."""
    return _run(url, ["--dump-dom"], timeout).stdout


def screenshot(url: str, path: str | Path, width: int = 1280, height: int = 1000, timeout: float = 90) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _run(url, [f"--screenshot={path}", f"--window-size={width},{height}"], timeout)
    if not path.is_file():
        raise RuntimeError(f"chromium wrote no screenshot for {url}.")
    return path
