"""Make an FCN's int8 version: :func:`quantize` calibrates it with NNCF's post-training quantization and
returns a :class:`~fcn_zoo.int8.QuantizedFCN` run by OpenVINO.

Why OpenVINO + NNCF: of the maintained int8 stacks for CPUs (OpenVINO + NNCF, onnxruntime's static
quantization, torchao's PT2E), OpenVINO + NNCF ran R-50 OS8 fastest on the CPUs measured, with onnxruntime's
QDQ int8 close behind (benchmarks/RESULTS.md), converts the PyTorch model without an ONNX export, and keeps
u8s8 accurate on CPUs without VNNI; ``torch.ao.quantization`` is deprecated and intel-extension-for-pytorch
discontinued.

Calibration images go through the reader and the evaluation protocol, exactly as the model sees them when
it predicts (resized to its evaluation size, normalised). The agreement with the fp32 model is measured on
images held out of the calibration and written into the int8 model's config and card.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import platform
import random
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from ._inference import inference_copy
from .console import quiet_loggers
from .errors import FCNZooError, ImageError
from .metrics import IGNORE_INDEX
from .images import describe, read_image, read_mask
from .int8 import QuantizedFCN, cpu_has_int8_dot, openvino_or_error

__all__ = ["quantize", "calibration_items", "agreement", "save_new_folder", "summary"]

logger = logging.getLogger(__name__)

#: calibration images used by default: NNCF's own default is 300; on 2 CPU cores R-50 at VOC's size takes
#: about 2 s an image, and int8 agreement changes little past a hundred (benchmarks/RESULTS.md)
DEFAULT_SAMPLES = 100
#: held-out images the agreement is measured on, taken from the calibration images when there are enough
DEFAULT_CHECK = 20


def calibration_items(calibration) -> list:
    """What ``calibration`` names, as a list of items the reader takes: a folder (walked), a glob or
    ``@list.txt`` (as ``fcn-zoo predict`` reads them), a list of those or of images (paths, PIL images,
    arrays, tensors), or a dataset of ``(image, mask)`` pairs (``len`` and indexing; read lazily)."""
    from .inputs import expand_inputs

    if isinstance(calibration, (str, os.PathLike)):
        calibration = [calibration]
    if isinstance(calibration, Sequence) and calibration and all(isinstance(c, (str, os.PathLike)) for c in calibration):
        found = expand_inputs([os.fspath(c) for c in calibration])
        videos = [s.path for s in found.sources if s.video]
        if videos:
            logger.warning("calibration: %d videos left out (%s...): calibrate on images", len(videos), videos[0])
        return [s.path for s in found.sources if not s.video]
    if isinstance(calibration, Sequence):
        return calibration
    if hasattr(calibration, "__getitem__") and hasattr(calibration, "__len__"):  # a torch or Hugging Face dataset
        return _Lazy(calibration)
    return list(calibration)


class _Lazy(Sequence):
    """A dataset's items, read when indexed (a dataset of thousands is sampled, not loaded)."""

    def __init__(self, data):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]


