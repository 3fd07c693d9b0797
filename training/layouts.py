"""The zoo's three datasets in their real on-disk layouts (``--data-root`` holds the dataset's top folder):

- VOC: ``VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, ImageSets/Segmentation/{trainaug,val}.txt}``
  (the reference layout, SBD labels converted into ``SegmentationClass`` by ``fcn-zoo prepare sbd``),
  or mmsegmentation's: ``SegmentationClassAug`` + ``ImageSets/Segmentation/{train,aug,val}.txt``;
- ADE20K: ``ADEChallengeData2016/{images,annotations}/{training,validation}``; label 0 is "other" and is
  ignored, label i becomes class i - 1 (reduce zero label);
- Cityscapes: ``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` and
  ``gtFine/{train,val}/<city>/*_gtFine_labelIds.png``; label ids map to the 19 train ids, the rest is ignored.

Each one's test split, images only (its labels are held by the benchmark's server): VOC
``ImageSets/Segmentation/test.txt`` + ``JPEGImages``, ADE20K ``release_test/testing/*.jpg``, Cityscapes
``leftImg8bit/test/<city>/*_leftImg8bit.png``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .data import IGNORE_INDEX, LAYOUTS, TEST_LAYOUTS, DatasetLayoutError, SegmentationDataset

# Cityscapes label id -> train id (the 19 evaluated classes); every other id is ignored
CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
    27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}


def zoo_dataset(dataset: str, root: str | Path, split: str, transforms=None, seed: int = 0) -> SegmentationDataset:
    """``dataset`` in voc / ade20k / cityscapes; ``split`` train, val (VOC's train is trainaug) or test (images
    without labels: each sample's label path is ``None``)."""
    builders = {"voc": _voc, "ade20k": _ade20k, "cityscapes": _cityscapes}
    if dataset not in builders:
        raise ValueError(f"unknown dataset {dataset!r}; use one of {', '.join(builders)}")
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}; use train, val or test")
    samples, lookup = builders[dataset](Path(root), split)
    expected = TEST_LAYOUTS[dataset] if split == "test" else LAYOUTS[dataset]
    if not samples:
        raise DatasetLayoutError(f"{root}: no {dataset} {split} samples found; expected {expected}")
    missing = [p for pair in samples for p in pair if p is not None and not p.is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DatasetLayoutError(f"{missing[0]}: missing{more}; expected {expected}")
    return SegmentationDataset(dataset, samples, lookup, transforms, seed)


def _voc(root: Path, split: str):
    base = root / "VOCdevkit" / "VOC2012"
    sets = base / "ImageSets" / "Segmentation"
    lookup = np.arange(256, dtype=np.uint8)  # VOC PNGs store class ids, 255 = ignore

    def pairs(ids_file: Path, label_dir: str):
        ids = _read_ids(ids_file, "voc")
        return [(base / "JPEGImages" / f"{i}.jpg", base / label_dir / f"{i}.png") for i in ids]

    if split == "test":
        return [(base / "JPEGImages" / f"{i}.jpg", None) for i in _read_ids(sets / "test.txt", "voc", TEST_LAYOUTS)], lookup
    if split == "val":
        return pairs(sets / "val.txt", "SegmentationClass"), lookup
    # told apart by the label folders: mmsegmentation's converter also writes a trainaug.txt, but its SBD
    # labels are in SegmentationClassAug, listed by aug.txt
    if (base / "SegmentationClassAug").is_dir() and (sets / "aug.txt").is_file():  # mmsegmentation's layout
        # its aug.txt is the whole train-aug set, VOC's train ids included: each id once (VOC's own label first),
        # 10,582 images as the reference's trainaug, not 12,046
        seen, samples = set(), []
        for image, label in pairs(sets / "train.txt", "SegmentationClass") + pairs(sets / "aug.txt", "SegmentationClassAug"):
            if image.stem not in seen:
                seen.add(image.stem)
                samples.append((image, label))
        return samples, lookup
    if (sets / "trainaug.txt").is_file():  # the reference layout: SBD labels converted into SegmentationClass
        return pairs(sets / "trainaug.txt", "SegmentationClass"), lookup
    raise DatasetLayoutError(f"{sets / 'trainaug.txt'}: missing (nor aug.txt + SegmentationClassAug); expected {LAYOUTS['voc']}")


def _ade20k(root: Path, split: str):
    base = root / "ADEChallengeData2016"
    lookup = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lookup[1:151] = np.arange(150)  # reduce zero label
    if split == "test":  # the challenge's release_test.zip, unpacked beside ADEChallengeData2016
        return [(p, None) for p in sorted((root / "release_test" / "testing").glob("*.jpg"))], lookup
    folder = {"train": "training", "val": "validation"}[split]
    images = sorted((base / "images" / folder).glob("*.jpg"))
    return [(p, base / "annotations" / folder / f"{p.stem}.png") for p in images], lookup


def _cityscapes(root: Path, split: str):
    images = sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
    lookup = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
        lookup[label_id] = train_id
    if split == "test":  # its gtFine/test files hold no labels
        return [(p, None) for p in images], lookup
    samples = [
        (p, root / "gtFine" / split / p.parent.name / p.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png"))
        for p in images
    ]
    return samples, lookup


def _read_ids(path: Path, dataset: str, layouts: dict = LAYOUTS) -> list[str]:
    if not path.is_file():
        raise DatasetLayoutError(f"{path}: missing; expected {layouts[dataset]}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]
