"""How a run uses its device: the autocast precision it can afford, and determinism when asked for.

Decisions are small functions of what the device can do, so that they are tested on a CPU: bf16 autocast
where the GPU has bf16 (Ampere and later), else fp16 with a gradient scaler (V100, T4), fp32 on the CPU or
with ``--fp32``; ``--deterministic`` makes torch pick deterministic kernels where it has them and warn
where it has none (CUDA's bilinear upsampling backward and ``nll_loss``), and the run names those ops.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from dataclasses import dataclass

import torch

__all__ = ["Precision", "training_precision", "configure_determinism", "nondeterministic_ops"]

#: cuBLAS needs a fixed workspace for deterministic results (torch's reproducibility notes)
CUBLAS_WORKSPACE = ":4096:8"


@dataclass(frozen=True)
class Precision:
    name: str  # "fp32", "bf16" or "fp16"
    dtype: torch.dtype | None  # the autocast dtype, None for none
    scaler: bool  # a GradScaler (fp16's small range needs one)
    note: str = ""  # said in the log when the choice is not the one a user might expect


def training_precision(device_type: str, fp32: bool, bf16_supported: bool) -> Precision:
    """The autocast of a run on ``device_type``: ``--fp32`` or a CPU train in fp32; a GPU in bf16 where it
    has bf16, else in fp16 with a gradient scaler."""
    if fp32 or device_type != "cuda":
        return Precision("fp32", None, False)
    if bf16_supported:
        return Precision("bf16", torch.bfloat16, False)
    return Precision("fp16", torch.float16, True,
                     "this GPU has no bf16 (pre-Ampere): training under fp16 autocast with a gradient scaler; "
                     "--fp32 trains as the reference did")


def configure_determinism(deterministic: bool, device: torch.device) -> None:
    """``--deterministic``: deterministic kernels where torch has them, a warning (not an error) where it has
    none, cuDNN's autotuner off and cuBLAS's workspace fixed. Otherwise cuDNN benchmarks its algorithms for
    the fixed crop size on GPUs, as the reference does."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)  # read when cuBLAS starts
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = device.type == "cuda"


@contextlib.contextmanager
def without_autotuning():
    """cuDNN's autotuner off within the block, as it was after: evaluation's images come in hundreds of sizes (VOC,
    ADE20K), and each new size would be benchmarked again (time, and workspace spikes); training's fixed crop
    keeps it."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


_NONDETERMINISTIC = re.compile(r"^(\S+) does not have a deterministic implementation")


@contextlib.contextmanager
def nondeterministic_ops(record: bool, found: list[str]):
    """Within the block, collect into ``found`` the ops torch warns have no deterministic kernel (one step
    is enough: every op of a step runs in it); the warnings themselves are not shown again."""
    if not record:
        yield
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        match = _NONDETERMINISTIC.match(str(w.message))
        if match and match.group(1) not in found:
            found.append(match.group(1))
