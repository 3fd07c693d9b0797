"""What a run trains: the model, the data, the schedule, from ``--recipe`` (reproduce a zoo row) or from
``--init`` (fine-tune anything loadable on your data, with your classes).

Fine-tuning defaults, for small datasets: 50 epochs and at least 500 iterations (a given ``--epochs`` is
taken as it is), evaluation 10 times over the run, SGD lr 0.01 with the
recipe's momentum, weight decay and poly decay, batch 8 (or the training set, if smaller), a square crop of
512 or the images' evaluation size if they are smaller, and the recipe's augmentations. The resize bound
is the images' median size, unless it exceeds the ``--init`` model's own bound.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import fcn_zoo

from .data import SegmentationDataset, median_frequency_weights
from .distributed import DistributedContext
from .sources import build_dataset, check_source, finetune_data
from .transforms import train_transforms

REFERENCE_GPUS = 8  # the table's rows were trained on 8 GPUs: the iterations per epoch are counted over 8
FINETUNE_EPOCHS = 50
FINETUNE_MIN_ITERS = 500
FINETUNE_LR = 0.01
FINETUNE_BATCH = 8
FINETUNE_CROP = 512


@dataclass
class Plan:
    name: str  # the recipe's row name, or the data folder's name when fine-tuning
    row: object | None  # the zoo row reproduced (None when fine-tuning)
    model: fcn_zoo.FCN
    train_set: SegmentationDataset
    val_set: SegmentationDataset
    total_batch: int
    per_device: int
    accumulation: int
    crop: tuple[int, int]
    scale: tuple[int, int]
    iters_per_epoch: int
    max_iters: int
    lr: float
    eval_interval: int
    class_weights: list[float] | None = None
    freeze_backbone: bool = False
    meta: dict = field(default_factory=dict)  # what run.json and the model card record


def make_plan(args: argparse.Namespace, ctx: DistributedContext) -> Plan:
    if bool(args.recipe) == bool(args.init):
        raise SystemExit("give --recipe NAME to reproduce a zoo row, or --init SOURCE to fine-tune on --data-root (not both)")
    check_numbers(args)
    check_output_dir(Path(args.output_dir), args.resume, args)
    if args.push_to_hub:  # found out now, not after hours of training
        import huggingface_hub

        if args.push_to_hub.count("/") != 1 or not all(args.push_to_hub.split("/")):
            raise SystemExit(f"--push-to-hub {args.push_to_hub}: give a Hub repo id OWNER/NAME")
        if not huggingface_hub.get_token():
            raise SystemExit(f"--push-to-hub {args.push_to_hub}: no Hugging Face token; run `hf auth login` or set HF_TOKEN, then rerun")
    return recipe_plan(args, ctx) if args.recipe else finetune_plan(args, ctx)


#: the options that count something, and the least each may be (0: "never" or "none")
AT_LEAST = {"max_iters": 1, "epochs": 1, "batch_size": 1, "per_device_batch": 1, "head_channels": 1,
            "eval_max_samples": 1, "checkpoint_interval": 1, "log_interval": 1, "eval_interval": 0, "num_workers": 0}


def check_numbers(args: argparse.Namespace) -> None:
    """Every number of the command line in its range, said in one line before anything loads."""
    from fcn_zoo.model import MAX_SIDE

    for option, least in AT_LEAST.items():
        value = getattr(args, option, None)
        if value is not None and value < least:
            raise SystemExit(f"--{option.replace('_', '-')} {value}: must be at least {least}")
    for option in ("crop_size", "scale"):
        sides = getattr(args, option, None) or []
        if not all(1 <= side <= MAX_SIDE for side in sides):
            raise SystemExit(f"--{option.replace('_', '-')} {' '.join(map(str, sides))}: each side must be 1..{MAX_SIDE}")
    if args.lr is not None and not args.lr > 0:
        raise SystemExit(f"--lr {args.lr}: must be positive")


#: the arguments that make a run's model and data: a --resume that changes one would continue another run
SAME_ON_RESUME = ("recipe", "init", "data_root", "dataset", "dataset_name", "dataset_config", "revision", "image_column",
                  "label_column", "id2label", "classes", "reduce_labels", "train_split", "val_split", "val_fraction",
                  "max_train_samples", "backbone", "head_channels", "freeze_backbone", "class_weights", "seed")


def check_output_dir(out: Path, resume: bool, args: argparse.Namespace | None = None) -> None:
    """A new run (not ``--resume``) goes into a folder that holds no earlier run: its checkpoints would be resumed
    later in place of this run's, and its best/ and last/ taken for this run's. A ``--resume`` continues the run
    the folder holds: with the same model and data (:data:`SAME_ON_RESUME`, as its ``run.json`` records them)."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--output-dir {out}: is a file; pass a folder")
    if resume and args is not None:
        try:
            before = json.loads((out / "run.json").read_text(encoding="utf-8")).get("args", {})
        except (OSError, ValueError, AttributeError):
            before = {}  # no run recorded yet (killed before its start was written): nothing to compare
        for key in (k for k in SAME_ON_RESUME if k in before and not _same(before[k], getattr(args, k, None))):
            option = "--" + key.replace("_", "-")
            raise SystemExit(f"--resume: {out} holds a run made with {option} {before[key]!r}, this one asks for "
                             f"{getattr(args, key, None)!r}; resume it as it was, or pass a new --output-dir")
    if resume or not out.is_dir():
        return
    earlier = sorted(p.name for p in out.iterdir() if p.name.startswith("ckpt-") or p.name in ("best", "last", "run.json"))
    if earlier:
        raise SystemExit(f"--output-dir {out}: holds an earlier run ({', '.join(earlier[:3])}); pass --resume to continue "
                         "it, or a new --output-dir")


