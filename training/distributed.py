"""torchrun plumbing: one process per device, NCCL on GPUs, Gloo on CPUs; a single process needs nothing."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device: str | None = None) -> DistributedContext:
    """Read torchrun's environment; pick ``device`` (default: this process's GPU if any, else CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda":
        device = f"cuda:{local_rank}"
    from fcn_zoo.devices import check_device_available, check_device_options

    check_device_options(device, "fp32", "torch")  # a misspelt or absent device is one line, not torch's error
    check_device_available(device, f"--device {device}")
    ctx = DistributedContext(rank, world_size, local_rank, torch.device(device))
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if ctx.device.type == "cuda" else "gloo")
    return ctx
