"""What happens to an image: read -> RGB -> reference resize -> normalise -> forward -> logits at the
image's own size -> argmax, and the :class:`Segmentation` that holds the result.

The default is the reference evaluation protocol exactly: resize keeping the aspect ratio so that the
image fits the row's evaluation size (``(2048, 512)``, Cityscapes ``(2048, 1024)``), one forward pass,
bilinear upsampling of the logits straight to the original size, argmax.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ._files import atomic_path
from ._fusion import cpu_has_bf16
from .errors import ImageError, is_out_of_memory
from .zoo import eval_resize_shape

__all__ = ["predict", "predict_labels", "Segmentation", "TTA", "load_image", "eval_resize_shape", "save_image"]

logger = logging.getLogger(__name__)

ImageInput = "str | os.PathLike | Image.Image | np.ndarray | torch.Tensor"


@dataclass(frozen=True)
class TTA:
    """Test-time augmentation: average the logits over ``scales`` (and their horizontal flips)."""

    scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    flip: bool = True


@dataclass
class Segmentation:
    """The prediction for one image.

    Attributes:
        labels: ``(H, W)`` class indices at the input's own size (``uint8`` up to 256 classes, else ``int32``).
        class_names: the name of each class index.
        palette: the RGB colour of each class index.
        image: the input as an ``(H, W, 3)`` uint8 RGB array, used by :meth:`overlay`.
    """

    labels: np.ndarray
    class_names: list[str]
    palette: list[tuple[int, int, int]]
    image: np.ndarray | None = field(default=None, repr=False)

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)``."""
        return self.labels.shape[0], self.labels.shape[1]

    def colorize(self) -> Image.Image:
        """The labels as a palette (``P`` mode) PIL image: pixel values are class indices."""
        if len(self.palette) > 256:
            return Image.fromarray(np.asarray(self.palette, dtype=np.uint8)[self.labels])
        img = Image.fromarray(self.labels.astype(np.uint8), mode="P")
        img.putpalette([c for rgb in self.palette for c in rgb])
        return img

    def overlay(self, image: ImageInput | None = None, alpha: float = 0.5) -> Image.Image:
        """The class colours blended over ``image`` (default: the input) with weight ``alpha``."""
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        base = self.image if image is None else _rgb_uint8(load_image(image)[0])
        if base is None:
            raise ValueError("this Segmentation holds no image; pass the image to overlay(image)")
        if base.shape[:2] != self.labels.shape:
            raise ValueError(f"image is {base.shape[1]}x{base.shape[0]} but the labels are {self.size[1]}x{self.size[0]}")
        colours = np.asarray(self.palette, dtype=np.float32)[self.labels]
        return Image.fromarray(np.rint(base * (1 - alpha) + colours * alpha).astype(np.uint8))

    def class_shares(self) -> dict[str, float]:
        """Fraction of pixels of each class present, largest first, as plain Python floats."""
        counts = np.bincount(self.labels.ravel(), minlength=len(self.class_names))
        order = np.argsort(-counts, kind="stable")
        return {self.class_names[i]: float(counts[i] / self.labels.size) for i in order if counts[i]}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the labels as a palette PNG (pixel value = class index), atomically."""
        path = Path(path)
        if path.suffix.lower() != ".png":
            raise ValueError(f"{path}: labels are saved as PNG so that they survive exactly; use a .png name")
        return save_image(self.colorize(), path)


def predict(
    model,
    images,
    *,
    tta: bool | TTA | None = None,
    mode: str = "whole",
    window: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    engine: str = "torch",
    compile: bool = False,
) -> Segmentation | list[Segmentation]:
    """Segment images with ``model`` (an :class:`fcn_zoo.FCN`).

    Args:
        images: one image or a list. An image is a path, a PIL image, a uint8 ``(H, W, 3)`` (or ``(H, W)``)
            array, or a ``(3, H, W)`` tensor (float in ``[0, 1]`` or uint8). Arrays and tensors are read as
            **RGB**: an OpenCV ``cv2.imread`` array is BGR and silently gives worse masks; pass
            ``img[..., ::-1]`` (or ``cv2.cvtColor(img, cv2.COLOR_BGR2RGB)``). EXIF rotation is applied;
            greyscale, palette, 16-bit and alpha images are converted to RGB (alpha is dropped).
        tta: ``True`` for flip + scales 0.5-1.75, or a :class:`TTA`; default none (the reference protocol).
        mode: ``"whole"`` (the reference protocol) or ``"slide"``: overlapping windows, all in batches.
        window, stride: the sliding window and its step, ``(h, w)``; default the training crop and 2/3 of it.
        batch_size: images (or windows) per forward pass; default 8 on GPUs, 1 on CPUs (where batching
            does not raise throughput and costs memory: benchmarks/RESULTS.md).
        device: run on this device (the model is moved there); default the model's.
        precision: ``"fp32"``, or ``"bf16"`` / on GPUs ``"fp16"``: the network under autocast (resizing
            and argmax stay fp32). On CPUs with AMX (Intel Xeon 4th generation on), bf16 is 3.4x faster
            than fp32, 5.4x on a ``fuse()``d model (benchmarks/RESULTS.md); without bf16 instructions it
            is slower, and a warning says so.
        engine: ``"torch"``, or on CPU ``"onnxruntime"``: the model exported once to ONNX (cached) and run
            by onnxruntime, which fuses what eager PyTorch cannot (~15% faster: benchmarks/RESULTS.md).
        compile: run the network through ``torch.compile`` (made once per model and device and kept, so
            only the first call pays the compilation: tens of seconds); for serving many images, mostly
            on GPUs. Each new evaluation shape after the first compiles once more, with dynamic shapes.

    Returns:
        a :class:`Segmentation` for one image, a list of them for a list.
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    if engine not in ("torch", "onnxruntime"):
        raise ValueError(f"engine must be 'torch' or 'onnxruntime', got {engine!r}")
    if compile and engine != "torch":
        raise ValueError("compile=True applies to engine='torch'; onnxruntime compiles its graph itself")
    tta = TTA() if tta is True else (tta or None)
    single = not isinstance(images, (list, tuple))
    items = [images] if single else list(images)
    if not items:
        raise ImageError("no images given: pass an image or a non-empty list of images")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if batch_size is None:
        batch_size = 1 if device.type == "cpu" else 8
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    autocast_dtype = _autocast_dtype(precision, device)
    model = model.to(device=device, memory_format=torch.channels_last).eval()
    features = None
    if engine == "onnxruntime":
        if device.type != "cpu" or autocast_dtype is not None:
            raise ValueError("engine='onnxruntime' runs on the CPU in fp32; use engine='torch' for GPUs")
        from .export import onnx_session

        session = onnx_session(model)
        features = lambda x: torch.from_numpy(session.run(None, {"image": x.contiguous().numpy()})[0])  # noqa: E731
    elif compile:
        features = compiled_features(model)
    results = []
    dtype = torch.uint8 if model.num_classes <= 256 else torch.int32
    features = _autocast(features or model.forward_features, device, autocast_dtype)
    with torch.inference_mode():
        for start in range(0, len(items), batch_size):
            chunk = [load_image(item) for item in items[start:start + batch_size]]
            try:
                labels = predict_labels(
                    model, [x for x, _ in chunk], from_uint8=[f for _, f in chunk], tta=tta, mode=mode,
                    window=window, stride=stride, batch_size=batch_size, features=features,
                )
            except RuntimeError as e:
                if not is_out_of_memory(e):
                    raise
                names = ", ".join(_describe(item) for item in items[start:start + batch_size])
                hint = "use mode='slide'" if mode == "whole" else "use a smaller window"
                raise ImageError(
                    f"{names}: not enough {device.type.upper()} memory to segment it at its evaluation size; "
                    f"{hint}{', a batch_size of 1' if batch_size > 1 else ''} or a larger device"
                ) from e
            for (x, _), lab in zip(chunk, labels):
                results.append(Segmentation(lab.to(dtype).cpu().numpy(), model.class_names, model.palette, _rgb_uint8(x)))
    return results[0] if single else results


