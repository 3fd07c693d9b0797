"""Helpers that run a model for inference and leave it as they found it: its modes restored, or a copy."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .model import FCN

__all__ = ["device_of", "evaluating", "inference_copy"]


def device_of(model: nn.Module) -> torch.device:
    """Where ``model`` runs: its parameters' device (an int8 model, which has none in torch, runs on the CPU)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def inference_copy(model: FCN, device: str | torch.device | None = None) -> FCN:
    """A copy of ``model`` in eval mode without the training-only auxiliary head, on ``device`` (default the
    model's); ``model`` itself is left untouched."""
    with torch.inference_mode(False), torch.no_grad():  # a model loaded under inference mode copies too
        # the memo maps the auxiliary head to None: it is never copied
        memo = {id(model.auxiliary_head): None} if model.auxiliary_head is not None else {}
        copied = copy.deepcopy(model, memo)
        if device is not None:
            copied.to(device)
    return copied.eval()


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode within the block, every submodule's mode as it was afterwards (a model in
    training mode, or one with a submodule set to train such as MC dropout, comes back as it was). An eval
    model is never written to, so threads may share it; a model in training mode is switched for the
    block, so it is not for several threads at once."""
    modes = [(m, m.training) for m in module.modules()]
    if not any(training for _, training in modes):
        yield module  # nothing to change: concurrent callers of an eval model never write its flags
        return
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training
