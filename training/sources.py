"""Which source a command's data comes from: ``--data-root`` (the zoo's layouts or your folder, told apart
by what the folder holds) or ``--dataset-name`` (a Hugging Face dataset). Each source is its own module
(:mod:`training.layouts`, :mod:`training.generic`, :mod:`training.hubdata`); this one only picks."""

from __future__ import annotations

import argparse
from pathlib import Path

import fcn_zoo

from .data import LAYOUTS, DatasetLayoutError, SegmentationDataset, TrainingData

# the folders under --data-root that tell each layout (release_test: ADE20K's test images, unpacked alone)
MARKERS = (("generic", "classes.txt"), ("voc", "VOCdevkit"), ("ade20k", "ADEChallengeData2016"), ("ade20k", "release_test"),
           ("cityscapes", "leftImg8bit"))
# the --dataset-name options, in the order --help lists them: what fine-tuning and evaluation share
HUB_OPTIONS = ("dataset_config", "revision", "image_column", "label_column", "id2label", "classes", "reduce_labels",
               "train_split", "val_split", "max_train_samples")


def add_hub_arguments(parser: argparse.ArgumentParser, evaluation: bool = False) -> None:
    """``--dataset-name`` and its options (``training.hubdata``)."""
    hub = parser.add_argument_group("a Hugging Face dataset (pip install 'fcn-zoo[datasets]')")
    hub.add_argument("--dataset-name", metavar="ID|FOLDER",
                     help="a Hub dataset id, a local folder laid out as a dataset repo (parquet files under data/), "
                     "or a save_to_disk folder: in place of --data-root")
    hub.add_argument("--dataset-config", help="the dataset's configuration (subset), if it has several")
    hub.add_argument("--revision", help="a branch, tag or commit of a Hub dataset (script datasets: refs/convert/parquet)")
    hub.add_argument("--image-column", help="default: the first of image, pixel_values, img")
    hub.add_argument("--label-column", help="default: the first of label, annotation, mask, semantic_segmentation")
    hub.add_argument("--id2label", metavar="FILE", help="class names as JSON {\"0\": \"name\", ...} (default: the dataset's id2label.json)")
    hub.add_argument("--classes", metavar="FILE", help="class names (and colours) in the classes.txt format, in place of id2label")
    hub.add_argument("--reduce-labels", action="store_true", help="mask value 0 is ignored and every other value moves down by one")
    if evaluation:  # evaluate.inherit_training_splits
        hub.add_argument("--train-split", help="default: the one the model's training run used on this dataset, else train")
        hub.add_argument("--val-split", help="default: the one the model's training run validated on with this dataset, "
                         "else the first of validation, val, valid (else --val-fraction holds part of train out)")
    else:
        hub.add_argument("--train-split", help="default: train")
        hub.add_argument("--val-split", help="default: the first of validation, val, valid (else --val-fraction holds part of train out)")
    if not evaluation:
        hub.add_argument("--max-train-samples", type=int, help="train on the first N rows of the train split only")


def detect_layout(root: str | Path) -> str:
    """Which layout ``root`` holds: generic, voc, ade20k or cityscapes."""
    root = Path(root)
    for layout, marker in MARKERS:
        if (root / marker).exists():
            return layout
    if not root.is_dir():
        raise DatasetLayoutError(f"--data-root {root}: no such folder; pass the folder that holds the dataset")
    expected = "; ".join(f"{k}: {v}" for k, v in LAYOUTS.items())
    raise DatasetLayoutError(f"{root}: holds none of the dataset layouts; expected one of {expected}")


def build_dataset(dataset: str, root: str | Path, split: str, transforms=None, seed: int = 0,
                  *, val_fraction: float | None = None) -> SegmentationDataset:
    """One split of a ``--data-root`` layout: ``dataset`` in generic / voc / ade20k / cityscapes; ``split``
    train, val (VOC's train is trainaug) or test (images alone). ``val_fraction``: the generic layout without
    ``images/val`` holds out this share of the images."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    if dataset == "generic":
        from .generic import generic_dataset, pairs, read_classes, splits

        if split == "test":
            samples = pairs(root, "test")
        elif split == "val" and val_fraction is None and (Path(root) / "images" / "val").is_dir():
            samples = pairs(root, "val")  # a folder of its val split alone evaluates too
        else:
            samples = splits(root, val_fraction)[split == "val"]
        return generic_dataset(samples, read_classes(root).names, transforms, seed)
    from .layouts import zoo_dataset

    return zoo_dataset(dataset, root, split, transforms, seed)


def check_source(args: argparse.Namespace) -> None:
    """One of ``--data-root`` and ``--dataset-name``, and the Hub options only with the latter."""
    if bool(args.data_root) == bool(getattr(args, "dataset_name", None)):
        raise SystemExit("give --data-root FOLDER or --dataset-name ID (one of them)")
    if args.data_root:
        given = [o for o in HUB_OPTIONS if getattr(args, o, None) not in (None, False)]
        if given:
            raise SystemExit(f"--{given[0].replace('_', '-')} is for --dataset-name; --data-root reads its own layout")
    elif args.dataset:
        raise SystemExit("--dataset names a --data-root layout; a --dataset-name dataset has its own")


def finetune_data(args: argparse.Namespace, progress: bool, shard: tuple[int, int] = (0, 1)) -> TrainingData:
    """Both splits of the data a fine-tuning run names, every sample checked before a model is loaded
    (``shard``: this process's ``(rank, world size)``; a Hub dataset's rows are checked in shares)."""
    check_source(args)
    if args.dataset_name:
        from . import hubdata

        return hubdata.load(args, progress=progress, seed=args.seed, shard=shard)
    root = Path(args.data_root)
    layout = args.dataset or detect_layout(root)
    if layout == "generic":
        from . import generic

        return generic.load(root, args.val_fraction, progress, args.seed)
    if args.val_fraction is not None:
        raise SystemExit(f"--val-fraction is for the generic layout or a --dataset-name dataset; {layout} has its own val split")
    known = fcn_zoo.DATASETS[layout]
    train, val = build_dataset(layout, root, "train", None, args.seed), build_dataset(layout, root, "val")
    record = {
        "name": known.title, "layout": layout, "train_images": len(train), "val_images": len(val), "val_split": "val",
        "train_sha256": train.fingerprint(), "val_sha256": val.fingerprint(),
    }
    return TrainingData(layout, train, val, list(known.classes), list(known.palette), record)


def evaluation_data(args: argparse.Namespace, inherited: float | None) -> tuple[SegmentationDataset, str]:
    """The split ``args.split`` (train, val or test) of the data an evaluation names, and its layout. Where the data
    has no val split, ``--val-fraction`` holds out that share of train, else ``inherited`` (the share the
    model's training run held out)."""
    check_source(args)
    if args.dataset_name:
        from . import hubdata

        return hubdata.load_split(args, args.split, args.val_fraction, inherited), "hub"
    layout = args.dataset or detect_layout(args.data_root)
    fraction = args.val_fraction
    if fraction is not None and layout != "generic":
        raise DatasetLayoutError(f"--val-fraction holds out part of your own folder's or a Hugging Face dataset's "
                                 f"train split; {args.data_root} is {layout}'s layout, whose val split is its own")
    if fraction is None and not (Path(args.data_root) / "images" / "val").is_dir():
        fraction = inherited
    return build_dataset(layout, args.data_root, args.split, val_fraction=fraction if layout == "generic" else None), layout


__all__ = ["add_hub_arguments", "build_dataset", "check_source", "detect_layout", "evaluation_data", "finetune_data"]
