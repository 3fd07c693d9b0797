"""The reference training pipeline, on image and label together.

ratio-range resize -> random crop (no class over 75% of it) -> horizontal flip -> photometric distortion
-> normalise -> pad to the crop size around the centre (image 0, label ignore): the reference's pipeline
(``ssseg/configs/_base_/datasets/*``). Each transform takes and returns
``(image, label, generator)``: a uint8 ``(3, H, W)`` image (float after normalising), an int64 ``(H, W)``
label, and the ``torch.Generator`` that makes the sample's augmentation reproducible.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision import tv_tensors

from fcn_zoo.zoo import eval_resize_shape

from .data import IGNORE_INDEX


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """An integer in ``[low, high)``, as ``np.random.randint(low, high)``."""
    return int(torch.randint(low, high, (), generator=generator))


def _chance(generator: torch.Generator, p: float = 0.5) -> bool:
    return torch.rand((), generator=generator).item() < p


class Compose:
    def __init__(self, *transforms):
        self.transforms = transforms

    def __call__(self, image, label, generator):
        for t in self.transforms:
            image, label = t(image, label, generator)
        return image, label


class RandomResize:
    """Resize keeping the ratio to fit ``scale`` (long, short) times a random factor in ``ratio_range``."""

    def __init__(self, scale: tuple[int, int], ratio_range: tuple[float, float] = (0.5, 2.0)):
        self.scale, self.ratio_range = scale, ratio_range

    def __call__(self, image, label, generator):
        ratio = _uniform(generator, *self.ratio_range)
        target = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        size = list(eval_resize_shape(image.shape[-2], image.shape[-1], target))
        image = TF.resize(tv_tensors.Image(image), size, antialias=False)
        label = TF.resize(tv_tensors.Mask(label[None]), size)[0]  # masks resize with nearest
        return image.as_subclass(torch.Tensor), label.as_subclass(torch.Tensor)


class RandomCrop:
    """Random crop of ``size`` (h, w); retried up to 10 times while one class covers >= ``cat_max_ratio``."""

    def __init__(self, size: tuple[int, int], cat_max_ratio: float = 0.75, tries: int = 10):
        self.size, self.cat_max_ratio, self.tries = size, cat_max_ratio, tries

    def _box(self, h, w, generator):
        top = int(torch.randint(0, max(h - self.size[0], 0) + 1, (), generator=generator))
        left = int(torch.randint(0, max(w - self.size[1], 0) + 1, (), generator=generator))
        return top, left, min(self.size[0], h), min(self.size[1], w)

    def __call__(self, image, label, generator):
        h, w = label.shape
        box = self._box(h, w, generator)
        for _ in range(self.tries - 1):
            crop = label[box[0]:box[0] + box[2], box[1]:box[1] + box[3]]
            counts = torch.bincount(crop[crop != IGNORE_INDEX].flatten())
            if len(counts) > 1 and counts.max() < self.cat_max_ratio * counts.sum():
                break
            box = self._box(h, w, generator)
        top, left, ch, cw = box
        return image[:, top:top + ch, left:left + cw], label[top:top + ch, left:left + cw]


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, label, generator):
        if _chance(generator, self.p):
            return image.flip(-1), label.flip(-1)
        return image, label


class PhotoMetricDistortion:
    """The reference's photometric distortion, step for step on uint8 RGB: brightness + U(-32, 32), contrast
    x U(0.5, 1.5) before or after the colour steps, saturation x U(0.5, 1.5) on the S channel of OpenCV's
    HSV, hue + an integer in [-18, 18) in OpenCV's 0-180 hue units; each step with probability 1/2 and
    truncated to uint8 as the reference does (``convert``: float32, clip to 0..255, cast)."""

    def __init__(self, brightness: float = 32, contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue_delta: int = 18):
        self.brightness, self.contrast, self.saturation, self.hue_delta = brightness, contrast, saturation, hue_delta

    def __call__(self, image, label, generator):
        import cv2

        x = np.ascontiguousarray(image.permute(1, 2, 0).numpy())  # (H, W, 3) uint8 RGB
        if _apply(generator):
            x = _convert(x, beta=_uniform(generator, -self.brightness, self.brightness))
        contrast_first = _randint(generator, 0, 2) == 1
        if contrast_first and _apply(generator):
            x = _convert(x, alpha=_uniform(generator, *self.contrast))
        if _apply(generator):
            hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)
            hsv[..., 1] = _convert(hsv[..., 1], alpha=_uniform(generator, *self.saturation))
            x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if _apply(generator):
            hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)
            hsv[..., 0] = (hsv[..., 0].astype(int) + _randint(generator, -self.hue_delta, self.hue_delta)) % 180
            x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if not contrast_first and _apply(generator):
            x = _convert(x, alpha=_uniform(generator, *self.contrast))
        return torch.from_numpy(x).permute(2, 0, 1).contiguous(), label


def _apply(generator: torch.Generator) -> bool:
    """A step of the distortion happens when ``randint(2)`` draws 1, as in the reference."""
    return _randint(generator, 0, 2) == 1


def _convert(x: np.ndarray, alpha: float = 1, beta: float = 0) -> np.ndarray:
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


class Normalize:
    def __init__(self, mean, std):
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, image, label, generator):
        return (image.float() - self.mean) / self.std, label


class PadToSize:
    """Pad to ``size`` (h, w) around the centre, as the reference's ``Padding`` (image 0 after normalising,
    label ignore), whatever the image's orientation: every sample of a batch has the crop's shape. (The
    reference pads an image whose orientation differs from ``size``'s to the transposed size, which mixes
    two shapes in a batch under a non-square crop; for a square crop the two are the same.) The image is at
    most ``size`` on each side, as :class:`RandomCrop` leaves it."""

    def __init__(self, size: tuple[int, int]):
        self.size = size

    def __call__(self, image, label, generator):
        h, w = image.shape[-2:]
        out_h, out_w = self.size
        top, left = (out_h - h) // 2, (out_w - w) // 2
        pad = (left, out_w - w - left, top, out_h - h - top)
        if any(pad):
            image = F.pad(image, pad, value=0.0)
            label = F.pad(label, pad, value=IGNORE_INDEX)
        return image, label


def train_transforms(scale, crop_size, mean, std) -> Compose:
    """The reference train pipeline for a dataset whose resize bound is ``scale`` and crop ``crop_size``."""
    return Compose(
        RandomResize(scale, (0.5, 2.0)),
        RandomCrop(crop_size, cat_max_ratio=0.75),
        RandomHorizontalFlip(0.5),
        PhotoMetricDistortion(),
        Normalize(mean, std),
        PadToSize(crop_size),
    )
