"""A Hugging Face dataset as training and evaluation data (the ``datasets`` extra: ``pip install 'fcn-zoo[datasets]'``).

    fcn-zoo train --init fcn_resnet50os16_voc --dataset-name segments/sidewalk-semantic --val-fraction 0.1 --output-dir runs/sidewalk
    fcn-zoo train --init fcn_resnet50os16_ade20k --dataset-name scene_parse_150 --revision refs/convert/parquet \\
        --reduce-labels --id2label ade20k-id2label.json --output-dir runs/ade
    fcn-zoo evaluate runs/sidewalk/best --dataset-name segments/sidewalk-semantic

``--dataset-name`` is a Hub dataset id, a local folder laid out as a dataset repo (parquet files under
``data/``, ``id2label.json`` at its root) or a ``save_to_disk`` folder; the last two load offline. A dataset
has one image column and one mask column (an ``Image`` feature holding one class index per pixel), found by
their usual names (``image``/``pixel_values``, ``label``/``annotation``/``mask``) unless named. Class names
come from ``--id2label``, ``--classes`` or the dataset's ``id2label.json``; colours from ``--classes``, else
the masks' own palette (palette PNGs), else the ``--init`` model's (the VOC colour map where its class count
differs).
``--reduce-labels`` ignores mask value 0 and moves every other value down by one, as transformers' does
(ADE20K's 0 is "other"); the class names then name the values after it. Without a validation split,
``--val-fraction`` holds out train rows chosen by their index.

Every row's mask is checked before training starts, as for a folder: its size against its image's, its
values against the classes, and that it is not a colour image; an error names the split and the row.
Under ``torchrun`` each process checks its share of the rows (and all stop on the first error any finds),
then reads only the rows its sampler hands it from the memory-mapped Arrow files, for training and
evaluation.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np

from fcn_zoo.errors import ImageError
from fcn_zoo.images import displayed_size

from .data import (IGNORE_INDEX, DatasetLayoutError, SegmentationDataset, TrainingData, class_pixels,
                   read_image_as, read_label, unit_hash)
from . import hubopen
from .distributed import shared_step

VAL_SPLITS = ("validation", "val", "valid")


class HubDataset(SegmentationDataset):
    """The rows ``rows`` of one split of a ``datasets.Dataset``: its image and mask columns, read undecoded
    (bytes or paths) and opened here, and the lookup of mask values to train ids."""

    def __init__(self, name: str, split: str, table, rows: list[int], columns: tuple[str, str], lookup: np.ndarray,
                 class_names: list[str], transforms=None, seed: int = 0, *, description: str | None = None,
                 reduce_labels: bool = False):
        super().__init__("hub", [], lookup, transforms, seed, class_names=class_names)
        self.dataset_name, self.split, self.rows, self.columns = name, split, rows, columns
        self.description = description or split  # the split, or "held out 0.1 of train"
        self.table = table
        # one view per column, so that reading a row's image does not read its mask too, nor the reverse
        self._by_column = {c: table.select_columns([c]) for c in columns}
        self._roots = hubopen.roots(name)  # where a path cell may point
        self.lookup_note = " after --reduce-labels" if reduce_labels else ""

    def __len__(self) -> int:
        return len(self.rows)

    def _cell(self, index: int, column: str) -> bytes | str:
        value = self._by_column[column][self.rows[index]][column]
        return hubopen.cell_source(value, f"{self.where(index)}: column {column!r}", self._roots)

    def image(self, index: int) -> np.ndarray:
        where = f"{self.where(index)}: column {self.columns[0]!r}"
        return read_image_as(self._cell(index, self.columns[0]), "hub", where)

    def raw_label(self, index: int) -> np.ndarray:
        where = f"{self.where(index)}: column {self.columns[1]!r}"
        return read_label(self._cell(index, self.columns[1]), "hub", where)

    def where(self, index: int) -> str:
        return f"{self.dataset_name} split {self.split!r} row {self.rows[index]}"

    def image_size(self, index: int) -> tuple[int, int]:
        where = f"{self.where(index)}: column {self.columns[0]!r}"
        try:  # the header only: the pixels are not decoded
            return displayed_size(self._cell(index, self.columns[0]), where)
        except ImageError as e:
            raise DatasetLayoutError(str(e)) from None

    def fingerprint(self, count: int | None = None) -> str:
        """sha256 of the dataset's fingerprint, the split and the rows taken: which rows an evaluation used
        (``count``: the first ``count`` of them only)."""
        text = f"{getattr(self.table, '_fingerprint', '')}\n{self.split}\n{','.join(map(str, self.rows[:count]))}"
        return hashlib.sha256(text.encode()).hexdigest()


def load(args: argparse.Namespace, progress: bool = False, seed: int = 0, shard: tuple[int, int] = (0, 1)) -> TrainingData:
    """Both splits of ``--dataset-name``, every row checked; what the run records about them. ``shard``:
    ``(rank, world size)`` under torchrun: each process opens the dataset and checks its share of the rows,
    and all of them stop on the first error any finds."""
    source, train, val = shared_step(lambda: _open(args, seed), shard[1])
    pixels, sizes = _check_shard(train, val, len(source.names), progress, shard)
    local = Path(source.name).exists()  # a folder: its basename names it (the card's metadata wants a Hub id)
    record = {
        "name": Path(source.name).resolve().name if local else source.name, "layout": "hub", "local_folder": local,
        "config": args.dataset_config, "revision": args.revision,
        "fingerprint": getattr(source.tables[train.split], "_fingerprint", None),
        "columns": {"image": source.columns[0], "label": source.columns[1]}, "reduce_labels": bool(args.reduce_labels),
        "train_split": train.split, "train_images": len(train), "val_images": len(val), "val_split": val.description,
        "train_sha256": train.fingerprint(), "val_sha256": val.fingerprint(),
    }
    return TrainingData("hub", train, val, source.names, source.palette, record, pixels, sizes)


def _open(args: argparse.Namespace, seed: int) -> tuple[_Source, HubDataset, HubDataset]:
    """The dataset, and its training and validation rows."""
    source = _Source(args)
    (train_split, train_rows), (val_split, val_rows, val_source) = source.splits(args.val_fraction)
    if args.max_train_samples is not None:
        if args.max_train_samples < 1:
            raise DatasetLayoutError(f"--max-train-samples must be at least 1, got {args.max_train_samples}")
        train_rows = train_rows[:args.max_train_samples]
    return source, source.dataset(train_split, train_rows, seed), source.dataset(val_split, val_rows, description=val_source)


def load_split(args: argparse.Namespace, split: str, val_fraction: float | None, inherited: float | None) -> HubDataset:
    """One side (``train`` or ``val``) of ``--dataset-name``, for an evaluation. ``val_fraction``: the share of
    train held out (given), ``inherited``: the one the model's training run held out (the default), both only
    where the dataset has no validation split."""
    source = _Source(args, evaluation=True)
    if split == "train" and source.train_split not in source.tables:
        raise DatasetLayoutError(f"{source.name}: no split {source.train_split!r} (it has {', '.join(source.tables)}); "
                                 "name one with --train-split")
    if source.train_split not in source.tables:  # a dataset of its validation split alone
        return source.dataset(source.reference, list(range(len(source.tables[source.reference]))),
                              description=source.reference)
    (train_split, train_rows), (val_split, val_rows, val_source) = source.splits(val_fraction, inherited)
    if split == "train":
        dataset = source.dataset(train_split, train_rows)
    else:
        dataset = source.dataset(val_split, val_rows, description=val_source)
    if not len(dataset):
        raise DatasetLayoutError(f"{source.name} split {dataset.split!r} has no rows")
    return dataset


class _Source:
    """The dataset ``--dataset-name`` names, opened: its splits, columns, classes and mask lookup."""

    def __init__(self, args: argparse.Namespace, evaluation: bool = False):
        """``evaluation``: for ``evaluate``, which needs no training split where a validation split is there,
        nor the masks' colours."""
        datasets = hubopen.import_datasets()
        self.name = args.dataset_name
        self.args = args
        self.tables = hubopen.open_dataset(datasets, args)
        self.train_split = args.train_split or "train"
        # the split whose columns are looked at: the training split, or for an evaluation without one, the val split
        self.reference = self.train_split
        if self.train_split not in self.tables and evaluation:
            self.reference = args.val_split or next((s for s in VAL_SPLITS if s in self.tables), self.train_split)
        if self.reference not in self.tables:
            raise DatasetLayoutError(f"{self.name}: no split {self.train_split!r} (it has {', '.join(self.tables)}); "
                                     "name one with --train-split")
        table = self.tables[self.reference]
        self.columns = hubopen.columns(table, args, f"{self.name} split {self.reference!r}")
        for split, other in self.tables.items():  # undecoded: bytes or paths, opened one by one
            missing = [c for c in self.columns if c not in other.column_names]
            if missing:
                continue  # a split without masks (a test split) is not used
            self.tables[split] = other.select_columns(list(self.columns)).cast_column(
                self.columns[0], datasets.Image(decode=False)).cast_column(self.columns[1], datasets.Image(decode=False))
        self.names, self.palette = hubopen.classes(args)
        if len(self.names) > IGNORE_INDEX:
            raise DatasetLayoutError(f"{self.name}: {len(self.names)} classes; masks hold 0..254 (255 = ignore)")
        if self.palette is None and not evaluation:  # class i is mask value i, or i + 1 under --reduce-labels
            self.palette = hubopen.mask_palette(self.tables[self.train_split], self.columns[1], len(self.names),
                                                 1 if args.reduce_labels else 0, f"{self.name} split {self.train_split!r}")
        self.lookup = reduce_labels_lookup() if args.reduce_labels else np.arange(256, dtype=np.uint8)

    def splits(self, val_fraction: float | None, inherited: float | None = None):
        """``(train split, rows)`` and ``(val split, rows, how val was chosen)``. ``val_fraction``: given on the
        command line; ``inherited``: the share the model's training run held out (an evaluation's default),
        taken only where the dataset has no validation split."""
        train_rows = list(range(len(self.tables[self.train_split])))
        labelled = [s for s in self.tables if self.columns[1] in self.tables[s].column_names]
        if self.args.val_split:
            named = self.args.val_split
            if named not in self.tables:
                raise DatasetLayoutError(f"{self.name}: no split {named!r} (it has {', '.join(self.tables)})")
            if named not in labelled:
                raise DatasetLayoutError(f"{self.name} split {named!r} has no column {self.columns[1]!r} (no masks); "
                                         "hold out part of train with --val-fraction 0.1 in place of --val-split")
            if val_fraction is not None:
                raise SystemExit(f"--val-split {named} and --val-fraction both choose the val rows; give one")
            if named == self.train_split:
                raise self._same_split("--val-split")
            return (self.train_split, train_rows), (named, list(range(len(self.tables[named]))), named)
        named = next((s for s in VAL_SPLITS if s in labelled and s != self.train_split), None)
        if named is not None:
            if val_fraction is not None:
                raise DatasetLayoutError(f"{self.name} has a validation split ({named!r}): drop --val-fraction, which "
                                         "holds out train rows only where there is none")
            return (self.train_split, train_rows), (named, list(range(len(self.tables[named]))), named)
        val_fraction = val_fraction if val_fraction is not None else inherited
        if val_fraction is None and self.train_split in VAL_SPLITS and self.train_split in labelled:
            raise self._same_split("the validation split")
        if val_fraction is None:
            unlabelled = [s for s in VAL_SPLITS if s in self.tables]
            why = f"its {unlabelled[0]!r} split has no masks" if unlabelled else "no validation split"
            raise DatasetLayoutError(f"{self.name}: {why} (it has {', '.join(self.tables)}); hold out part of train "
                                     "with --val-fraction 0.1, or name a split with --val-split")
        if not 0 < val_fraction < 1:
            raise DatasetLayoutError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
        if len(train_rows) < 2:
            raise DatasetLayoutError(f"{self.name} split {self.train_split!r}: {len(train_rows)} row; at least 2 are "
                                     "needed to hold some out for validation")
        # a row goes to val when the hash of its index is below the fraction (as the folder layout does by id)
        val = {i for i in train_rows if unit_hash(str(i)) < val_fraction} or {min(train_rows, key=lambda i: unit_hash(str(i)))}
        val.discard(max(train_rows, key=lambda i: unit_hash(str(i))))  # at least one row to train on
        return ((self.train_split, [i for i in train_rows if i not in val]),
                (self.train_split, sorted(val), f"held out {val_fraction:g} of {self.train_split}"))

    def _same_split(self, chosen: str) -> DatasetLayoutError:
        """A split chosen to train on and to validate on: its mIoU would be measured on the rows trained on."""
        split = self.train_split
        return DatasetLayoutError(f"{self.name}: split {split!r} is both the training split (--train-split) and {chosen}, "
                                  "so the mIoU would be measured on the rows trained on; name another with --val-split, "
                                  f"or hold out part of {split!r} with --val-fraction 0.1")

    def dataset(self, split: str, rows: list[int], seed: int = 0, description: str | None = None) -> HubDataset:
        return HubDataset(self.name, split, self.tables[split], rows, self.columns, self.lookup, self.names, None, seed,
                          description=description, reduce_labels=bool(self.args.reduce_labels))


