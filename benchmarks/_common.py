"""Timing and FLOP counting shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time

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
