"""Training cost of each zoo row, counted, not measured: FLOPs of one training step x steps, over a GPU rate.

    python benchmarks/training_cost.py [--tflops 300]

For each row: forward + backward FLOPs of one crop (``torch.utils.flop_counter`` on the meta device, so
nothing is computed), times the images the recipe sees (epochs x iterations per epoch as the reference counts them x batch), divided by
a sustained rate. The default, 150 TFLOP/s, is about 15% of an H100's dense bf16 peak: an assumption for
dilated-convolution training with BatchNorm and a data pipeline, not a measurement; pass your own rate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fcn_zoo  # noqa: E402
from benchmarks._common import count_flops  # noqa: E402
from training.plan import reference_iters_per_epoch  # noqa: E402
from training.train import AUX_WEIGHT  # noqa: E402

TRAIN_IMAGES = {"voc": 10582, "ade20k": 20210, "cityscapes": 2975}


def step_flops(row) -> int:
    with torch.device("meta"):
        model = fcn_zoo.FCN(**row.model_config())
        x = torch.empty(1, 3, *row.crop_size)
        target = torch.zeros(1, *row.crop_size, dtype=torch.long)
    model.train()

    def step():
        logits, aux = model(x)
        (F.cross_entropy(logits, target) + AUX_WEIGHT * F.cross_entropy(aux, target)).backward()

    return count_flops(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tflops", type=float, default=150.0, help="sustained training rate of one GPU, TFLOP/s")
    args = parser.parse_args()
    print(f"| name | iterations | TFLOP per image | GPU-hours at {args.tflops:g} TFLOP/s |")
    print("|---|---:|---:|---:|")
    for row in fcn_zoo.CHECKPOINTS.values():
        iterations = row.epochs * reference_iters_per_epoch(TRAIN_IMAGES[row.dataset], row.batch_size)
        per_image = step_flops(row)
        hours = per_image * iterations * row.batch_size / (args.tflops * 1e12) / 3600
        print(f"| `{row.name}` | {iterations:,} | {per_image / 1e12:.2f} | {hours:.1f} |")


if __name__ == "__main__":
    main()
