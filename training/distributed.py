"""torchrun plumbing: one process per device, NCCL on GPUs, Gloo on CPUs; a single process needs nothing."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from fcn_zoo.errors import FCNZooError, first_line

from .data import DatasetLayoutError

T = TypeVar("T")


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


def shared_step(step: Callable[[], T], world_size: int, *, gather: bool = False):
    """Run ``step()`` here, then meet the other processes: if any of them raised, every process raises the
    first error (by rank), so that none is left waiting in a later collective for one that has stopped.

    The process that raised re-raises its own exception; the others raise one with its message, of a kind
    the commands say in one line (``SystemExit``, :class:`DatasetLayoutError`, else ``FCNZooError``).
    Returns this process's result, or with ``gather`` the list of every process's (picklable), in rank
    order. Every process calls the same shared steps in the same order; with one process it only runs
    ``step``. A step may hold others (training's plan holds the data checks) where nothing that can fail in
    one process alone runs before them: a process that fails there would meet the others at the wrong step.
    """
    try:
        result = step()
    except (Exception, SystemExit) as e:
        if world_size > 1:
            _meet(_shareable(e), None, world_size)
        raise
    if world_size == 1:
        return [result] if gather else result
    met = _meet(None, result if gather else None, world_size)
    first = next((error for error, _ in met if error is not None), None)
    if first is not None:
        kind, message = first
        raise _KINDS[kind](message)
    return [found for _, found in met] if gather else result


_KINDS = {"exit": SystemExit, "layout": DatasetLayoutError, "other": FCNZooError}


def _shareable(error: BaseException) -> tuple[str, object]:
    """What the other processes need to raise ``error`` again: its kind, and its message (an exit's code).
    The project's messages go as they are; anything else (a decompression bomb) with its type."""
    if isinstance(error, SystemExit):
        return "exit", error.code
    if isinstance(error, DatasetLayoutError):
        return "layout", str(error)
    return "other", str(error) if isinstance(error, FCNZooError) else f"{type(error).__name__}: {first_line(error)}"


def _meet(error: tuple | None, result, world_size: int) -> list[tuple]:
    met: list = [None] * world_size
    dist.all_gather_object(met, (error, result))
    return met