def predict_labels(
    model,
    images: list[torch.Tensor],
    *,
    from_uint8: bool | list[bool] = True,
    tta: TTA | None = None,
    mode: str = "whole",
    window: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    batch_size: int = 8,
    eval_size: tuple[int, int] | None = None,
    features=None,
) -> list[torch.Tensor]:
    """The protocol on already-loaded images: ``(3, H, W)`` float tensors of 0..255 RGB values -> ``(H, W)``
    int64 label tensors on the model's device. ``from_uint8``: the images hold 8-bit values (per image or
    for all), which the reference keeps 8-bit through the resize. Call under ``torch.inference_mode()`` with the model in eval
    mode; :func:`predict` wraps it with input handling, and training's evaluation uses it directly.
    ``eval_size`` replaces the model's evaluation resize bound (for models trained at another scale);
    ``features`` replaces ``model.forward_features`` (another engine running the same graph)."""
    device = next(model.parameters()).device
    flags = from_uint8 if isinstance(from_uint8, list) else [from_uint8] * len(images)
    inputs = [_preprocess(model, x, flag, device, eval_size or model.eval_size) for x, flag in zip(images, flags)]
    logits = _logits(model, inputs, tta, mode, window, stride, batch_size, features or model.forward_features)
    return [_upsample_argmax(lg, x.shape[-2:]) for x, lg in zip(images, logits)]


