"""What a device string names, and whether this machine has it: checked before any weights are loaded, the
spelling and what the precision and engine need without importing torch, the GPU's presence with it."""

from __future__ import annotations

import re

from .errors import FCNZooError

__all__ = ["check_device_options", "check_device_available", "has_cuda"]

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


def check_device_available(device: str) -> None:
    """A GPU asked for that torch cannot see is one line, not the driver's message."""
    import torch

    kind, _, index = device.partition(":")
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
