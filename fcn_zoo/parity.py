"""Parity of a converted model with the implementation its weights came from.

The source implementation is built with its own code (torchvision's ``fcn_resnet*``, sssegmentation's
``BuildSegmentor``), loaded with the original state dict, and run on the same input as the converted model.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import version

import torch
import torch.nn.functional as F

__all__ = ["source_model", "measure_parity", "build_reference_segmentor"]


def build_reference_segmentor(config: dict) -> torch.nn.Module:
    """sssegmentation's FCN for an :class:`fcn_zoo.FCN` config (BatchNorm2d in place of SyncBatchNorm), eval mode."""
    from ssseg.modules.models.segmentors import BuildSegmentor

    depth = int(config["backbone"].removeprefix("resnet").removesuffix("c"))
    aux_channels = config.get("aux_channels", 512)
    cfg = {
        "type": "FCN", "num_classes": config["num_classes"], "benchmark": True, "align_corners": False,
        "norm_cfg": {"type": "BatchNorm2d"}, "act_cfg": {"type": "ReLU", "inplace": True},
        "backbone": {
            "type": "ResNet", "depth": depth, "structure_type": f"resnet{depth}conv3x3stem", "pretrained": False,
            "outstride": config["output_stride"], "use_conv3x3_stem": True, "selected_indices": (2, 3),
        },
        "head": {
            "in_channels": 2048, "feats_channels": config.get("head_channels", 512), "dropout": 0.1,
            "num_convs": config.get("num_convs", 2),
        },
        "auxiliary": None if aux_channels is None else {
            "in_channels": 1024, "out_channels": aux_channels, "dropout": 0.1,
        },
        "losses": {},
    }
    return BuildSegmentor(cfg, mode="TEST").eval()


def source_model(source: str, config: dict, state_dict: dict[str, torch.Tensor]) -> tuple[Callable, str] | None:
    """``(x -> logits at x's size, description)`` of the source implementation, or ``None`` if not importable."""
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}  # saved from a DDP wrapper
    if source == "torchvision":
        import torchvision
        from torchvision.models import segmentation

        depth = config["backbone"].removeprefix("resnet")
        model = getattr(segmentation, f"fcn_resnet{depth}")(
            weights=None, weights_backbone=None, num_classes=config["num_classes"],
            aux_loss=config.get("aux_channels") is not None,
        )
        model.load_state_dict(state_dict)
        model.eval()
        return (lambda x: model(x)["out"]), f"torchvision {torchvision.__version__}"
    if source == "reference":
        try:
            from ssseg.modules.utils import SSSegInputStructure
        except ImportError:
            return None
        model = build_reference_segmentor(config)
        model.load_state_dict(state_dict)

        def run(x):
            low = model(SSSegInputStructure(images=x, mode="TEST")).seg_logits
            return F.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=False)

        return run, f"sssegmentation {version('sssegmentation')}"
    return None  # mmsegmentation needs mmcv's compiled ops; its parity is not measured here


def measure_parity(model: torch.nn.Module, source: Callable, size: tuple[int, int] = (256, 320), seed: int = 0) -> dict:
    """Max abs logit difference and label agreement of ``model`` (on any device) and ``source`` (``x -> logits``,
    ``x`` a CPU tensor) on one seeded ``(1, 3, *size)`` input."""
    from ._inference import device_of, evaluating

    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode(), evaluating(model):
        ours, theirs = model(x.to(device_of(model))).cpu(), source(x)
    return {
        "max_abs_diff": float((ours - theirs).abs().max()),
        "label_agreement": float((ours.argmax(1) == theirs.argmax(1)).float().mean()),
        "input_shape": list(x.shape),
    }