def quantize(
    model, calibration, *, num_samples: int = DEFAULT_SAMPLES, validation=None, check: int = DEFAULT_CHECK,
    seed: int = 0, progress: bool = True, source: str | None = None,
) -> QuantizedFCN:
    """The int8 version of ``model`` (an :class:`fcn_zoo.FCN`, as loaded: not ``fuse()``d), for the CPU.

    Args:
        calibration: images like those the model will see: a folder, a glob, ``@list.txt``, a list of images
            (paths, PIL images, RGB uint8 arrays, tensors) or a dataset of ``(image, mask)`` pairs, such as the
            training split of the model's dataset. Up to ``num_samples`` of them are used, chosen evenly at
            random (``seed``); those that cannot be read are named in a warning and skipped.
        validation: images (as ``calibration``), or ``(image, mask)`` pairs, to measure the agreement with the
            fp32 model on (the share of pixels whose labels agree, and with masks the mIoU of each); read before
            the calibration, those that cannot be read named in a warning and skipped. Default: up to ``check``
            calibration images held out of the calibration, where there are more than ``num_samples + check``;
            else the calibration images themselves (the card says which).
        progress: NNCF's progress bars.
        source: what the model is (a zoo name, repo id or folder) for the card; default the model's dataset.

    Returns:
        a :class:`~fcn_zoo.int8.QuantizedFCN` on the CPU; ``save_pretrained`` writes its folder.

    Raises:
        FCNZooError: no calibration images, none readable, no readable validation images, or OpenVINO / NNCF not installed
            (``pip install 'fcn-zoo[int8]'``).
    """
    openvino = openvino_or_error("quantize")
    try:
        import nncf
    except ImportError as e:
        raise FCNZooError("quantize needs NNCF: pip install 'fcn-zoo[int8]'") from e
    if isinstance(model, QuantizedFCN):
        raise ValueError("this model is int8 already; quantize the fp32 model it was made from")
    if getattr(model, "_fused", False):
        raise ValueError("quantize the model as loaded, not a fuse()d one (load it again)")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    items = calibration_items(calibration)
    if not len(items):
        raise FCNZooError(f"calibration {_what(calibration)}: no images; give a folder, a list or a dataset of images")
    checks = None  # the held-out images and masks, read before the calibration: a bad one is skipped, not fatal
    if validation is not None:
        checks = _read_pairs(calibration_items(validation), "validation", model.num_classes)
        if not checks:
            raise FCNZooError(f"validation {_what(validation)}: no readable images to measure the agreement on; give "
                              "images, or leave validation out to hold out calibration images")
    chosen = random.Random(seed).sample(range(len(items)), len(items))
    held_out = []
    if validation is None and len(items) > num_samples + check:
        held_out, chosen = chosen[:check], chosen[check:]
        checks = _read_pairs([items[i] for i in held_out], "held-out image", model.num_classes) or None
    chosen = sorted(chosen[:num_samples])
    plain = inference_copy(model, "cpu")  # eval mode, no auxiliary head; the caller's model left as it is
    inputs = _CalibrationInputs(plain, [items[i] for i in chosen])
    if not inputs.readable:
        raise FCNZooError(f"calibration {_what(calibration)}: none of the {len(chosen)} images could be read")
    example = torch.from_numpy(inputs.first)
    # OpenVINO traces the module with torch.jit (deprecated: a FutureWarning) and torch logs a CUDA lookup:
    # neither is the user's to act on
    with torch.no_grad(), quiet_loggers("torch.utils.cpp_extension"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        network = openvino.convert_model(_Features(plain), example_input=example,
                                         input=[openvino.PartialShape([-1, 3, -1, -1])])
    level = logging.getLogger("nncf").level
    nncf.set_log_level(logging.INFO if progress else logging.ERROR)
    try:  # NNCF's progress bars are rich's, on stdout: not shown when not asked for
        with contextlib.nullcontext() if progress else contextlib.redirect_stdout(io.StringIO()):
            # full bias correction: on a small trained FCN, labels agreed with fp32 on 99.9% of held-out pixels
            # against 98.8% with NNCF's fast default (tests/test_int8.py's model), for a longer calibration
            quantized = nncf.quantize(network, nncf.Dataset(inputs), subset_size=len(inputs.readable),
                                      preset=nncf.QuantizationPreset.PERFORMANCE, fast_bias_correction=False)
    finally:
        nncf.set_log_level(level)
    config = {
        **model.hub_config(),
        "quantization": {
            "engine": "openvino",
            "openvino": openvino.__version__.split("-")[0],
            "nncf": nncf.__version__,
            "preset": "performance",
            "bias_correction": "full",
            "source": source or f"an FCN of {model.dataset or 'its own classes'}",
            "calibration": {"images": len(inputs.readable), "source": _what(calibration),
                            "skipped": len(chosen) - len(inputs.readable)},
        },
    }
    int8 = QuantizedFCN(quantized, config).eval()
    int8.quantization["agreement"] = {
        **agreement(plain, int8, checks or inputs.readable), "held_out": checks is not None,
        "cpu": _cpu_name(), "int8_dot": cpu_has_int8_dot(), "inference_precision": int8.inference_precision,
    }
    return int8


def agreement(reference, other, items: Iterable) -> dict:
    """How far ``other``'s labels agree with ``reference``'s on ``items`` (images, or ``(image, mask)`` pairs):
    the share of pixels with the same label, the number of images, and with masks each one's mIoU (%)."""
    from .engine import Predictor
    from .metrics import ConfusionMatrix

    items = list(items)
    pairs = [item if isinstance(item, tuple) else (item, None) for item in items]
    images = [read_image(image, describe(image)) for image, _ in pairs]
    masks = [read_mask(mask, describe(mask)) if mask is not None else None for _, mask in pairs]
    same = total = 0
    matrices = {}
    for key, model in (("fp32", reference), ("int8", other)):
        labels = [seg.labels for _, seg in Predictor(model, fuse=True).stream(images, errors="raise")]
        matrices[key] = ConfusionMatrix(reference.num_classes)
        for label, mask in zip(labels, masks):
            if mask is not None:
                matrices[key].update(torch.from_numpy(label), torch.from_numpy(np.array(mask)))
        if key == "fp32":
            first = labels
    for a, b in zip(first, labels):
        same += int((a == b).sum())
        total += a.size
    result = {"images": len(images), "pixels": same / max(total, 1)}
    if any(mask is not None for mask in masks):
        result["miou_fp32"] = 100 * matrices["fp32"].compute()["mIoU"]
        result["miou_int8"] = 100 * matrices["int8"].compute()["mIoU"]
    return result


def _read_pairs(items, what: str, num_classes: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """``items`` (images, or ``(image, mask)`` pairs) read, and each mask checked against its image's size and the
    classes: one that cannot be read or does not fit is named in a warning and left out, before the calibration."""
    pairs = []
    for item in items:
        image, mask = item if isinstance(item, tuple) else (item, None)
        try:
            rgb, labels = read_image(image, describe(image)), None if mask is None else read_mask(mask, describe(mask))
            if labels is not None and labels.shape != rgb.shape[:2]:
                raise ImageError(f"its mask {describe(mask)} is {labels.shape[1]}x{labels.shape[0]}, the image "
                                 f"{rgb.shape[1]}x{rgb.shape[0]}")
            stray = None if labels is None else np.setdiff1d(np.unique(labels), [*range(num_classes), IGNORE_INDEX])
            if stray is not None and stray.size:
                raise ImageError(f"its mask {describe(mask)} holds {stray.tolist()[:5]}, outside the model's "
                                 f"{num_classes} classes (and {IGNORE_INDEX}, ignored)")
            pairs.append((rgb, labels))
        except (ImageError, OSError) as e:
            logger.warning("%s %s skipped (%s)", what, describe(image), e)
    return pairs


def summary(int8: QuantizedFCN) -> str:
    """One line: what the int8 model was calibrated on and how it agrees with the fp32 model."""
    q = int8.quantization
    agreed = q["agreement"]
    where = "held-out" if agreed["held_out"] else "calibration"
    miou = f", mIoU {agreed['miou_fp32']:.2f} -> {agreed['miou_int8']:.2f}" if "miou_int8" in agreed else ""
    return (f"int8, calibrated on {q['calibration']['images']} images; labels agree with fp32 on "
            f"{100 * agreed['pixels']:.2f}% of the pixels of {agreed['images']} {where} images{miou}")


def save_new_folder(int8: QuantizedFCN, folder: Path) -> None:
    """``int8.save_pretrained`` into ``folder``, which must not exist: written beside it, then renamed into place,
    so that a failure leaves nothing behind."""
    import shutil

    folder = Path(folder)
    if folder.exists():
        raise FCNZooError(f"{folder}: already exists; pass a new folder so that nothing is overwritten")
    partial = folder.parent / f".{folder.name}.partial-{os.getpid()}"
    partial.mkdir(parents=True)  # with the umask's mode, as the folder will keep
    try:
        int8.save_pretrained(partial)
        partial.rename(folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


class _Features(torch.nn.Module):
    """``model.forward_features`` as a module's forward: the graph OpenVINO converts."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


class _CalibrationInputs:
    """The calibration images as the network sees them, read again on each of NNCF's passes (not held in
    memory: at a dataset's evaluation size a hundred of them take gigabytes); unreadable ones are found by
    a first reading, named once and left out."""

    def __init__(self, model, items: list):
        self.model = model
        self.readable = []
        self.first = None
        for item in items:
            image = item[0] if isinstance(item, tuple) else item
            try:
                prepared = self._prepare(image)
            except (ImageError, OSError) as e:
                logger.warning("calibration: %s skipped (%s)", describe(image), e)
                continue
            self.readable.append(image)
            if self.first is None:
                self.first = prepared

    def _prepare(self, image) -> np.ndarray:
        from .protocol import prepare

        with torch.inference_mode():
            return prepare(self.model, read_image(image, describe(image))).contiguous().numpy()

    def __iter__(self):
        return (self._prepare(image) for image in self.readable)

    def __len__(self) -> int:
        return len(self.readable)


def _what(calibration) -> str:
    if isinstance(calibration, (str, os.PathLike)):
        return str(calibration)
    if isinstance(calibration, Sequence) and calibration and all(isinstance(c, (str, os.PathLike)) for c in calibration):
        return " ".join(map(str, calibration[:3])) + (" ..." if len(calibration) > 3 else "")
    return f"a {type(calibration).__name__} of {len(calibration)} items" if hasattr(calibration, "__len__") else "images"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
