"""fcn-zoo: the twelve published FCN semantic segmentation checkpoints, one line away.

>>> import fcn_zoo
>>> model = fcn_zoo.from_pretrained("fcn_resnet50os8_voc")
>>> seg = model.predict("street.jpg")
>>> seg.labels.shape == seg.image.shape[:2]
True

Heavy modules (torch, timm, huggingface_hub) are imported on first use, so ``import fcn_zoo`` is cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import FCNZooError, ImageError, MissingFileError, NotCachedError, UnknownModelError, WeightsError
from .zoo import CHECKPOINTS, DATASETS, Checkpoint, get_checkpoint

__version__ = "0.1.0"

__all__ = [
    "FCN", "QuantizedFCN", "Segmentation", "TTA", "from_pretrained", "preprocess", "quantize", "read_image", "list_models", "get_checkpoint", "Checkpoint",
    "CHECKPOINTS", "DATASETS", "FCNZooError", "ImageError", "MissingFileError", "NotCachedError", "UnknownModelError",
    "WeightsError", "__version__",
]

_LAZY = {
    "FCN": "model",
    "from_pretrained": "hub",
    "Segmentation": "segmentation",
    "TTA": "protocol",
    "preprocess": "predict",
    "read_image": "images",
    "quantize": "quantization",
    "QuantizedFCN": "int8",
}

if TYPE_CHECKING:
    from .hub import from_pretrained
    from .model import FCN
    from .images import read_image
    from .int8 import QuantizedFCN
    from .quantization import quantize
    from .predict import preprocess
    from .protocol import TTA
    from .segmentation import Segmentation


def list_models(dataset: str | None = None) -> list[str]:
    """Names of the zoo's checkpoints, optionally only those trained on ``dataset``."""
    return [name for name, c in CHECKPOINTS.items() if dataset is None or c.dataset == dataset]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fcn_zoo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
