"""Images in and out: any supported input becomes a ``(3, H, W)`` float tensor of 0..255 RGB values, and
images are written atomically.

Images are read as a viewer shows them: EXIF rotation applied; greyscale, palette, CMYK, 16-bit and
alpha images become RGB. Arrays and tensors are taken as RGB.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ._files import atomic_path
from .errors import ImageError

__all__ = ["ImageInput", "load_image", "save_image", "describe", "rgb_uint8"]

logger = logging.getLogger(__name__)

ImageInput = "str | os.PathLike | Image.Image | np.ndarray | torch.Tensor"



def load_image(image) -> tuple[torch.Tensor, bool]:
    """Any supported input -> ``(float32 (3, H, W) tensor of 0..255 RGB values, came-from-8-bit flag)``.

    Arrays and tensors are taken as RGB; a BGR array (OpenCV) is not detected and gives worse masks."""
    name = describe(image)
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


def describe(image) -> str:
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    if isinstance(image, Image.Image):
        return getattr(image, "filename", "") or f"PIL image {image.mode} {image.size[0]}x{image.size[1]}"
    shape = getattr(image, "shape", None)
    return f"{type(image).__name__} of shape {tuple(shape)}" if shape is not None else type(image).__name__


def rgb_uint8(x: torch.Tensor) -> np.ndarray:
    return x.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def save_image(img: Image.Image, path: str | os.PathLike, **kwargs) -> Path:
    """Save ``img`` to ``path`` (format from the suffix) via a temporary file in the same folder, so that a failure never leaves a partial file."""
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"), **kwargs)
    return path
