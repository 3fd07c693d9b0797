"""What a prediction is: :class:`Segmentation`, the labels of one image with its class names and colours."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .images import ImageInput, read_image, save_image
from .labels import upsample_softmax

__all__ = ["Segmentation"]


@dataclass(eq=False)  # arrays do not compare as one truth value: two results are equal only as one object
class Segmentation:
    """The prediction for one image.

    Attributes:
        labels: ``(H, W)`` class indices at the input's own size (``uint8`` up to 256 classes, else ``int32``).
        class_names: the name of each class index.
        palette: the RGB colour of each class index.
        image: the input as an ``(H, W, 3)`` uint8 RGB array, used by :meth:`overlay`.
        logits: the network's logits before upsampling to the image's size (each ``(1, C, h, w)`` float32 on
            the CPU, one per TTA scale and flip), from which :attr:`confidence` and :meth:`probabilities`
            are computed when asked for. For a 512x683 evaluation size that is C x 64 x 86 floats: 0.5 MB
            for VOC's 21 classes, 3.3 MB for ADE20K's 150 (``mode="slide"``: at the evaluation size itself,
            64 times more).
    """

    labels: np.ndarray
    class_names: list[str]
    palette: list[tuple[int, int, int]]
    image: np.ndarray | None = field(default=None, repr=False)
    logits: list[torch.Tensor] | None = field(default=None, repr=False)
    _confidence: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)``."""
        return self.labels.shape[0], self.labels.shape[1]

    @property
    def confidence(self) -> np.ndarray:
        """``(H, W)`` float32: per pixel the largest softmax probability over the classes (that of the label),
        in ``(0, 1]``, from the logits upsampled to the image's size as for the labels. With TTA, the softmax
        of the mean of the logits. Computed band by band, once, on first access."""
        if self._confidence is None:
            self._confidence = upsample_softmax(self._need_logits(), self.size).numpy()
        return self._confidence

    def probabilities(self, class_name_or_index: str | int) -> np.ndarray:
        """``(H, W)`` float32: the softmax probability of one class (a name or an index) at each pixel."""
        if isinstance(class_name_or_index, str):
            if class_name_or_index not in self.class_names:
                raise ValueError(f"unknown class {class_name_or_index!r}; classes: {', '.join(self.class_names)}")
            index = self.class_names.index(class_name_or_index)
        elif isinstance(class_name_or_index, (int, np.integer)) and not isinstance(class_name_or_index, bool):
            index = int(class_name_or_index)
            if not 0 <= index < len(self.class_names):
                raise ValueError(f"class index {index} out of range: this model has {len(self.class_names)} classes")
        else:
            raise TypeError(f"expected a class name or index, got {type(class_name_or_index).__name__}")
        return upsample_softmax(self._need_logits(), self.size, classes=[index])[0].numpy()

    def _need_logits(self) -> list[torch.Tensor]:
        if self.logits is None:
            raise ValueError("this Segmentation holds no logits (it was made from labels alone); predict again")
        return self.logits

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
        base = self.image if image is None else read_image(image)
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
        """Write the labels as a PNG whose pixel values are the class indices, atomically: a palette PNG (the
        class colours) up to 256 classes, beyond that a 16-bit greyscale PNG (a palette holds 256 colours)."""
        path = Path(path)
        if path.suffix.lower() != ".png":
            raise ValueError(f"{path}: labels are saved as PNG so that they survive exactly; use a .png name")
        if len(self.palette) > 256:
            return save_image(Image.fromarray(self.labels.astype(np.uint16)), path)  # uint16: mode I;16
        return save_image(self.colorize(), path)

    def save_confidence(self, path: str | os.PathLike) -> Path:
        """Write :attr:`confidence` as a 16-bit greyscale PNG, atomically: pixel value = round(confidence x
        65535), so divide by 65535 to read it back (resolution 1.5e-5)."""
        path = Path(path)
        if path.suffix.lower() != ".png":
            raise ValueError(f"{path}: confidence maps are saved as 16-bit PNG; use a .png name")
        values = np.rint(self.confidence * 65535.0).astype(np.uint16)
        return save_image(Image.fromarray(values), path)  # uint16: mode I;16
