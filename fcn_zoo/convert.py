"""Turn the reference implementation's ``.pth`` checkpoints into :class:`fcn_zoo.FCN` state dicts.

A reference file is ``{'model': state_dict}`` of plain tensors, read with ``torch.load(weights_only=True)``
so that no code in the pickle can run. Its keys differ from ours by prefixes only.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .errors import WeightsError
from .zoo import DATASETS

__all__ = ["read_checkpoint", "convert_reference", "reference_config"]

# (reference prefix, fcn_zoo prefix), first match wins
_REFERENCE_PREFIXES = (
    ("backbone_net.stem.7.", "backbone.bn1."),
    ("backbone_net.stem.", "backbone.conv1."),
    ("backbone_net.", "backbone."),
    ("decoder.", "decode_head."),
    ("auxiliary_decoder.", "auxiliary_head."),
)


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.pth`` of tensors safely; unwrap ``{'model': ...}`` / ``{'state_dict': ...}``.

    Raises:
        WeightsError: the file is missing, not a torch file, or holds more than tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(
            f"{path}: not a checkpoint of plain tensors ({first_line}); it was not loaded, and no code in it ran"
        ) from e
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors (optionally under 'model'), got {type(obj).__name__}")
    return obj


def convert_reference(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the keys of a reference (sssegmentation) FCN state dict to :class:`fcn_zoo.FCN`'s."""
    out = {}
    unknown = []
    for key, value in state_dict.items():
        key = key.removeprefix("module.")  # saved from a DistributedDataParallel wrapper
        for old, new in _REFERENCE_PREFIXES:
            if key.startswith(old):
                out[new + key[len(old):]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise WeightsError(f"not a reference FCN state dict: unknown keys {', '.join(sorted(unknown)[:8])}")
    return out


def reference_config(state_dict: dict[str, torch.Tensor], output_stride: int | None, name: str = "") -> dict:
    """The :class:`fcn_zoo.FCN` arguments of a converted reference state dict.

    Classes and depth are read from the weights; the output stride is not in the weights (it is a
    dilation), so it comes from ``output_stride`` or from an ``os8``/``os16`` in ``name``.
    """
    if "decode_head.7.weight" not in state_dict:
        raise WeightsError(f"{name or 'checkpoint'}: no decode_head.7.weight; not a two-conv reference FCN head")
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"backbone\.layer3\.(\d+)\.", k))}
    depth = {6: 50, 23: 101, 36: 152}.get(len(blocks))
    if depth is None:
        raise WeightsError(f"{name or 'checkpoint'}: layer3 has {len(blocks)} blocks, not a ResNet-50/101/152")
    if output_stride is None:
        m = re.search(r"os(8|16|32)(?!\d)", Path(name).stem)
        if m is None:
            raise WeightsError(
                f"{name or 'checkpoint'}: the output stride is not stored in reference weights; "
                "name the file like the reference does (e.g. fcn_resnet50os8_voc.pth) or pass output_stride"
            )
        output_stride = int(m.group(1))
    config = {
        "num_classes": int(state_dict["decode_head.7.weight"].shape[0]),
        "backbone": f"resnet{depth}c",
        "output_stride": output_stride,
        "head_channels": int(state_dict["decode_head.0.weight"].shape[0]),
        "num_convs": 2,
        "aux_channels": int(state_dict["auxiliary_head.0.weight"].shape[0]) if "auxiliary_head.0.weight" in state_dict else None,
    }
    dataset = next((d for d in ("voc", "ade20k", "cityscapes") if Path(name).stem.endswith(f"_{d}")), None)
    if dataset is not None and DATASETS[dataset].num_classes == config["num_classes"]:
        config["dataset"] = dataset
    return config