def _same(before, now) -> bool:
    """An argument as the earlier run gave it and as this one does: equal, or paths to the same file or folder."""
    if before == now:
        return True
    paths = [os.path.realpath(os.path.expanduser(v)) if isinstance(v, str) else v for v in (before, now)]
    return isinstance(now, str) and os.path.exists(now) and paths[0] == paths[1]


def recipe_plan(args: argparse.Namespace, ctx: DistributedContext) -> Plan:
    for option in ("val_fraction", "class_weights", "dataset", "dataset_name"):
        if getattr(args, option) not in (None, "none"):
            raise SystemExit(f"--{option.replace('_', '-')} is for fine-tuning (--init); a --recipe run uses the row's dataset as the reference does")
    check_source(args)
    row = fcn_zoo.get_checkpoint(args.recipe)
    data = row.data
    total_batch = args.batch_size or row.batch_size
    per_device = _per_device(args, total_batch, ctx)
    crop = _crop(args) or row.crop_size
    scale = tuple(args.scale) if args.scale else data.eval_size
    train_set = build_dataset(row.dataset, args.data_root, "train", train_transforms(scale, crop, data.mean, data.std), args.seed)
    val_set = build_dataset(row.dataset, args.data_root, "val")
    weights = args.backbone_weights or "openmmlab"  # the reference's initialisation
    model = build_model(args, row, weights)
    model.eval_size, model.crop_size = scale, crop  # the protocol best/ is evaluated with, in its config.json
    iters_per_epoch = _iters_per_epoch(train_set, total_batch, reference=True)
    max_iters = args.max_iters or (args.epochs or row.epochs) * iters_per_epoch
    meta = {"recipe": row.name, "backbone_weights": weights}
    return Plan(
        row.name, row, model, train_set, val_set, total_batch, per_device, _accumulation(total_batch, per_device, ctx),
        crop, scale, iters_per_epoch, max_iters, args.lr or row.lr, args.eval_interval or 0,
        freeze_backbone=args.freeze_backbone, meta=meta,
    )


