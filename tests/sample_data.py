"""Tiny datasets in the real on-disk layouts, generated: shapes on textured backgrounds.

Class k (1..3) is always drawn in the same colour family, so a small network can learn it quickly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import fcn_zoo

COLOURS = {1: (200, 40, 40), 2: (40, 200, 40), 3: (40, 40, 200)}


def shapes_sample(rng: np.random.Generator, size=(64, 80), classes=(1, 2, 3)):
    """An RGB uint8 image and its label map (0 = background)."""
    h, w = size
    image = rng.integers(90, 160, (h, w, 3), dtype=np.uint8)  # textured background
    image = Image.fromarray(image)
    label = Image.new("L", (w, h), 0)
    draw_i, draw_l = ImageDraw.Draw(image), ImageDraw.Draw(label)
    for k in rng.choice(classes, size=rng.integers(1, len(classes) + 1), replace=False):
        bh, bw = rng.integers(h // 3, 2 * h // 3), rng.integers(w // 3, 2 * w // 3)
        top, left = rng.integers(0, h - bh), rng.integers(0, w - bw)
        box = [int(left), int(top), int(left + bw), int(top + bh)]
        colour = tuple(int(c + rng.integers(-25, 25)) for c in COLOURS[int(k)])
        if k == 2:
            draw_i.ellipse(box, fill=colour)
            draw_l.ellipse(box, fill=int(k))
        else:
            draw_i.rectangle(box, fill=colour)
            draw_l.rectangle(box, fill=int(k))
    return np.asarray(image), np.asarray(label)


def _palette_png(label: np.ndarray, path: Path) -> None:
    img = Image.fromarray(label.astype(np.uint8), mode="P")
    img.putpalette([c for rgb in fcn_zoo.DATASETS["voc"].palette for c in rgb] + [224, 224, 192] * 235)
    img.save(path)


def make_voc(root: Path, n_train: int = 8, n_val: int = 4, size=(64, 80), layout: str = "reference", seed: int = 0,
             n_test: int = 0) -> Path:
    """``n_test``: test images too (VOC2012test.tar's: JPEGImages listed by test.txt, no labels)."""
    rng = np.random.default_rng(seed)
    base = root / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (base / d).mkdir(parents=True, exist_ok=True)
    ids = [f"2007_{i:06d}" for i in range(n_train + n_val)]
    train, val = ids[:n_train], ids[n_train:]
    for n, i in enumerate(ids):
        image, label = shapes_sample(rng, size)
        label = label.copy()
        label[0, :] = 255  # VOC's ignored borders
        Image.fromarray(image).save(base / "JPEGImages" / f"{i}.jpg", quality=95)
        aug = layout == "mmseg" and i in train and n % 2 == 1
        _palette_png(label, base / ("SegmentationClassAug" if aug else "SegmentationClass") / f"{i}.png")
    sets = base / "ImageSets" / "Segmentation"
    (sets / "val.txt").write_text("\n".join(val) + "\n")
    if layout == "reference":
        (sets / "trainaug.txt").write_text("\n".join(train) + "\n")
    else:
        (sets / "train.txt").write_text("\n".join(train[0::2]) + "\n")
        (sets / "aug.txt").write_text("\n".join(train[1::2]) + "\n")
        (sets / "trainaug.txt").write_text("\n".join(train) + "\n")  # mmsegmentation's converter writes it too
    test = [f"2008_{i:06d}" for i in range(n_test)]
    for i in test:
        Image.fromarray(shapes_sample(rng, size)[0]).save(base / "JPEGImages" / f"{i}.jpg", quality=95)
    if test:
        (sets / "test.txt").write_text("\n".join(test) + "\n")
    return root


def make_ade20k(root: Path, n_train: int = 8, n_val: int = 4, size=(64, 80), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    base = root / "ADEChallengeData2016"
    for split, n in (("training", n_train), ("validation", n_val)):
        (base / "images" / split).mkdir(parents=True, exist_ok=True)
        (base / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image, label = shapes_sample(rng, size)
            # ADE20K stores 0 = "other" (ignored) and classes 1..150: wall=1, building=2, sky=3, ...
            Image.fromarray(image).save(base / "images" / split / f"ADE_{split}_{i:08d}.jpg", quality=95)
            Image.fromarray(label.astype(np.uint8)).save(base / "annotations" / split / f"ADE_{split}_{i:08d}.png")
    return root


def make_cityscapes(root: Path, n_train: int = 8, n_val: int = 4, size=(64, 128), seed: int = 0, n_test: int = 0) -> Path:
    """``n_test``: test images too (leftImg8bit/test, no gtFine labels)."""
    rng = np.random.default_rng(seed)
    to_label_id = np.array([7, 26, 24, 11], dtype=np.uint8)  # road, car, person, building
    for split, n, city in (("train", n_train, "aachen"), ("val", n_val, "frankfurt"), ("test", n_test, "berlin")):
        (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image, label = shapes_sample(rng, size)
            stem = f"{city}_{i:06d}_000019"
            Image.fromarray(image).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            if split != "test":
                label_ids = to_label_id[label]
                label_ids[-4:, :] = 1  # ego vehicle: void
                (root / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
                Image.fromarray(label_ids).save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
    return root


def make_generic(root: Path, n_train: int = 8, n_val: int = 4, size=(64, 80), seed: int = 0, val: bool = True,
                 colours: bool = True, nested: bool = False) -> Path:
    """The generic layout: classes.txt (background, box, ellipse), images/{train,val}/*.jpg, masks/{train,val}/*.png.

    ``val=False``: everything under images/train (for --val-fraction); ``nested``: ids in sub-folders."""
    rng = np.random.default_rng(seed)
    lines = ["background 0 0 0", "box 200 40 40", "ellipse 40 200 40"] if colours else ["background", "box", "ellipse"]
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(lines) + "\n")
    for n in range(n_train + n_val):
        split = "train" if n < n_train or not val else "val"
        name = f"{'a' if n % 2 else 'b'}/{n:04d}" if nested else f"{n:04d}"
        image, label = shapes_sample(rng, size, classes=(1, 2))
        for kind, suffix in (("images", ".jpg"), ("masks", ".png")):
            (root / kind / split / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "images" / split / f"{name}.jpg", quality=95)
        Image.fromarray(label.astype(np.uint8), mode="L").save(root / "masks" / split / f"{name}.png")
    return root


HUB_CLASSES = ["background", "box", "ellipse"]


def hub_rows(n: int, size=(64, 80), seed: int = 0, shift: int = 0) -> tuple[list[Image.Image], list[Image.Image]]:
    """``n`` generated images and their masks as PIL images (mask value = class + ``shift``)."""
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for _ in range(n):
        image, label = shapes_sample(rng, size, classes=(1, 2))
        images.append(Image.fromarray(image))
        masks.append(Image.fromarray((label.astype(np.uint8) + shift), mode="L"))
    return images, masks


def make_hub_dataset(root: Path, splits: dict[str, int], *, columns=("image", "label"), form: str = "parquet",
                     id2label: list[str] | None = HUB_CLASSES, size=(64, 80), seed: int = 0, shift: int = 0,
                     masks: dict[str, list[Image.Image]] | None = None, palette: list[int] | None = None) -> Path:
    """A Hugging Face dataset on disk: ``form="parquet"`` lays it out as a dataset repo (``data/<split>-00000-of-00001.parquet``
    and ``id2label.json`` at its root), ``form="disk"`` writes it with ``save_to_disk``. ``splits``: rows per
    split; ``shift`` adds to every mask value (1 for a dataset whose 0 is "other", for --reduce-labels);
    ``masks``: masks to use in place of the generated ones, per split (the same count); ``palette``: the
    generated masks are palette PNGs with these colours (a flat list R, G, B, ...)."""
    import json

    import datasets

    features = datasets.Features({columns[0]: datasets.Image(), columns[1]: datasets.Image()})
    tables = {}
    for number, (split, n) in enumerate(splits.items()):
        images, generated = hub_rows(n, size, seed + number, shift)
        if palette is not None:
            generated = [m.convert("P") for m in generated]
            for m in generated:
                m.putpalette(palette)
        tables[split] = datasets.Dataset.from_dict(
            {columns[0]: images, columns[1]: (masks or {}).get(split, generated)}, features=features)
    root.mkdir(parents=True, exist_ok=True)
    if form == "disk":
        datasets.DatasetDict(tables).save_to_disk(str(root))
    else:
        (root / "data").mkdir(exist_ok=True)
        for split, table in tables.items():
            table.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    if id2label is not None:
        (root / "id2label.json").write_text(json.dumps({str(i): name for i, name in enumerate(id2label)}))
    return root
