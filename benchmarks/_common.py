"""Timing and FLOP counting shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device = torch.device("cpu"), runs: int = 5) -> float:
    """Median seconds of ``runs`` calls of ``fn`` after one warm-up call, the device synchronised."""
    fn()
    sync(device)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_rate(n: int = 4096, dtype: torch.dtype = torch.float32, device: torch.device = torch.device("cpu"), runs: int = 3) -> float:
    """FLOP/s of an ``n x n`` matmul in ``dtype`` on ``device``: the peak the benchmarks compare against."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, device, runs)


def count_flops(fn) -> int:
    """FLOPs of one call of ``fn`` as ``torch.utils.flop_counter`` counts them (a multiply-add is two)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def cached_row(cache: Path, name: str) -> None:
    """Row ``name`` with random weights in the reference's layout, converted into the fcn_zoo cache ``cache``
    as its first download would be (needs the test extra: the reference implementation builds it)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from reference import build_reference_fcn, save_reference_checkpoint

    import fcn_zoo
    from fcn_zoo.convert import convert_checkpoint

    row = fcn_zoo.CHECKPOINTS[name]
    cache.mkdir(parents=True, exist_ok=True)
    pth = save_reference_checkpoint(build_reference_fcn(row.depth, row.output_stride, row.num_classes), cache / f"{name}.pth")
    convert_checkpoint(pth, cache / "reference" / name, "reference", checkpoint=row, parity=False,
                       provenance={"source_file": pth.name})
    pth.unlink()


def peak_rss_command(argv: list[str]) -> list[str]:
    """A command running ``fcn-zoo`` + ``argv`` in a fresh process that prints its peak RSS in MiB as its last line."""
    code = ("import resource, sys; from fcn_zoo.cli import main; main(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    return [sys.executable, "-c", code, *argv]