def finetune_plan(args: argparse.Namespace, ctx: DistributedContext) -> Plan:
    for option in ("backbone", "head_channels"):
        if getattr(args, option):
            raise SystemExit(f"--{option.replace('_', '-')} comes from --init {args.init}: the architecture is the source's")
    if args.backbone_weights is not None:
        raise SystemExit(f"--backbone-weights does not apply with --init: every weight comes from {args.init}")
    log = _logger(ctx)
    # the data first, all of it: a malformed dataset fails here, before a model is loaded or a step taken
    data = finetune_data(args, progress=not args.no_progress and ctx.is_main, shard=(ctx.rank, ctx.world_size))
    train_set, val_set, names = data.train, data.val, data.class_names
    weights = None
    if args.class_weights == "auto":
        weights = median_frequency_weights(*(data.pixels if data.pixels is not None else train_set.class_pixels()))
        log(f"class weights (median frequency): {', '.join(f'{n} {w:.3g}' for n, w in zip(names, weights))}")

    model, source_classes = load_init(args.init, len(names), log)
    model.class_names = list(names)
    if data.palette is not None:
        model.palette = [tuple(c) for c in data.palette]
    known = fcn_zoo.DATASETS.get(data.layout)
    model.dataset = data.layout if known else None
    scale = tuple(args.scale) if args.scale else (known.eval_size if known else _native_scale(data.sizes, model.eval_size))
    crop = _crop(args) or (min(FINETUNE_CROP, scale[1]),) * 2
    model.eval_size, model.crop_size = scale, crop
    train_set.transforms = train_transforms(scale, crop, model.mean, model.std)

    total_batch = args.batch_size or max(ctx.world_size, min(FINETUNE_BATCH, len(train_set)) // ctx.world_size * ctx.world_size)
    per_device = _per_device(args, total_batch, ctx)
    iters_per_epoch = _iters_per_epoch(train_set, total_batch)
    # the floor of iterations is the default's (a small dataset's 50 epochs are few steps), not a given --epochs'
    max_iters = args.max_iters or (args.epochs * iters_per_epoch if args.epochs
                                   else max(FINETUNE_EPOCHS * iters_per_epoch, FINETUNE_MIN_ITERS))
    meta = {
        "init": str(args.init), "init_classes": source_classes, "reinitialised_classifiers": source_classes != len(names),
        "data": data.record, "epochs": round(max_iters / iters_per_epoch, 2), "lr": args.lr or FINETUNE_LR,
        "freeze_backbone": args.freeze_backbone, "class_weights": weights, "val_fraction": args.val_fraction,
        "backbone_weights": f"--init {args.init}",
    }
    return Plan(
        data.record["name"], None, model, train_set, val_set, total_batch, per_device, _accumulation(total_batch, per_device, ctx),
        crop, scale, iters_per_epoch, max_iters, args.lr or FINETUNE_LR,
        max(1, max_iters // 10) if args.eval_interval is None else args.eval_interval,  # 0: only at the end
        class_weights=weights, freeze_backbone=args.freeze_backbone, meta=meta,
    )


def load_init(source: str, num_classes: int, log) -> tuple[fcn_zoo.FCN, int]:
    """The FCN of ``source`` with every weight, its classifiers re-initialised if its class count differs."""
    from fcn_zoo.console import quiet_loggers
    from fcn_zoo.hub import _read_config, resolve

    from fcn_zoo._files import is_quantized_config

    try:
        with quiet_loggers("fcn_zoo.weights"):  # its note on re-initialised classifiers: said below, once
            folder = resolve(source)
            config = _read_config(folder)
            if is_quantized_config(config):
                raise SystemExit(f"--init {source}: an int8 model cannot be trained; fine-tune the fp32 model it was "
                                 f"made from ({config['quantization'].get('source', 'its source')}), then quantize that")
            source_classes = config.get("num_classes")
            model = fcn_zoo.from_pretrained(folder, num_classes=num_classes)
    except fcn_zoo.FCNZooError as e:
        raise SystemExit(f"--init {source}: {e}") from e
    if source_classes == num_classes:
        log(f"--init {source}: every weight loaded ({num_classes} classes)")
    else:
        log(f"--init {source}: {source_classes} classes, the data has {num_classes}: the two classifiers are re-initialised, every other weight is loaded")
    return model, source_classes


def build_model(args: argparse.Namespace, row, weights: str) -> fcn_zoo.FCN:
    """The recipe's FCN, its backbone initialised from ``weights`` (:mod:`training.backbones`)."""
    from .backbones import initialise_backbone

    config = row.model_config()
    if args.backbone:
        config["backbone"] = args.backbone
    if args.head_channels:
        config.update(head_channels=args.head_channels, aux_channels=args.head_channels)
    model = fcn_zoo.FCN(**config)
    initialise_backbone(model, config["backbone"], config["output_stride"], weights)
    return model


def _native_scale(sizes: list[tuple[int, int]], bound: tuple[int, int]) -> tuple[int, int]:
    """The median (long, short) side of the training images, or ``bound`` if that is smaller."""
    long = int(statistics.median(max(s) for s in sizes))
    short = int(statistics.median(min(s) for s in sizes))
    return (long, short) if long <= bound[0] and short <= bound[1] else tuple(bound)


def _crop(args: argparse.Namespace) -> tuple[int, int] | None:
    if not args.crop_size:
        return None
    if len(args.crop_size) > 2:
        raise SystemExit(f"--crop-size takes H or H W, got {len(args.crop_size)} numbers")
    return tuple(args.crop_size) * (2 // len(args.crop_size))


def reference_iters_per_epoch(samples: int, total_batch: int, gpus: int = REFERENCE_GPUS) -> int:
    """Iterations per epoch as the reference counts them: its ``DistributedSampler`` pads the samples to a
    multiple of its ``gpus`` processes, and each process drops its last incomplete batch of ``total / gpus``."""
    if total_batch % gpus:
        return samples // total_batch
    return -(-samples // gpus) // (total_batch // gpus)


def _per_device(args: argparse.Namespace, total_batch: int, ctx: DistributedContext) -> int:
    """The total batch over the processes, as the reference splits it; smaller only when asked for."""
    if args.per_device_batch:
        return args.per_device_batch
    if total_batch % ctx.world_size:
        raise SystemExit(f"--batch-size {total_batch} does not split over {ctx.world_size} processes; give --per-device-batch")
    return total_batch // ctx.world_size


def _accumulation(total_batch: int, per_device: int, ctx: DistributedContext) -> int:
    if total_batch % (ctx.world_size * per_device):
        raise SystemExit(f"--batch-size {total_batch} is not a multiple of {ctx.world_size} processes x {per_device} per device")
    return total_batch // (ctx.world_size * per_device)


def _iters_per_epoch(train_set: SegmentationDataset, total_batch: int, reference: bool = False) -> int:
    iters = reference_iters_per_epoch(len(train_set), total_batch) if reference else len(train_set) // total_batch
    if iters == 0:
        raise SystemExit(f"the training set has {len(train_set)} samples, fewer than one batch of {total_batch}")
    return iters


def _logger(ctx: DistributedContext):
    def log(message: str) -> None:
        if ctx.is_main:
            print(message, file=sys.stderr)

    return log


__all__ = ["Plan", "make_plan", "build_model", "reference_iters_per_epoch"]
