"""Logits to a label map at the image's own size: full-size score map vs bands vs pruned classes, CPU.

    python benchmarks/upsample_cpu.py [--runs 3]

The last step of the protocol: low-resolution logits ``(C, h, w)`` upsampled bilinearly to the image's size
and arg-maxed over classes. Three ways, on the same logits:

- ``full``: ``F.interpolate`` to a ``C x H x W`` score map, then ``argmax``, as most implementations do;
- ``banded``: ``fcn_zoo.labels.upsample_argmax(..., prune=False)``: separable upsampling a band of rows
  at a time, never more than 64 MB of scores;
- ``pruned``: what ``predict`` runs: per cell of the low-resolution grid only the classes that can win
  there are scored (``upsample_argmax_candidates``), bands where too many can.

Logits are made like a trained model's (a layout of a few confident regions plus noise: the generator of
tests/test_predict.py), since random weights give near-constant label maps that flatter pruning. Also
prints the share of pixels whose label equals the full computation's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fcn_zoo.labels import upsample_argmax  # noqa: E402
from test_predict import _scene_logits  # noqa: E402

CASES = [  # (what, classes, low-res h x w, image H x W)
    ("ADE20K, 12 MP photo, OS8", 150, (64, 86), (3000, 4000)),
    ("ADE20K, 12 MP photo, OS16", 150, (32, 43), (3000, 4000)),
    ("Cityscapes frame, OS8", 19, (128, 256), (1024, 2048)),
    ("VOC image, OS8", 21, (64, 86), (375, 500)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.runs} runs, seconds")
    print(f"{'':28s} {'score map':>10s} {'full':>7s} {'banded':>7s} {'pruned':>7s} {'agree':>9s}")
    with torch.inference_mode():
        for what, classes, low, size in CASES:
            logits = _scene_logits(classes, *low)
            ways = {
                "full": lambda: F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[0].argmax(0),
                "banded": lambda: upsample_argmax([logits], size, prune=False),
                "pruned": lambda: upsample_argmax([logits], size),
            }
            times = {k: [] for k in ways}
            for _ in range(args.runs):
                for k, fn in ways.items():
                    t = time.perf_counter()
                    out = fn()
                    times[k].append(time.perf_counter() - t)
                    if k == "full":
                        full = out
                    elif k == "pruned":
                        agree = float((out == full).float().mean())
            score_map = classes * size[0] * size[1] * 4 / 2**20
            print(f"{what:28s} {score_map:7.0f} MB " + " ".join(f"{statistics.median(times[k]):7.2f}" for k in ways)
                  + f" {agree:9.5%}")


if __name__ == "__main__":
    main()