# --- input ---------------------------------------------------------------------------------------


def load_image(image) -> tuple[torch.Tensor, bool]:
    """Any supported input -> ``(float32 (3, H, W) tensor of 0..255 RGB values, came-from-8-bit flag)``.

    Arrays and tensors are taken as RGB; a BGR array (OpenCV) is not detected and gives worse masks."""
    name = _describe(image)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ImageError(f"{name}: no such image file")
        try:
            with Image.open(path) as img:
                return _from_pil(img, name)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ImageError(f"{name}: cannot read this image ({e})") from e
    if isinstance(image, Image.Image):
        return _from_pil(image, name)
    if isinstance(image, np.ndarray):
        return _from_array(image, name)
    if isinstance(image, torch.Tensor):
        return _from_tensor(image, name)
    raise ImageError(f"{name}: expected a path, PIL image, numpy array or tensor, got {type(image).__name__}")


def _from_pil(img: Image.Image, name: str) -> tuple[torch.Tensor, bool]:
    if getattr(img, "n_frames", 1) > 1:
        logger.info("%s has %d frames; segmenting the first", name, img.n_frames)
        img.seek(0)
    img.load()
    img = ImageOps.exif_transpose(img)  # as a viewer shows it
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float32)
        if img.mode != "I" or arr.max(initial=0) > 255:
            arr = arr / 257.0  # 16-bit -> 8-bit range
        return _from_array(np.clip(arr, 0, 255), name, from_uint8=False)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        if np.isfinite(arr).all() and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        return _from_array(np.clip(arr, 0, 255), name, from_uint8=False)
    if img.mode != "RGB":
        img = img.convert("RGBA" if img.mode in ("P", "PA", "LA") else "RGB").convert("RGB")
    return _from_array(np.asarray(img), name)


def _from_array(arr: np.ndarray, name: str, from_uint8: bool | None = None) -> tuple[torch.Tensor, bool]:
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        arr = arr[..., :3]
    elif arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 1):
        arr = np.repeat(arr.reshape(arr.shape[0], arr.shape[1], 1), 3, axis=2)
    else:
        raise ImageError(f"{name}: expected an (H, W, 3) or (H, W) array, got shape {arr.shape}")
    if from_uint8 is None:
        if arr.dtype != np.uint8:
            raise ImageError(f"{name}: expected a uint8 array, got {arr.dtype}; convert it with .astype(np.uint8)")
        from_uint8 = True
    if not np.isfinite(arr).all():
        raise ImageError(f"{name}: the image contains NaN or infinite values")
    _check_size(arr.shape[0], arr.shape[1], name)
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(2, 0, 1), from_uint8


