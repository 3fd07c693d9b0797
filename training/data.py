"""The three datasets in their real on-disk layouts.

``--data-root`` is the folder that holds the dataset's own top folder:

- VOC: ``VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, ImageSets/Segmentation/{trainaug,val}.txt}``
  (the reference layout, SBD labels converted into ``SegmentationClass`` by ``fcn-zoo prepare sbd``),
  or mmsegmentation's: ``SegmentationClassAug`` + ``ImageSets/Segmentation/{train,aug,val}.txt``;
- ADE20K: ``ADEChallengeData2016/{images,annotations}/{training,validation}``; label 0 is "other" and is
  ignored, label i becomes class i - 1 (reduce zero label);
- Cityscapes: ``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` and
  ``gtFine/{train,val}/<city>/*_gtFine_labelIds.png``; label ids map to the 19 train ids, the rest is ignored;
- generic (your own classes): ``classes.txt``, ``images/{train,val}/<id>.jpg``, ``masks/{train,val}/<id>.png``
  (see :mod:`training.generic`).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IGNORE_INDEX = 255

# Cityscapes label id -> train id (the 19 evaluated classes); every other id is ignored
CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
    27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}

LAYOUTS = {
    "voc": "VOCdevkit/VOC2012/{JPEGImages/<id>.jpg, SegmentationClass/<id>.png, ImageSets/Segmentation/<split>.txt} "
    "(or mmsegmentation's SegmentationClassAug with train.txt + aug.txt)",
    "ade20k": "ADEChallengeData2016/{images,annotations}/{training,validation}/<id>.{jpg,png}",
    "cityscapes": "leftImg8bit/<split>/<city>/<id>_leftImg8bit.png and gtFine/<split>/<city>/<id>_gtFine_labelIds.png",
    "generic": "DATA/classes.txt, DATA/images/{train,val}/<id>.jpg|png and DATA/masks/{train,val}/<id>.png",
}
# the folder under --data-root that tells each layout
MARKERS = {"generic": "classes.txt", "voc": "VOCdevkit", "ade20k": "ADEChallengeData2016", "cityscapes": "leftImg8bit"}


class DatasetLayoutError(FileNotFoundError):
    """A file the dataset layout needs is missing or unreadable."""


class SegmentationDataset(torch.utils.data.Dataset):
    """Pairs of (image, label map) files, a lookup table from stored label values to train ids, and transforms.

    ``transforms(image, label, generator)`` receives a uint8 ``(3, H, W)`` tensor, an int64 ``(H, W)``
    tensor and a ``torch.Generator`` seeded from (seed, epoch, index): the augmentation of a sample is the
    same whichever worker loads it and whether or not training was resumed.
    """

    def __init__(self, name: str, samples: list[tuple[Path, Path]], lookup: np.ndarray, transforms=None, seed: int = 0,
                 *, class_names: list[str] | None = None, ids: list[str] | None = None):
        from fcn_zoo.zoo import DATASETS

        known = DATASETS.get(name)
        self.name = name
        self.class_names = list(class_names) if class_names is not None else list(known.classes)
        self.num_classes = len(self.class_names)
        self.eval_size = known.eval_size if known else None  # None: the model's own
        self.samples = samples
        self.ids = ids
        self.lookup = lookup
        # stored values that map to no class and are not ignored (only an identity lookup, VOC's, has any)
        self.invalid = (lookup >= self.num_classes) & (lookup != IGNORE_INDEX)
        self.transforms = transforms
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int | tuple[int, int]):
        """Sample ``index``; ``(epoch, index)`` names the epoch too (what loader processes that live for the
        whole run are handed: their copy of the dataset never sees :meth:`set_epoch`)."""
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)
        image_path, label_path = self.samples[index]
        image = torch.from_numpy(np.array(_open(image_path, "RGB", self.name))).permute(2, 0, 1).contiguous()
        label = torch.from_numpy(self.label(index).astype(np.int64))
        if label.shape != image.shape[1:]:
            raise DatasetLayoutError(f"{label_path}: label is {tuple(label.shape)}, image is {tuple(image.shape[1:])}")
        if self.transforms is not None:
            generator = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/{epoch}/{index}".encode()))
            image, label = self.transforms(image, label, generator)
        return image, label

    def label(self, index: int) -> np.ndarray:
        """The train ids of sample ``index`` as a uint8 ``(H, W)`` array (255 = ignore), without its image."""
        label_path = self.samples[index][1]
        raw = read_label(label_path, self.name)
        invalid = self.invalid[raw]
        if invalid.any():
            bad = np.unique(self.lookup[raw][invalid])
            raise DatasetLayoutError(
                f"{label_path}: label values {bad.tolist()[:5]} are outside the {self.num_classes} classes "
                f"(0..{self.num_classes - 1}, {IGNORE_INDEX} = ignore)"
            )
        return self.lookup[raw]

    def fingerprint(self) -> str:
        """sha256 of the list of (image, label) file names (of the sorted ids in the generic layout): which
        files an evaluation used."""
        import hashlib

        if self.ids is not None:
            text = "\n".join(sorted(self.ids))
        else:
            text = "\n".join(f"{i.name} {label.name}" for i, label in self.samples)
        return hashlib.sha256(text.encode()).hexdigest()

    def class_pixels(self) -> tuple[np.ndarray, np.ndarray]:
        """:func:`class_pixels` of every label of the dataset."""
        return class_pixels((self.label(i) for i in range(len(self))), self.num_classes)


def class_pixels(labels, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class: its pixels in ``labels`` (uint8 maps of train ids), and the (non-ignored) pixels of the
    maps where it occurs: what median frequency balancing needs."""
    pixels = np.zeros(num_classes, dtype=np.int64)
    image_pixels = np.zeros(num_classes, dtype=np.int64)
    for label in labels:
        counts = np.bincount(label.ravel(), minlength=256)[:num_classes]
        pixels += counts
        image_pixels[counts > 0] += counts.sum()
    return pixels, image_pixels


