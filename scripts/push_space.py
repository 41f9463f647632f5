"""Push this repository to a Hugging Face Space as it is: the files git tracks, nothing else.

    python scripts/push_space.py --repo you/miva-studio [--token hf_...] [--private]
    python scripts/push_space.py --dry-run      # list what would go and check it, offline

`HfApi.upload_folder` stores the binary files (weights, images, GIFs) through the Hub's large-file
storage by itself, so no git-lfs setup is needed. A Space refuses any file over 10 MB that is not in
that storage; this script refuses to start with one, so a push never stops halfway.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_BYTES = 10 * 1024 * 1024


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [name for name in out.decode().split("\0") if name and (ROOT / name).is_file()]


def too_big(files: list[str]) -> list[str]:
    return [f"{name} ({(ROOT / name).stat().st_size / 2**20:.1f} MB)" for name in files
            if (ROOT / name).stat().st_size > MAX_BYTES]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", help="the Space's id, OWNER/NAME (created if missing)")
    parser.add_argument("--token", default=None, help="a write token (default: the logged-in one)")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="list and check the files, push nothing")
    args = parser.parse_args(argv)
    files = tracked_files()
    big = too_big(files)
    total = sum((ROOT / name).stat().st_size for name in files)
    print(f"{len(files)} files, {total / 2**20:.1f} MB; largest: "
          f"{max(files, key=lambda n: (ROOT / n).stat().st_size)}")
    if big:
        print(f"a Space refuses files over 10 MB; shrink or drop: {', '.join(big)}", file=sys.stderr)
        return 1
    if args.dry_run:
        return 0
    if not args.repo:
        parser.error("give --repo OWNER/NAME (or --dry-run).")
    from huggingface_hub import HfApi

    api = HfApi(token=args.token)
    api.create_repo(args.repo, repo_type="space", space_sdk="gradio", private=args.private, exist_ok=True)
    commit = api.upload_folder(repo_id=args.repo, repo_type="space", folder_path=ROOT, allow_patterns=files,
                               commit_message="Push MIVA Studio")
    print(f"pushed to https://huggingface.co/spaces/{args.repo} ({commit.oid[:8]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