def _from_tensor(t: torch.Tensor, name: str) -> tuple[torch.Tensor, bool]:
    if t.ndim != 3 or t.shape[0] not in (1, 3):
        raise ImageError(f"{name}: expected a (3, H, W) or (1, H, W) tensor, got shape {tuple(t.shape)}")
    t = t.detach().to("cpu")
    if t.dtype == torch.uint8:
        x, from_uint8 = t.float(), True
    elif t.is_floating_point():
        if not torch.isfinite(t).all():
            raise ImageError(f"{name}: the tensor contains NaN or infinite values")
        if t.numel() and (t.min() < 0 or t.max() > 1):
            raise ImageError(f"{name}: float tensors must hold values in [0, 1] (torchvision's convention)")
        x, from_uint8 = t.float() * 255.0, False
    else:
        raise ImageError(f"{name}: expected a float or uint8 tensor, got {t.dtype}")
    _check_size(x.shape[1], x.shape[2], name)
    return x.expand(3, -1, -1).contiguous(), from_uint8


def _check_size(h: int, w: int, name: str) -> None:
    if h < 1 or w < 1:
        raise ImageError(f"{name}: the image is empty ({w}x{h})")


def _describe(image) -> str:
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    if isinstance(image, Image.Image):
        return getattr(image, "filename", "") or f"PIL image {image.mode} {image.size[0]}x{image.size[1]}"
    shape = getattr(image, "shape", None)
    return f"{type(image).__name__} of shape {tuple(shape)}" if shape is not None else type(image).__name__


def _rgb_uint8(x: torch.Tensor) -> np.ndarray:
    return x.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


# --- the protocol --------------------------------------------------------------------------------


