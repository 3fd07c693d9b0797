"""What a device string names, and whether this machine has it: checked before any weights are loaded, the
spelling and what the precision and engine need without importing torch, the GPU's presence with it."""

from __future__ import annotations

import os
import re

from .errors import FCNZooError

__all__ = ["check_device_options", "check_device_available", "has_cuda", "distributed_rank"]


def distributed_rank() -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` from torchrun's environment; ``(0, 1, 0)`` outside it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))

_DEVICE = re.compile(r"^(cpu|cuda|mps|xpu)(:\d+)?$")


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


def no_nvidia_driver() -> bool:
    """Whether this machine certainly has no NVIDIA driver (no ``/dev/nvidia*`` or WSL's ``/dev/dxg`` device, no
    ``libcuda`` to load): then torch cannot see a CUDA GPU, and that is known without importing it (~2 s)."""
    import ctypes.util
    import glob

    return not glob.glob("/dev/nvidia*") and not os.path.exists("/dev/dxg") and ctypes.util.find_library("cuda") is None


def check_device_available(device: str) -> None:
    """A GPU asked for that torch cannot see is one line, not the driver's message."""
    kind, _, index = device.partition(":")
    if kind == "cuda" and no_nvidia_driver():
        raise FCNZooError(f"--device {device}: this machine has no NVIDIA driver (no /dev/nvidia*, no libcuda); "
                          "use --device cpu")
    import torch

    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise FCNZooError(f"--device {device}: torch sees no CUDA GPU here (torch {torch.__version__}, {build}); "
                              "use --device cpu, or check the GPU driver with nvidia-smi")
        if index and int(index) >= count:
            raise FCNZooError(f"--device {device}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise FCNZooError(f"--device {device}: Apple's MPS is not available here; use --device cpu")


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
