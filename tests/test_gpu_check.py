"""benchmarks/gpu_check.py, the one command for the day a GPU is lent, runs here on the CPU with small sizes
so that it never rots: every check passes and the report names each one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_every_check_on_the_cpu(tmp_path):
    report = tmp_path / "report.md"
    run = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--tiny", "--out", str(report)],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = report.read_text()
    for check in ("predict on the device vs the CPU", "sliding windows and TTA", "labels beside the next forward",
                  "memory layouts", "fcn-zoo predict DIR", "evaluate on the device vs the CPU",
                  "train resnet10t OS8 default precision", "a killed run resumed ends as an uninterrupted one"):
        assert f"| {check} | ok |" in text, check
    assert "| compile=True | skipped |" in text and "| int8 model on a GPU machine | skipped |" in text
    assert "fused model NCHW; a channels_last model saved and loaded, equal weights" in text  # the CPU's layout
    assert "equal weights after 6 iterations" in text and "label agreement with the CPU's fp32: {'fp32': 1.0" in text
