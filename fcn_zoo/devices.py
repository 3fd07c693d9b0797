"""What a device string names, and whether this machine has it: checked before any weights are loaded, the
spelling and what the precision and engine need without importing torch, the GPU's presence with it."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from .errors import FCNZooError

__all__ = ["check_device_options", "check_device_available", "no_cuda_device", "has_cuda", "distributed_rank"]

_DEVICE = re.compile(r"^(cpu|cuda|mps)(:\d+)?$")


def distributed_rank() -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` from torchrun's environment; ``(0, 1, 0)`` outside it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def check_device_options(device: str | None, precision: str, engine: str) -> None:
    """The device's spelling and what the precision and engine need of it, without importing torch."""
    import importlib.util

    if device is not None and not _DEVICE.match(device):
        raise FCNZooError(f"--device {device}: not a device; use cpu, cuda, cuda:N or mps")
    kind = (device or "cpu").split(":")[0]
    if precision == "fp16" and kind == "cpu":
        raise FCNZooError("--precision fp16 is for GPUs; on the CPU use bf16 (CPUs with AMX or AVX512-BF16) or fp32")
    if engine == "onnxruntime":
        if kind != "cpu" or precision != "fp32":
            raise FCNZooError("--engine onnxruntime runs on the CPU in fp32; use --engine torch for GPUs and bf16/fp16")
        if importlib.util.find_spec("onnxruntime") is None:
            raise FCNZooError("--engine onnxruntime needs onnxruntime: pip install 'fcn-zoo[export]'")


def no_cuda_device() -> str | None:
    """Why torch certainly sees no CUDA GPU here, told without importing it (~2 s): a CPU-only build of torch,
    or a Linux machine with no NVIDIA driver (no ``/dev/nvidia*``, WSL's ``/dev/dxg`` or Jetson's
    ``/dev/nvhost-*`` device, no ``libcuda``); ``None`` when only torch can tell (other systems, ROCm builds,
    whose GPUs are ``cuda`` devices too)."""
    import ctypes.util
    import glob
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        version = (Path(next(iter(spec.submodule_search_locations))) / "version.py").read_text()
    except OSError:
        return None
    build = dict(re.findall(r"(?m)^(cuda|hip)\b[^=]*=\s*(.+?)\s*$", version))
    if build.get("hip", "None") != "None":
        return None
    if build.get("cuda") == "None":
        return "this torch is a CPU-only build"
    if sys.platform != "linux":
        return None
    devices = glob.glob("/dev/nvidia*") + glob.glob("/dev/nvhost-*") + glob.glob("/dev/dxg")
    if not devices and ctypes.util.find_library("cuda") is None:
        return "this machine has no NVIDIA driver (no /dev/nvidia*, no libcuda)"
    return None


def check_device_available(device: str, what: str | None = None) -> None:
    """A GPU asked for that torch cannot see is one line naming why (``what``: how the caller named the device,
    default ``device 'cuda'``), not the driver's message or torch's assertion."""
    import warnings

    what = what or f"device {device!r}"
    kind, _, index = device.partition(":")
    if kind == "cuda" and (reason := no_cuda_device()):
        raise FCNZooError(f"{what}: {reason}; use the CPU")
    if kind not in ("cuda", "mps"):
        return
    import torch

    if kind == "cuda":
        with warnings.catch_warnings(record=True) as caught:  # torch says what is wrong with the driver in a warning
            warnings.simplefilter("always")
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = next((str(w.message).splitlines()[0] for w in caught), "")
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise FCNZooError(f"{what}: torch sees no CUDA GPU here (torch {torch.__version__}, {build}"
                              + (f"; {why}" if why else "") + "); use the CPU, or check the GPU driver with nvidia-smi")
        if index and int(index) >= count:
            raise FCNZooError(f"{what}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif not torch.backends.mps.is_available():
        raise FCNZooError(f"{what}: Apple's MPS is not available here; use the CPU")


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
