"""The full-size figures in one run on one GPU, within a time budget, ending in one summary table.

    python scripts/gpu_check.py                 # on the GPU: at most 9 minutes on one H100
    python scripts/gpu_check.py --dry-run       # on the CPU: the same jobs on small configs, to catch typos

Each job is a benchmark script run in its own process with a timeout; a job that would start with
less time left than it needs is skipped and says so, so the run always ends with the table. The
figures go to the README with the card that gave them (the table's first line names it).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"

# (label, script arguments on the GPU, arguments of the dry run, seconds it may take on the GPU)
JOBS = [
    ("AnimateDiff v3 step + sampling, 16x512x320",
     ["overhead.py", "--config", "full", "--repeats", "10", "--sampling-steps", "25"],
     ["overhead.py", "--config", "mid", "--device", "cpu", "--small", "--repeats", "1", "--sampling-steps", "1",
      "--sampling-repeats", "1"], 150),
    ("Wan2.1 1.3B step + sampling, 17x480x832",
     ["overhead.py", "--config", "wan-full", "--repeats", "5", "--sampling-steps", "10", "--sampling-repeats", "2"],
     ["overhead.py", "--config", "wan-mid", "--device", "cpu", "--small", "--repeats", "1", "--sampling-steps", "1",
      "--sampling-repeats", "1"], 200),
    ("training memory, 16x512x320",
     ["train_memory.py", "--config", "full", "--steps", "3"],
     ["train_memory.py", "--config", "tiny", "--steps", "1", "--device", "cpu",
      "--options", "fp32", "half base + autocast + checkpointing"], 150),
    ("M-MIVA mask cache, 25 steps at 16x512x320",
     ["overhead.py", "--config", "full", "--masked", "--sampling-steps", "25", "--sampling-repeats", "2"],
     ["overhead.py", "--config", "mid", "--device", "cpu", "--small", "--masked", "--sampling-steps", "2",
      "--sampling-repeats", "1"], 90),
]
FIGURES = re.compile(r"^(overhead_ratio .*|train_memory_gb .*|flop_ratio .*|mask_cache_ratio .*)$", re.M)


def run_job(args: list[str], timeout: float) -> tuple[str, str]:
    """(status, the job's figure lines or the tail of its error)."""
    try:
        done = subprocess.run([sys.executable, str(BENCH / args[0]), *args[1:]], capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return "timed out", ""
    print(done.stdout, end="", flush=True)
    if done.returncode:
        return f"failed ({done.returncode})", done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    return "ok", "; ".join(FIGURES.findall(done.stdout)) or done.stdout.strip().splitlines()[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the same jobs on small CPU configs")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for all jobs (default 9 minutes)")
    args = parser.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("no GPU here; run with --dry-run to check the jobs on the CPU.", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name() if not args.dry_run else "CPU (dry run: small configs)"
    start = time.monotonic()
    rows = []
    for label, gpu_args, dry_args, need in JOBS:
        left = args.budget - (time.monotonic() - start)
        if not args.dry_run and left < need:
            rows.append((label, f"skipped ({left:.0f} s left, needs {need})", ""))
            continue
        print(f"== {label}", flush=True)
        began = time.monotonic()
        status, figures = run_job(dry_args if args.dry_run else gpu_args, timeout=max(left, 1))
        rows.append((label, f"{status} in {time.monotonic() - began:.0f} s", figures))
    print(f"\nsummary ({card}, {time.monotonic() - start:.0f} s)")
    width = max(len(r[0]) for r in rows)
    for label, status, figures in rows:
        print(f"{label:<{width}}  {status:<18}  {figures}")
    return 0 if all(r[1].startswith("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
