"""Cold start of ``fcn-zoo predict`` on a cached model: from process start to the mask written.

    python benchmarks/cold_start.py [--name fcn_resnet50os8_voc] [--size 375 500] [--runs 5]

Converts a reference checkpoint (random weights, the reference's layout) into a temporary fcn_zoo cache as
the first download would, writes tests/data/chelsea.jpg resized to W x H, then runs, interleaved and each in a fresh process:

- ``fcn-zoo predict NAME photo.jpg --out DIR``, timed from before the process is started to its exit;
- the same steps in a script that stamps the wall clock after each phase: interpreter start, ``import torch``,
  ``import timm`` (and with it torchvision), ``import fcn_zoo``, ``from_pretrained``, ``fuse()``, the first
  ``predict`` + ``save``; then a second ``predict`` of the same photo in the same process, which is the
  forward pass and the pre- and post-processing alone.

The overhead is the CLI's total minus that second ``predict``. Medians over the runs, with ranges.
Needs the test extra (``pip install -e ".[test]"``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PHASES = r"""
import json, os, sys, time
stamps = {"start": float(os.environ["T0"])}
def stamp(what): stamps[what] = time.time()
stamp("interpreter")
import torch; stamp("import torch")
import timm; stamp("import timm")
import fcn_zoo.cli; stamp("import fcn_zoo")
from fcn_zoo.hub import from_pretrained
model = from_pretrained(sys.argv[1]); stamp("from_pretrained")
model.fuse(); stamp("fuse")
model.predict(sys.argv[2]).save(os.path.join(sys.argv[3], "mask.png")); stamp("first predict + save")
t = time.time(); model.predict(sys.argv[2]); stamps["forward"] = time.time() - t
print(json.dumps(stamps))
"""


def prepare(workdir: Path, name: str, size: tuple[int, int]) -> Path:
    """A converted cache entry for ``name`` under ``workdir/cache`` and a photo; returns the photo's path."""
    from _common import cached_row
    from PIL import Image

    cached_row(workdir / "cache", name)
    photo = workdir / "photo.jpg"
    Image.open(ROOT / "tests" / "data" / "chelsea.jpg").convert("RGB").resize(size[::-1]).save(photo, quality=90)
    return photo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", default="fcn_resnet50os8_voc")
    parser.add_argument("--size", type=int, nargs=2, default=(375, 500), metavar=("H", "W"))
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        photo = prepare(workdir, args.name, tuple(args.size))
        env = {**os.environ, "FCN_ZOO_CACHE": str(workdir / "cache"), "HF_HUB_OFFLINE": "1"}
        cli = [sys.executable, "-m", "fcn_zoo.cli", "predict", args.name, str(photo), "--out", str(workdir / "out")]
        totals, phases = [], []
        for _ in range(args.runs):
            t = time.time()
            subprocess.run(cli, env=env, check=True, stdout=subprocess.DEVNULL)
            totals.append(time.time() - t)
            run = subprocess.run(
                [sys.executable, "-c", PHASES, args.name, str(photo), str(workdir)],
                env={**env, "T0": repr(time.time())}, check=True, capture_output=True, text=True,
            )
            phases.append(json.loads(run.stdout.splitlines()[-1]))

    print(f"{args.name}, {args.size[1]}x{args.size[0]} photo, {args.runs} runs, medians (range)")
    print(f"{'fcn-zoo predict, process start to exit':42s} {_fmt(totals)}")
    names = [k for k in phases[0] if k not in ("start", "forward")]
    for previous, name in zip(["start", *names], names):
        print(f"  {name:40s} {_fmt([p[name] - p[previous] for p in phases])}")
    forward = [p["forward"] for p in phases]
    print(f"{'second predict (forward + pre/post)':42s} {_fmt(forward)}")
    overhead = [t - f for t, f in zip(totals, forward)]
    print(f"{'overhead: CLI total - second predict':42s} {_fmt(overhead)}")


def _fmt(values: list[float]) -> str:
    return f"{statistics.median(values):6.2f} s ({min(values):.2f}-{max(values):.2f})"


if __name__ == "__main__":
    main()
