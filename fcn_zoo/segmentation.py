"""What a prediction is: :class:`Segmentation`, the labels of one image with its class names and colours."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .images import ImageInput, load_image, rgb_uint8, save_image

__all__ = ["Segmentation"]


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
        base = self.image if image is None else rgb_uint8(load_image(image)[0])
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