def read_label(path: Path, dataset: str, *, index_modes: tuple[str, ...] | None = None) -> np.ndarray:
    """A label PNG as a uint8 ``(H, W)`` array of its stored values; 16-bit PNGs must hold 0..255.
    ``index_modes``: the PIL modes accepted (a colour PNG is then an error saying to convert it)."""
    image = _open(path, None, dataset)
    if index_modes is not None and image.mode not in index_modes:
        raise DatasetLayoutError(
            f"{path}: a mask holds one class index per pixel (an 8-bit grey or palette PNG), got mode {image.mode}; "
            "convert colours to class indices"
        )
    raw = np.array(image)
    if raw.ndim != 2:
        raise DatasetLayoutError(f"{path}: a label map must have one channel, got shape {raw.shape}")
    if raw.dtype != np.uint8:  # 16-bit or 32-bit PNGs: the values must still be 0..255
        if raw.size and (raw.min() < 0 or raw.max() > 255):
            raise DatasetLayoutError(f"{path}: label values must be 0..255, found {raw.min()}..{raw.max()}")
        raw = raw.astype(np.uint8)
    return raw


def detect_layout(root: str | Path) -> str:
    """Which layout ``root`` holds: generic, voc, ade20k or cityscapes."""
    root = Path(root)
    for layout, marker in MARKERS.items():
        if (root / marker).exists():
            return layout
    if not root.is_dir():
        raise DatasetLayoutError(f"{root}: no such folder")
    expected = "; ".join(f"{k}: {v}" for k, v in LAYOUTS.items())
    raise DatasetLayoutError(f"{root}: holds none of the dataset layouts; expected one of {expected}")


def build_dataset(dataset: str, root: str | Path, split: str, transforms=None, seed: int = 0,
                  *, val_fraction: float | None = None) -> SegmentationDataset:
    """``dataset`` in generic / voc / ade20k / cityscapes; ``split`` train or val (VOC's train is trainaug).

    ``val_fraction``: the generic layout without ``images/val`` holds out this share of the images."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if dataset == "generic":
        from .generic import read_classes, splits

        return generic_dataset(splits(root, val_fraction)[split == "val"], read_classes(root).names, transforms, seed)
    builders = {"voc": _voc, "ade20k": _ade20k, "cityscapes": _cityscapes}
    if dataset not in builders:
        raise ValueError(f"unknown dataset {dataset!r}; use one of {', '.join(builders)}")
    samples, lookup = builders[dataset](Path(root), split)
    if not samples:
        raise DatasetLayoutError(f"{root}: no {dataset} {split} samples found; expected {LAYOUTS[dataset]}")
    missing = [p for pair in samples for p in pair if not p.is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DatasetLayoutError(f"{missing[0]}: missing{more}; expected {LAYOUTS[dataset]}")
    return SegmentationDataset(dataset, samples, lookup, transforms, seed)


def generic_dataset(samples: list[tuple[str, Path, Path]], class_names: list[str], transforms=None, seed: int = 0) -> SegmentationDataset:
    """The generic layout's ``(id, image, mask)`` samples (:func:`training.generic.splits`) as a dataset."""
    return SegmentationDataset(
        "generic", [(image, mask) for _, image, mask in samples], np.arange(256, dtype=np.uint8), transforms, seed,
        class_names=class_names, ids=[i for i, _, _ in samples],
    )