def _preprocess(model, x: torch.Tensor, from_uint8: bool, device: torch.device, eval_size: Sequence[int]) -> torch.Tensor:
    """``(3, H, W)`` 0..255 -> normalised ``(1, 3, h, w)`` at the evaluation size, channels_last."""
    x = x.to(device).unsqueeze(0)
    size = eval_resize_shape(x.shape[-2], x.shape[-1], eval_size)
    if size != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if from_uint8:  # the reference resizes 8-bit images and keeps them 8-bit
            x = x.round_().clamp_(0, 255)
    mean = torch.tensor(model.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(model.std, device=device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def _logits(model, inputs: list[torch.Tensor], tta: TTA | None, mode, window, stride, batch_size, features) -> list[torch.Tensor]:
    """Per image, the logits ``(1, C, h', w')`` to be upsampled to its original size.

    With TTA, a list of such tensors (one per scale and flip) whose upsampled mean is the answer.
    """
    def run(batch: torch.Tensor) -> torch.Tensor:
        if mode == "slide":
            return _slide(features, batch, window or model.crop_size, stride, batch_size)
        return features(batch)

    def run_tta(batch: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for scale in tta.scales:
            x = batch if scale == 1 else F.interpolate(batch, scale_factor=scale, mode="bilinear", align_corners=False)
            outs.append(run(x))
            if tta.flip:
                outs.append(run(x.flip(-1)).flip(-1))
        return outs

    results: list = [None] * len(inputs)
    by_shape: dict[tuple, list[int]] = {}
    for i, x in enumerate(inputs):
        by_shape.setdefault(tuple(x.shape), []).append(i)
    for indices in by_shape.values():  # images of equal evaluation size share a forward pass
        batch = torch.cat([inputs[i] for i in indices])
        outs = run_tta(batch) if tta else [run(batch)]
        for j, i in enumerate(indices):
            results[i] = [o[j:j + 1].float() for o in outs]
    return results


def _slide(features, x: torch.Tensor, window: Sequence[int], stride: Sequence[int] | None, batch_size: int) -> torch.Tensor:
    """Sliding-window logits ``(N, C, h, w)`` from ``features`` (low-resolution logits of a batch of windows),
    each window's logits upsampled to the window as the model's forward does; windows batched, overlaps averaged."""
    n, _, h, w = x.shape
    wh, ww = min(window[0], h), min(window[1], w)
    sh, sw = stride or (max(1, math.ceil(window[0] * 2 / 3)), max(1, math.ceil(window[1] * 2 / 3)))
    ys = list(range(0, max(h - wh, 0) + 1, sh))
    xs = list(range(0, max(w - ww, 0) + 1, sw))
    if ys[-1] + wh < h:
        ys.append(h - wh)
    if xs[-1] + ww < w:
        xs.append(w - ww)
    boxes = [(y, xx) for y in ys for xx in xs]
    total = count = None
    for start in range(0, len(boxes), max(1, batch_size // n)):
        part = boxes[start:start + max(1, batch_size // n)]
        crops = torch.cat([x[:, :, y:y + wh, xx:xx + ww] for y, xx in part])
        out = F.interpolate(features(crops).float(), size=(wh, ww), mode="bilinear", align_corners=False)
        if total is None:
            total = x.new_zeros((n, out.shape[1], h, w), dtype=torch.float32)
            count = x.new_zeros((1, 1, h, w), dtype=torch.float32)
        for k, (y, xx) in enumerate(part):
            total[:, :, y:y + wh, xx:xx + ww] += out[k * n:(k + 1) * n]
            count[:, :, y:y + wh, xx:xx + ww] += 1
    return total / count


def _upsample_argmax(logits: list[torch.Tensor], size, budget_bytes: int = 64 << 20, prune: bool = True) -> torch.Tensor:
    """argmax over classes of the sum of ``logits`` (each ``(1, C, h, w)``) upsampled bilinearly to ``size``.

    Bilinear interpolation is separable: the width is upsampled for all ``h`` rows at once (small), the
    height a band of output rows at a time, each row a blend of its two nearest input rows. Only one
    band of full-size scores exists at a time (``budget_bytes``), so a 19-class 1024x2048 frame needs the
    20 MB of width-upsampled logits and one band instead of a 160 MB score map, and a TTA sum no more.
    For one set of logits (no TTA), ``prune`` first tries :func:`_upsample_argmax_candidates`, which
    scores only the classes that can win at each pixel. Equal to ``F.interpolate`` up to float rounding.
    """
    height, width = int(size[0]), int(size[1])
    if prune and len(logits) == 1:
        labels = _upsample_argmax_candidates(logits[0][0].float(), height, width, budget_bytes)
        if labels is not None:
            return labels
    classes = logits[0].shape[1]
    device = logits[0].device
    wide = [F.interpolate(lg.float(), size=(lg.shape[2], width), mode="bilinear", align_corners=False)[0] for lg in logits]
    taps = [_taps(lg.shape[2], height, device) for lg in logits]
    band = max(1, budget_bytes // (4 * classes * width * 4))  # two gathered rows, their blend, the sum
    labels = torch.empty(height, width, dtype=torch.int64, device=device)
    for top in range(0, height, band):
        bottom = min(height, top + band)
        total = None
        for w, (lower, upper, frac) in zip(wide, taps):
            scores = torch.lerp(w[:, lower[top:bottom]], w[:, upper[top:bottom]], frac[top:bottom].view(1, -1, 1))
            total = scores if total is None else total.add_(scores)
        labels[top:bottom] = total.argmax(0)
    return labels


def _upsample_argmax_candidates(logits: torch.Tensor, height: int, width: int, budget_bytes: int) -> torch.Tensor | None:
    """The labels of :func:`_upsample_argmax` for one ``(C, h, w)`` logits tensor, scoring at each pixel only
    the classes that can win there; ``None`` where too many can (then the banded path runs).

    Each output pixel blends the four logits vectors at the corners of its cell of the low-resolution grid
    with non-negative weights summing to 1. A class whose largest corner value is below another class's
    smallest corner value is below that class everywhere in the cell, so it cannot win there. With a
    trained model most cells have one class left, which wins at all their pixels; at the others only the
    classes left are blended, so a 150-class label map for a 12-megapixel photo costs a few scores per
    contested pixel instead of 150 per pixel (benchmarks/RESULTS.md). Equal to ``F.interpolate`` then
    argmax up to float rounding.
    """
    classes, h, w = logits.shape
    device = logits.device
    rows_lo, _, fy = _taps(h, height, device)
    cols_lo, _, fx = _taps(w, width, device)
    up_y = (torch.arange(h, device=device) + 1).clamp(max=h - 1)
    up_x = (torch.arange(w, device=device) + 1).clamp(max=w - 1)
    # the four corners of the cell whose top-left corner is (i, j): (i, j), (i, j+1), (i+1, j), (i+1, j+1)
    corners = torch.stack([logits, logits[:, :, up_x], logits[:, up_y], logits[:, up_y][:, :, up_x]])
    floor = corners.amin(0).amax(0)  # per cell, the best worst corner of any class
    ceiling = corners.amax(0)  # per class and cell, its best corner
    count = (ceiling >= floor).sum(0)  # (h, w): how many classes can win in each cell
    k = int(count.max())
    if 4 * k * float((count > 1).float().mean()) > classes:  # about as much work as scoring every class
        return None
    # a cell with one candidate: its class wins at each of the cell's pixels; no blending there
    labels = ceiling.argmax(0)[rows_lo][:, cols_lo]  # (height, width)
    contested = (count > 1)[rows_lo][:, cols_lo].view(-1).nonzero().squeeze(1)  # pixels of contested cells
    if len(contested) == 0:
        return labels
    # elsewhere blend the k classes with the highest best corner: they include every class that can win.
    # In class order, so that ties go to the lowest class index as argmax over all classes would have it.
    candidates = ceiling.topk(k, dim=0).indices.sort(dim=0).values  # (k, h, w)
    values = corners.gather(1, candidates.expand(4, k, h, w))  # (4, k, h, w)
    flat = labels.view(-1)
    chunk = max(1, budget_bytes // (4 * (10 * k + 8)))
    for start in range(0, len(contested), chunk):
        pixels = contested[start:start + chunk]
        i, j = rows_lo[pixels // width], cols_lo[pixels % width]
        wy, wx = fy[pixels // width], fx[pixels % width]
        v = values[:, :, i, j]  # (4, k, n)
        upper = torch.lerp(v[0], v[1], wx)  # along the width at the cell's top row, then its bottom row
        lower = torch.lerp(v[2], v[3], wx)
        best = torch.lerp(upper, lower, wy).argmax(0)  # (n,): index into the candidates
        flat[pixels] = candidates[:, i, j].gather(0, best[None])[0]
    return labels


def _taps(n_in: int, n_out: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear resampling of ``n_in`` samples to ``n_out`` (align_corners=False) as PyTorch does it: per output
    index, the lower and upper input index and the weight of the upper one."""
    y = torch.arange(n_out, device=device, dtype=torch.float64)
    src = ((y + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    lower = src.floor().long().clamp(max=n_in - 1)
    upper = (lower + 1).clamp(max=n_in - 1)
    return lower, upper, (src - lower).float()


_compiled_forward = None


def _forward_features(model, x: torch.Tensor) -> torch.Tensor:
    return model.forward_features(x)


def compiled_features(model):
    """``model.forward_features`` through ``torch.compile``. One compiled function serves every model (its
    guards tell models apart), so a model compiles once per input shape family and the compiled code holds
    no reference that would keep a model alive. Weights are read at each call, not frozen in."""
    global _compiled_forward
    if _compiled_forward is None:
        _compiled_forward = torch.compile(_forward_features)
    return functools.partial(_compiled_forward, model)


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    dtypes = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision not in dtypes:
        raise ValueError(f"precision must be 'fp32', 'fp16' or 'bf16', got {precision!r}")
    if device.type == "cpu" and precision == "fp16":
        raise ValueError("precision='fp16' is for GPUs; on CPU use 'bf16' (CPUs with AMX or AVX512-BF16) or 'fp32'")
    if device.type == "cpu" and precision == "bf16" and not cpu_has_bf16():
        logger.warning("this CPU has no bf16 instructions (AMX, AVX512-BF16): precision='bf16' will be slower than fp32")
    return dtypes[precision]


def _autocast(features, device: torch.device, dtype: torch.dtype | None):
    """``features`` run under autocast to ``dtype`` (the network only: resizing and argmax stay in fp32)."""
    if dtype is None:
        return features

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype):
            return features(x)

    return run


def save_image(img: Image.Image, path: str | os.PathLike, **kwargs) -> Path:
    """Save ``img`` to ``path`` (format from the suffix) via a temporary file in the same folder, so that a failure never leaves a partial file."""
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"), **kwargs)
    return path
