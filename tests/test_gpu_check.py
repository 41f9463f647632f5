"""The prepared GPU run passes its dry run on the CPU, so a lent GPU's first minute is never spent on a typo."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_prints_its_table():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--dry-run"], capture_output=True,
                          text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = done.stdout.split("\nsummary (")[1]
    assert table.count(" ok in ") == 4 and "kernel_ratio" in table and "mask_cache_ratio" in table
