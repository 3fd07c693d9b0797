"""Sliding-window inference: all windows of a frame batched vs one window per forward pass.

    python benchmarks/slide_cpu.py [--model fcn_resnet50os16_cityscapes] [--size 1024 2048] [--runs 3]

The windows are the training crop (Cityscapes 512x1024) with a stride of 2/3 of it: 9 windows on a
1024x2048 frame. Both settings give the same logits (tests/test_predict.py checks 1e-5); this measures the
time. Weights are random: the speed does not depend on them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fcn_zoo
from fcn_zoo.protocol import _preprocess, _slide


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="fcn_resnet50os16_cityscapes", choices=fcn_zoo.list_models())
    parser.add_argument("--size", type=int, nargs=2, default=(1024, 2048), metavar=("H", "W"))
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    row = fcn_zoo.CHECKPOINTS[args.model]
    model = fcn_zoo.FCN(**row.model_config()).eval().fuse().to(memory_format=torch.channels_last)
    frame = torch.randint(0, 256, (3, *args.size)).float()
    times = {"one window per forward": [], "all windows in one batch": []}
    with torch.inference_mode():
        x = _preprocess(model, frame, torch.device("cpu"), row.data.eval_size)
        _slide(model.forward_features, x, row.crop_size, None, batch_size=16)  # warm-up
        for _ in range(args.runs):
            for name, batch in (("one window per forward", 1), ("all windows in one batch", 16)):
                t = time.perf_counter()
                _slide(model.forward_features, x, row.crop_size, None, batch_size=batch)
                times[name].append(time.perf_counter() - t)
    print(f"{row.name}, {args.size[0]}x{args.size[1]} frame, windows {row.crop_size[0]}x{row.crop_size[1]}, "
          f"{torch.get_num_threads()} threads, median of {args.runs}")
    for name, ts in times.items():
        print(f"{name:26s} {statistics.median(ts):7.2f} s")


if __name__ == "__main__":
    main()
