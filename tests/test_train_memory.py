"""The training-memory benchmark's fake-tensor run (how the full-size peak is measured without a GPU)
tracks exactly the bytes that the same step tracks on real tensors."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEAKS = """
import sys, torch
sys.path.insert(0, "benchmarks")
import train_memory
for masked in (False, True):
    for option in ("fp32", "half base + autocast + checkpointing"):
        print(train_memory.train_steps("tiny", sys.argv[1], masked, option, 2, torch.bfloat16)[0])
"""


def peaks(device):
    done = subprocess.run([sys.executable, "-c", PEAKS, device], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return [int(line) for line in done.stdout.split()]


def test_fake_tensors_track_the_same_peak_as_real_ones():
    real, fake = peaks("cpu"), peaks("fake")
    assert real == fake
    miva_plain, miva_cut, mmiva_plain, mmiva_cut = real
    assert miva_cut < miva_plain / 2 and mmiva_cut < mmiva_plain / 2 and mmiva_plain > miva_plain
