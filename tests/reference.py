"""The reference implementation (sssegmentation) for parity tests: its FCN built from its own config."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from conftest import randomize_batchnorm
from fcn_zoo.parity import build_reference_segmentor


def build_reference_fcn(depth: int, output_stride: int, num_classes: int, seed: int = 0) -> torch.nn.Module:
    """The reference's FCN (the config of ``ssseg/configs/fcn/fcn_resnet{depth}os{os}_*.py``), random weights,
    non-trivial BatchNorm statistics, eval mode, BatchNorm2d instead of SyncBatchNorm (one process)."""
    torch.manual_seed(seed)
    model = build_reference_segmentor(
        {"num_classes": num_classes, "backbone": f"resnet{depth}c", "output_stride": output_stride}
    )
    return randomize_batchnorm(model, seed).eval()


def reference_low_res_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The reference's test-mode forward: logits at the backbone's resolution."""
    from ssseg.modules.utils import SSSegInputStructure

    with torch.no_grad():
        return model(SSSegInputStructure(images=x, mode="TEST")).seg_logits


def reference_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Reference logits upsampled to the input's size as the reference does it (bilinear, align_corners=False)."""
    return F.interpolate(reference_low_res_logits(model, x), size=x.shape[-2:], mode="bilinear", align_corners=False)


def save_reference_checkpoint(model: torch.nn.Module, path: Path) -> Path:
    """A checkpoint as the reference publishes it: ``{'model': state_dict}``."""
    torch.save({"model": model.state_dict()}, path)
    return path
