"""The one reader of images and masks, and atomic writes: :func:`read_image` turns anything the package is
handed into the ``(H, W, 3)`` uint8 RGB array everything else sees, :func:`read_mask` a label map into its class
indices, by the same rules of orientation. ``predict``, ``predict_iter``, videos, the Ray ``Segmenter``,
``fcn-zoo predict``, training, ``evaluate`` and the demo all read through these two.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ._files import atomic_path
from .errors import ImageError, MissingImageError

__all__ = ["ImageInput", "read_image", "read_mask", "displayed_size", "save_image", "describe", "MASK_MODES"]

logger = logging.getLogger(__name__)

ImageInput = "str | os.PathLike | bytes | Image.Image | np.ndarray | torch.Tensor | dict"

#: PIL modes that hold one class index per pixel (masks)
MASK_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N", "1")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def read_image(image, name: str | None = None) -> np.ndarray:
    """Any supported input -> a ``(H, W, 3)`` uint8 RGB array, as a viewer shows it: EXIF orientation applied;
    greyscale, palette, CMYK and alpha images made RGB (alpha dropped); 16-bit images scaled to 8 bits (value /
    257, rounded); float images in ``[0, 1]`` scaled by 255 and rounded.

    ``image``: a path, encoded bytes, a PIL image, an ``(H, W, 3)`` / ``(H, W)`` array (uint8; uint16 as
    16-bit; float in ``[0, 1]``), a ``(3, H, W)`` / ``(1, H, W)`` tensor (uint8, or float in ``[0, 1]`` as
    torchvision's), or a Hugging Face ``Image`` cell (``{"bytes": ..., "path": ...}``). Arrays and tensors
    are taken as RGB: an OpenCV ``cv2.imread`` array is BGR (pass ``img[..., ::-1]``). ``name``: what
    messages call the image (default: :func:`describe`). Raises :class:`~fcn_zoo.errors.ImageError` with
    one line naming the image and what to do."""
    name = name or describe(image)
    if isinstance(image, Image.Image):
        return _from_pil(image, name, own=False)
    if isinstance(image, np.ndarray):
        return _from_array(image, name)
    if type(image).__module__.startswith("torch") and hasattr(image, "detach"):
        return _from_tensor(image, name)
    with _opened(image, name) as img:
        return _from_pil(img, name)


def read_mask(mask, name: str | None = None) -> np.ndarray:
    """A label map -> a ``(H, W)`` uint8 array of its stored class indices, oriented as :func:`read_image`
    orients images (its own EXIF orientation applied, if it has one).

    ``mask``: a path, encoded bytes, a PIL image or a Hugging Face ``Image`` cell, in one of
    :data:`MASK_MODES` (8-bit grey or palette: the palette's indices are the classes, not its colours; 16-bit
    images must hold 0..255), or a 2-D integer array or tensor (``(1, H, W)`` too). A colour image is refused with
    what to do."""
    name = name or describe(mask)
    if type(mask).__module__.startswith("torch") and hasattr(mask, "detach"):  # a torch dataset's (image, mask) pair
        mask = mask.detach().cpu().numpy()
        mask = mask[0] if mask.ndim == 3 and mask.shape[0] == 1 else mask
    if isinstance(mask, np.ndarray):
        return _mask_array(mask, name)
    if isinstance(mask, Image.Image):
        return _mask_from_pil(mask, name, own=False)
    with _opened(mask, name) as img:
        return _mask_from_pil(img, name)


def displayed_size(image, name: str | None = None) -> tuple[int, int]:
    """``(width, height)`` of an image (a path, bytes, a Hugging Face cell or an opened PIL image) as a viewer
    shows it, from its header alone: an EXIF orientation of 5 to 8 turns it a quarter."""
    if isinstance(image, Image.Image):
        return _displayed_size(image, own=False)
    with _opened(image, name or describe(image)) as img:
        return _displayed_size(img)


def _displayed_size(img: Image.Image, own: bool = True) -> tuple[int, int]:
    if img.format == "TIFF":  # Pillow turns some TIFFs by their orientation itself: decode, as the reader does
        return _decoded(img, describe(img), own).size
    width, height = img.size
    if _header_exif(img) and _orientation(img) in _TRANSPOSED:
        return height, width
    return width, height


def _header_exif(img: Image.Image) -> bool:
    """Whether the orientation the reader applies is known from the header: a PNG's EXIF may follow its pixels
    (an eXIf chunk after the image data), which viewers need not read and neither does fcn-zoo."""
    return img.format != "PNG" or "exif" in img.info


@contextlib.contextmanager
def _opened(source, name: str) -> Iterator[Image.Image]:
    """A path, bytes or Hugging Face cell opened with PIL (the header); every way it can fail is one
    :class:`ImageError` line."""
    if isinstance(source, dict):  # a Hugging Face Image cell, undecoded
        source = source.get("bytes") or source.get("path")
        if source is None:
            raise ImageError(f"{name}: the cell holds no image (neither bytes nor a path)")
    if isinstance(source, np.str_):
        source = str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        try:
            exists, is_file = Path(source).exists(), Path(source).is_file()
        except (OSError, ValueError) as e:  # a name too long, a NUL byte
            raise ImageError(f"{str(name)[:200]}: not a usable file name ({e.__class__.__name__})") from None
        if not os.fspath(source) or not exists:  # Path("") would be the current folder
            raise MissingImageError(f"{name or repr(source)}: no such image file")
        if not is_file:  # a folder, a FIFO or a device is no image file either
            raise ImageError(f"{name}: not an image file (a folder or a device); pass the path of an image")
    else:
        raise ImageError(f"{name}: expected a path, bytes, PIL image, numpy array or tensor, got {type(source).__name__}")
    try:
        img = Image.open(source)
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not an image in a format Pillow reads (JPEG, PNG, WebP, TIFF, BMP...)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{name}: cannot read this image ({e})") from None
    try:
        yield img
    finally:
        img.close()


def _decoded(img: Image.Image, name: str, own: bool = True) -> Image.Image:
    """The first frame of a file the reader opened (``own``; of a caller's PIL image, the frame it is on, the
    image left there), decoded and turned as the EXIF of its header says."""
    try:
        turn = _header_exif(img)
        if own and getattr(img, "n_frames", 1) > 1:
            logger.info("%s has %d frames; taking the first", name, img.n_frames)
            img.seek(0)
        img.load()
        return ImageOps.exif_transpose(img) if turn else img
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{name}: cannot read this image: it does not decode ({e})") from None


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # a damaged EXIF block: shown unturned, as viewers do
        return 1


def _from_pil(img: Image.Image, name: str, own: bool = True) -> np.ndarray:
    img = _decoded(img, name, own)
    if img.mode in _SIXTEEN_BIT or img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if img.mode == "F":  # a float image file: [0, 1] scaled by 255, else taken as 0..255
            if not np.isfinite(arr).all():
                raise ImageError(f"{name}: the image contains NaN or infinite values")
            arr = arr * 255.0 if arr.max(initial=0) <= 1.0 else arr
        elif img.mode != "I" or arr.max(initial=0) > 255:
            arr = arr / 257.0  # 16-bit -> 8-bit range
        return _grey_to_rgb(np.rint(np.clip(arr, 0, 255)).astype(np.uint8))
    if img.mode != "RGB":
        img = img.convert("RGBA" if img.mode in ("P", "PA", "LA") else "RGB").convert("RGB")
    return np.array(img)  # writable (np.asarray's view of PIL's bytes is not, and torch.from_numpy warns)


def _from_array(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        arr = arr[..., :3]
    elif not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 1)):
        raise ImageError(f"{name}: expected an (H, W, 3) or (H, W) array, got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageError(f"{name}: the image is empty ({arr.shape[1]}x{arr.shape[0]})")
    if arr.dtype == np.uint16:
        arr = np.rint(arr / 257.0)
    elif arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise ImageError(f"{name}: the image contains NaN or infinite values")
        if arr.min() < 0 or arr.max() > 1:
            raise ImageError(f"{name}: float images must hold values in [0, 1], found {arr.min():g}..{arr.max():g}; "
                             "for 0..255 values pass np.clip(img, 0, 255).round().astype(np.uint8)")
        arr = np.rint(arr * 255.0)
    elif arr.dtype != np.uint8:
        raise ImageError(f"{name}: expected a uint8 array (or float in [0, 1]), got {arr.dtype}")
    if arr.ndim == 2 or arr.shape[2] == 1:
        return _grey_to_rgb(arr.astype(np.uint8, copy=False))
    # always a copy: the caller's buffer may be written again (a video decoder's, a camera's)
    return np.array(arr, dtype=np.uint8, order="C")


def _from_tensor(t, name: str) -> np.ndarray:
    if t.ndim != 3 or t.shape[0] not in (1, 3):
        raise ImageError(f"{name}: expected a (3, H, W) or (1, H, W) tensor, got shape {tuple(t.shape)}")
    if not (t.dtype.is_floating_point or str(t.dtype) == "torch.uint8"):
        raise ImageError(f"{name}: expected a float or uint8 tensor, got {t.dtype}")
    arr = t.detach().cpu().float().numpy() if t.dtype.is_floating_point else t.detach().cpu().numpy()
    return _from_array(np.moveaxis(arr, 0, -1), name)


def _grey_to_rgb(arr: np.ndarray) -> np.ndarray:
    return np.repeat(arr.reshape(arr.shape[0], arr.shape[1], 1), 3, axis=2)


def _mask_from_pil(img: Image.Image, name: str, own: bool = True) -> np.ndarray:
    if img.mode not in MASK_MODES:
        if img.mode not in ("RGB", "RGBA"):  # a float image, grey with alpha, CMYK...
            what = f"an image of mode {img.mode}; save the masks as 8-bit grey or palette PNGs of class indices"
        elif ((rgb := np.asarray(_decoded(img, name, own).convert("RGB"))) == rgb[..., :1]).all():  # grey as colour
            what = f"a colour image (mode {img.mode}) with three equal channels; save the masks as grey images (mask.convert('L'))"
        else:
            what = f"a colour image (mode {img.mode}); convert colours to class indices"
        raise ImageError(f"{name}: a mask holds one class index per pixel (an 8-bit grey or palette PNG), got {what}")
    img = _decoded(img, name, own)
    return _mask_array(np.array(img), name)


def _mask_array(raw: np.ndarray, name: str) -> np.ndarray:
    if raw.ndim != 2:
        raise ImageError(f"{name}: a label map must have one channel, got shape {raw.shape}")
    if raw.dtype == np.bool_:
        return raw.astype(np.uint8)
    if raw.dtype.kind not in "ui":
        raise ImageError(f"{name}: a label map holds integer class indices, got {raw.dtype}")
    if raw.dtype != np.uint8:  # 16-bit or 32-bit: the values must still be 0..255
        if raw.size and (raw.min() < 0 or raw.max() > 255):
            raise ImageError(f"{name}: label values must be 0..255, found {raw.min()}..{raw.max()}")
        raw = raw.astype(np.uint8)
    return raw


def describe(image) -> str:
    """What messages call an image: its path, or its kind and size."""
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    if isinstance(image, Image.Image):
        return getattr(image, "filename", "") or f"PIL image {image.mode} {image.size[0]}x{image.size[1]}"
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"{len(image)} bytes"
    if isinstance(image, dict):
        return str(image.get("path") or "an Image cell")
    shape = getattr(image, "shape", None)
    return f"{type(image).__name__} of shape {tuple(shape)}" if shape is not None else type(image).__name__


def save_image(img: Image.Image, path: str | os.PathLike, **kwargs) -> Path:
    """Save ``img`` to ``path`` (format from the suffix) via a temporary file in the same folder, so that a failure never leaves a partial file."""
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"), **kwargs)
    return path