def _voc(root: Path, split: str):
    base = root / "VOCdevkit" / "VOC2012"
    sets = base / "ImageSets" / "Segmentation"
    lookup = np.arange(256, dtype=np.uint8)  # VOC PNGs store class ids, 255 = ignore

    def pairs(ids_file: Path, label_dir: str):
        ids = _read_ids(ids_file, "voc")
        return [(base / "JPEGImages" / f"{i}.jpg", base / label_dir / f"{i}.png") for i in ids]

    if split == "val":
        return pairs(sets / "val.txt", "SegmentationClass"), lookup
    # told apart by the label folders: mmsegmentation's converter also writes a trainaug.txt, but its SBD
    # labels are in SegmentationClassAug, listed by aug.txt
    if (base / "SegmentationClassAug").is_dir() and (sets / "aug.txt").is_file():  # mmsegmentation's layout
        return pairs(sets / "train.txt", "SegmentationClass") + pairs(sets / "aug.txt", "SegmentationClassAug"), lookup
    if (sets / "trainaug.txt").is_file():  # the reference layout: SBD labels converted into SegmentationClass
        return pairs(sets / "trainaug.txt", "SegmentationClass"), lookup
    raise DatasetLayoutError(f"{sets / 'trainaug.txt'}: missing (nor aug.txt + SegmentationClassAug); expected {LAYOUTS['voc']}")


def _ade20k(root: Path, split: str):
    base = root / "ADEChallengeData2016"
    folder = {"train": "training", "val": "validation"}[split]
    images = sorted((base / "images" / folder).glob("*.jpg"))
    lookup = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lookup[1:151] = np.arange(150)  # reduce zero label
    return [(p, base / "annotations" / folder / f"{p.stem}.png") for p in images], lookup


def _cityscapes(root: Path, split: str):
    images = sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
    lookup = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
        lookup[label_id] = train_id
    samples = [
        (p, root / "gtFine" / split / p.parent.name / p.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png"))
        for p in images
    ]
    return samples, lookup


def _read_ids(path: Path, dataset: str) -> list[str]:
    if not path.is_file():
        raise DatasetLayoutError(f"{path}: missing; expected {LAYOUTS[dataset]}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _open(path: Path, mode: str | None, dataset: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert(mode) if mode and img.mode != mode else img
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetLayoutError(f"{path}: unreadable ({e}); expected {LAYOUTS[dataset]}") from e


class RunSampler(torch.utils.data.Sampler):
    """The ``(epoch, index)`` keys of every sample the rest of a run draws, from iteration ``start`` to ``stop``,
    ``per_step`` per iteration: in each epoch the permutation of ``sampler`` (a ``DistributedSampler``, set to
    the epoch), repeated to fill the epoch's iterations as the reference's padded sampler does, and cut where
    a resumed run starts. One loader iterates it for the whole run, so its processes start once."""

    def __init__(self, sampler, start: int, stop: int, iters_per_epoch: int, per_step: int):
        self.sampler, self.start, self.stop = sampler, start, stop
        self.iters_per_epoch, self.per_step = iters_per_epoch, per_step

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.per_step

    def __iter__(self):
        it = self.start
        while it < self.stop:
            epoch, step = divmod(it, self.iters_per_epoch)
            self.sampler.set_epoch(epoch)
            indices = list(self.sampler)
            needed = self.iters_per_epoch * self.per_step
            indices = indices * -(-needed // len(indices))
            end = min(self.iters_per_epoch, step + self.stop - it)
            yield from ((epoch, i) for i in indices[step * self.per_step:end * self.per_step])
            it = epoch * self.iters_per_epoch + end
