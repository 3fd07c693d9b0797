"""CPU forward-pass benchmark: fcn_zoo vs the reference implementation (sssegmentation), same weights.

    python benchmarks/forward_cpu.py [--model fcn_resnet50os8_voc] [--size 512 683] [--runs 5]

Prints, for one input of the given size: the median time of ``model(x)`` for fcn_zoo (NCHW,
channels_last as ``predict`` runs it, and channels_last after ``model.fuse()`` as ``fcn-zoo predict``
runs it) and for the reference model (its forward plus the same bilinear
upsampling), the FLOPs counted by ``torch.utils.flop_counter``, the GFLOP/s reached, and that rate as a
fraction of a 4096x4096 fp32 matmul measured in the same run. Runs are interleaved so that drift in the
machine's speed hits every contender alike. Needs the test extra (``pip install -e ".[test]"``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import fcn_zoo  # noqa: E402
from reference import build_reference_fcn, save_reference_checkpoint  # noqa: E402


def matmul_gflops(n: int = 4096, runs: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="fcn_resnet50os8_voc", choices=fcn_zoo.list_models())
    parser.add_argument("--size", type=int, nargs=2, default=(512, 683), metavar=("H", "W"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--workdir", default="/tmp/fcn_zoo_bench")
    args = parser.parse_args()

    row = fcn_zoo.CHECKPOINTS[args.model]
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    reference = build_reference_fcn(row.depth, row.output_stride, row.num_classes)
    pth = save_reference_checkpoint(reference, workdir / f"{row.name}.pth")
    model = fcn_zoo.from_pretrained(pth, cache_dir=workdir / "cache")
    model_cl = fcn_zoo.from_pretrained(pth, cache_dir=workdir / "cache").to(memory_format=torch.channels_last)
    model_fused = fcn_zoo.from_pretrained(pth, cache_dir=workdir / "cache").fuse().to(memory_format=torch.channels_last)

    from ssseg.modules.utils import SSSegInputStructure

    x = torch.randn(1, 3, *args.size)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def run_reference():
        low = reference(SSSegInputStructure(images=x, mode="TEST")).seg_logits
        return F.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=False)

    contenders = {
        "fcn_zoo model(x), NCHW": lambda: model(x),
        "fcn_zoo model(x), channels_last": lambda: model_cl(x_cl),
        "fcn_zoo model.fuse()(x), ch_last": lambda: model_fused(x_cl),
        "reference (sssegmentation)": run_reference,
    }
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            model(x)
        flops = counter.get_total_flops()
        for fn in contenders.values():  # warm-up
            fn()
        times = {name: [] for name in contenders}
        peaks = []
        for _ in range(args.runs):
            peaks.append(matmul_gflops(runs=3))
            for name, fn in contenders.items():
                times[name].append(timed(fn))

    peak = statistics.median(peaks)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, input 1x3x{args.size[0]}x{args.size[1]}, {row.name}")
    print(f"forward FLOPs: {flops / 1e9:.1f} GFLOP; 4096^2 fp32 matmul: {peak:.1f} GFLOP/s (median of {args.runs})")
    print(f"{'':34s} {'median s':>9s} {'GFLOP/s':>8s} {'of matmul':>9s}")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:34s} {t:9.3f} {flops / t / 1e9:8.1f} {flops / t / 1e9 / peak:9.1%}")


if __name__ == "__main__":
    main()
