"""How long ``fcn-zoo predict`` takes to refuse a mistake: each case in a fresh process, from before the
process starts to its exit, with the model cached (so that a late check would pay for loading it).

    python benchmarks/cli_errors.py [--runs 5]

The cases are the ones a user makes on a second run: a misspelt model name, a missing input folder,
``--precision fp16`` on the CPU, a misspelt device, ``--engine onnxruntime`` on a GPU, ``--out`` naming a
file, and ``--device cuda`` on a machine whose torch sees no GPU (the one check that needs torch).
Medians over the runs, with ranges. Needs the test extra (``pip install -e ".[test]"``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = "fcn_resnet50os8_voc"


def cases(work: Path) -> dict[str, list[str]]:
    photos, out = str(ROOT / "tests" / "data"), str(work / "out")
    (work / "a-file").write_text("not a folder")
    return {
        "misspelt model name": ["fcn_resnet50os8_vco", photos, "--out", out],
        "missing input folder": [NAME, str(work / "no-such-folder"), "--out", out],
        "--precision fp16 on the CPU": [NAME, photos, "--out", out, "--precision", "fp16"],
        "misspelt --device": [NAME, photos, "--out", out, "--device", "gpu"],
        "--engine onnxruntime on a GPU": [NAME, photos, "--out", out, "--engine", "onnxruntime", "--device", "cuda"],
        "--out is a file": [NAME, photos, "--out", str(work / "a-file")],
        "--device cuda without a GPU": [NAME, photos, "--out", out, "--device", "cuda"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import cached_row

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cached_row(work / "cache", NAME)
        env = {**os.environ, "FCN_ZOO_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1"}
        fcn_zoo = Path(sys.executable).with_name("fcn-zoo")
        times: dict[str, list[float]] = {k: [] for k in cases(work)}
        messages = {}
        for _ in range(args.runs):
            for what, argv in cases(work).items():
                t = time.perf_counter()
                run = subprocess.run([str(fcn_zoo), "predict", *argv], env=env, capture_output=True, text=True)
                times[what].append(time.perf_counter() - t)
                messages[what] = run.stderr.strip()
                assert run.returncode == 1 and len(messages[what].splitlines()) == 1, (what, run.stderr)
                assert not (work / "out").exists(), f"{what}: --out was created"
    print(f"fcn-zoo predict refusing a mistake, {args.runs} runs each, medians (range)")
    for what, ts in times.items():
        print(f"{what:32s} {statistics.median(ts):5.2f} s ({min(ts):.2f}-{max(ts):.2f})  {messages[what][:110]}")


if __name__ == "__main__":
    main()