def reduce_labels_lookup() -> np.ndarray:
    """Mask value -> train id under ``--reduce-labels``: 0 -> 255 (ignored), v -> v - 1, 255 stays ignored."""
    lookup = np.arange(256, dtype=np.int64) - 1
    lookup[0] = IGNORE_INDEX
    lookup[IGNORE_INDEX] = IGNORE_INDEX
    return lookup.astype(np.uint8)


def _check_shard(train: HubDataset, val: HubDataset, num_classes: int, progress: bool, shard: tuple[int, int]):
    """Check rows ``rank, rank + world, ...`` of both splits here and gather what every process found: the
    first error (raised by all), the training set's class pixels (summed) and image sizes (in row order)."""
    rank, world = shard

    def check():
        for dataset in (train, val):
            if not len(dataset):
                raise DatasetLayoutError(f"{dataset.dataset_name} split {dataset.split!r} has no rows")
        found = []
        pixels = class_pixels(train.checked_labels(range(rank, len(train), world), found, progress), num_classes)
        for _ in val.checked_labels(range(rank, len(val), world), [], progress):
            pass
        return pixels, list(zip(range(rank, len(train), world), found))

    shares = shared_step(check, world, gather=True)
    pixels = tuple(sum(p[i] for p, _ in shares) for i in range(2))
    return pixels, [size for _, size in sorted(s for _, part in shares for s in part)]


__all__ = ["HubDataset", "load", "load_split", "reduce_labels_lookup"]
