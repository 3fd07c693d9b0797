"""Your own data in one simple layout, checked in full before training starts.

    DATA/classes.txt                  one class name per line, in index order ("name" or "name R G B")
    DATA/images/{train,val}/<id>.jpg  (or .png, .jpeg, .bmp, .tif, .webp; ids may sit in sub-folders)
    DATA/masks/{train,val}/<id>.png   one class index per pixel (mode L or P), 255 = ignore
    DATA/images/test/<id>.jpg         optional: images without masks (fcn-zoo evaluate --split test --format-only)

Without ``images/val`` (or with images directly under ``images/``) a deterministic fraction of the
images is held out for validation: an image's side of the split depends on its id only, so adding
images never moves the others.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .data import (LAYOUTS, TEST_LAYOUTS, Classes, DatasetLayoutError, SegmentationDataset, TrainingData, class_pixels,
                   read_classes_file, unit_hash)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
LAYOUT = LAYOUTS["generic"]


def read_classes(root: str | Path) -> Classes:
    """``classes.txt``: a name per line in index order, optionally followed by its colour ``R G B``."""
    path = Path(root) / "classes.txt"
    if not path.is_file():
        raise DatasetLayoutError(f"{path}: missing; write one class name per line, in index order ({LAYOUT})")
    return read_classes_file(path)


def pairs(root: str | Path, split: str | None) -> list[tuple[str, Path, Path | None]]:
    """``(id, image, mask)`` for every image under ``images/<split>`` (``images/`` when ``split`` is None).

    An image without its mask, or a mask without its image, is an error naming it; the ``test`` split's images
    have none (``mask`` is ``None``)."""
    root = Path(root)
    images_dir = root / "images" / split if split else root / "images"
    masks_dir = root / "masks" / split if split else root / "masks"
    expected = TEST_LAYOUTS["generic"] if split == "test" else LAYOUT
    if not images_dir.is_dir():
        raise DatasetLayoutError(f"{images_dir}: missing; expected {expected}")
    images = _by_id([p for p in _files(images_dir, IMAGE_SUFFIXES)  # images/ alone: its test/ has no masks
                     if split or p.relative_to(images_dir).parts[0] != "test"], images_dir, "image")
    if split == "test":
        if not images:
            raise DatasetLayoutError(f"{images_dir}: no images (.jpg, .png, ...) in the test split; expected {expected}")
        return [(i, images[i], None) for i in sorted(images)]
    masks = _by_id(_files(masks_dir, {".png"}), masks_dir, "mask") if masks_dir.is_dir() else {}
    lone_images = sorted(set(images) - set(masks))
    if lone_images:
        raise DatasetLayoutError(_missing(images[lone_images[0]], masks_dir / f"{lone_images[0]}.png", "mask", len(lone_images)))
    lone_masks = sorted(set(masks) - set(images))
    if lone_masks:
        raise DatasetLayoutError(_missing(masks[lone_masks[0]], images_dir / f"{lone_masks[0]}.jpg", "image", len(lone_masks)))
    if not images:
        raise DatasetLayoutError(f"{images_dir}: no images (.jpg, .png, ...) in the {split or 'images'} split; expected {LAYOUT}")
    return [(i, images[i], masks[i]) for i in sorted(images)]


def splits(root: str | Path, val_fraction: float | None) -> tuple[list, list, str]:
    """The train and val ``(id, image, mask)`` lists, and how val was chosen (``"images/val"`` or ``"held out 0.1"``).

    ``val_fraction`` holds out that share of the train images when there is no ``images/val``; it is an
    error to give it when there is one."""
    root = Path(root)
    has_train = (root / "images" / "train").is_dir()
    has_val = (root / "images" / "val").is_dir()
    if has_val and val_fraction is not None:
        raise DatasetLayoutError(f"{root / 'images' / 'val'}: a val split exists; drop --val-fraction or move it away")
    if has_val:
        return pairs(root, "train"), pairs(root, "val"), "images/val"
    if val_fraction is None:
        raise DatasetLayoutError(
            f"{root / 'images' / 'val'}: missing; add a val split, or hold out part of the train images with --val-fraction 0.1"
        )
    if not 0 < val_fraction < 1:
        raise DatasetLayoutError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    pool = pairs(root, "train" if has_train else None)
    if len(pool) < 2:
        raise DatasetLayoutError(f"{root / 'images'}: {len(pool)} image; at least 2 are needed to hold some out for validation")
    # an id goes to val when its hash, read as a number in [0, 1), is below the fraction: the share is
    # val_fraction on average, and an image's side never depends on the other images
    ranked = sorted(pool, key=lambda sample: unit_hash(sample[0]))
    val = {i for i, _, _ in ranked if unit_hash(i) < val_fraction} or {ranked[0][0]}
    val.discard(ranked[-1][0])  # at least one image to train on
    return [s for s in pool if s[0] not in val], [s for s in pool if s[0] in val], f"held out {val_fraction:g}"


def load(root: str | Path, val_fraction: float | None, progress: bool = False, seed: int = 0) -> TrainingData:
    """Your folder as a fine-tuning run's data: the classes, both splits, every image and mask checked before
    training starts (:meth:`SegmentationDataset.checked_labels`: sizes as displayed, values in the classes)."""
    root = Path(root)
    classes = read_classes(root)
    train_pairs, val_pairs, val_source = splits(root, val_fraction)
    train, val = generic_dataset(train_pairs, classes.names, None, seed), generic_dataset(val_pairs, classes.names)
    sizes: list[tuple[int, int]] = []
    pixels = class_pixels(train.checked_labels(range(len(train)), sizes, progress), len(classes.names))
    for _ in val.checked_labels(range(len(val)), [], progress):
        pass
    record = {
        "name": root.resolve().name, "layout": "generic", "train_images": len(train), "val_images": len(val),
        "val_split": val_source, "train_sha256": train.fingerprint(), "val_sha256": val.fingerprint(),  # of the sorted id lists
    }
    return TrainingData("generic", train, val, classes.names, classes.palette, record, pixels, sizes)


def generic_dataset(samples: list[tuple[str, Path, Path]], class_names: list[str], transforms=None, seed: int = 0) -> SegmentationDataset:
    """The generic layout's ``(id, image, mask)`` samples (:func:`splits`) as a dataset."""
    dataset = SegmentationDataset(
        "generic", [(image, mask) for _, image, mask in samples], np.arange(256, dtype=np.uint8), transforms, seed,
        class_names=class_names, ids=[i for i, _, _ in samples],
    )
    dataset.classes_note = " of classes.txt"
    return dataset


def _files(folder: Path, suffixes: set[str]) -> list[Path]:
    found = []
    for path in sorted(folder.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if path.is_file() and path.suffix.lower() in suffixes:
            found.append(path)
    return found


def _by_id(paths: list[Path], folder: Path, what: str) -> dict[str, Path]:
    """``paths`` by their id; two files of one id (``0001.jpg`` and ``0001.png``) are an error naming both."""
    found: dict[str, Path] = {}
    for path in paths:
        key = _id(path, folder)
        if key in found:
            raise DatasetLayoutError(f"{found[key]} and {path}: two {what}s of one id {key!r}; keep one of them")
        found[key] = path
    return found


def _id(path: Path, folder: Path) -> str:
    return path.relative_to(folder).with_suffix("").as_posix()


def _missing(have: Path, expected: Path, what: str, count: int) -> str:
    more = f" ({count - 1} more like it)" if count > 1 else ""
    return f"{have}: has no {what} (expected {expected}){more}"
