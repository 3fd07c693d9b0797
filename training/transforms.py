"""The reference training pipeline, on image and label together.

ratio-range resize -> random crop (no class over 75% of it) -> horizontal flip -> photometric distortion
-> normalise -> pad to the crop size (image 0, label ignore). Each transform takes and returns
``(image, label, generator)``: a uint8 ``(3, H, W)`` image (float after normalising), an int64 ``(H, W)``
label, and the ``torch.Generator`` that makes the sample's augmentation reproducible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision import tv_tensors

from fcn_zoo.predict import eval_resize_shape

from .data import IGNORE_INDEX


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


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
    """Brightness +-32 (added), contrast x[0.5, 1.5] (multiplied), saturation x[0.5, 1.5], hue +-18 (in
    OpenCV's 0-180 hue units, so +-36 degrees), each with probability 0.5, contrast before or after the
    colour changes at random: mmsegmentation's order. Saturation and hue use torchvision's operators."""

    def __init__(self, brightness: float = 32, contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue_delta: float = 18):
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue_delta / 180

    def __call__(self, image, label, generator):
        x = image.float()
        if _chance(generator):
            x = x + _uniform(generator, -self.brightness, self.brightness)
        contrast_first = _chance(generator)
        if contrast_first and _chance(generator):
            x = x * _uniform(generator, *self.contrast)
        x = x.clamp(0, 255)
        if _chance(generator):
            x = TF.adjust_saturation(x / 255, _uniform(generator, *self.saturation)) * 255
        if _chance(generator):
            x = TF.adjust_hue(x / 255, _uniform(generator, -self.hue, self.hue)) * 255
        if not contrast_first and _chance(generator):
            x = x * _uniform(generator, *self.contrast)
        return x.clamp(0, 255).round().to(torch.uint8), label


class Normalize:
    def __init__(self, mean, std):
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, image, label, generator):
        return (image.float() - self.mean) / self.std, label


class PadToSize:
    """Pad bottom/right to ``size`` (h, w): image with 0, label with the ignore index."""

    def __init__(self, size: tuple[int, int]):
        self.size = size

    def __call__(self, image, label, generator):
        ph, pw = max(self.size[0] - image.shape[-2], 0), max(self.size[1] - image.shape[-1], 0)
        if ph or pw:
            image = F.pad(image, (0, pw, 0, ph), value=0.0)
            label = F.pad(label, (0, pw, 0, ph), value=IGNORE_INDEX)
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
