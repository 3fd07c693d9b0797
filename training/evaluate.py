"""Evaluate any checkpoint with the reference protocol: mIoU, pixel accuracy, per-class IoU.

    fcn-zoo evaluate fcn_resnet50os8_voc --data-root /data
    fcn-zoo evaluate runs/mine/best --data-root DATA          # your data (training.generic)
    fcn-zoo evaluate runs/mine/best --dataset-name segments/sidewalk-semantic   # a Hugging Face dataset (training.hubdata)
    torchrun --nproc-per-node 8 -m fcn_zoo.cli evaluate runs/voc/best --data-root /data --tta
    fcn-zoo evaluate fcn_resnet101os8_cityscapes --data-root /data --save-predictions preds/   # + the official figure
    fcn-zoo evaluate fcn_resnet101os8_cityscapes --data-root /data --split test --format-only --save-predictions sub/

In a checkout, ``python -m training.evaluate`` runs the same code.

The confusion matrix is accumulated on the device and summed across processes. Writes ``eval.json`` and a
per-class IoU bar chart ``eval_iou.png`` to ``--output-dir``. ``--save-predictions DIR`` writes each image's
prediction as its dataset's official tools take it (:mod:`training.submit`); on Cityscapes, with
cityscapesScripts installed, its evaluator scores those files too and eval.json holds its mIoU beside ours.
``--split test --format-only`` scores nothing: it writes the test images' predictions and the archive the
benchmark's server takes (``sub.zip``; VOC: ``sub.tar.gz``), and says where to upload it. ``--tta`` reports multi-scale + flip with single scale
beside it, from the same forward passes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fcn_zoo._files import atomic_path, write_json
from fcn_zoo._inference import device_of
from fcn_zoo.metrics import IGNORE_INDEX, ConfusionMatrix
from fcn_zoo.protocol import TTA

from .data import DatasetLayoutError, check_sizes
from .distributed import DistributedContext, init_distributed, shared_step
from .sources import add_hub_arguments, detect_layout, evaluation_data
from .submit import FORMATS, SERVERS, PredictionWriter, archive, check_folder, cityscapes_official, make_folder

# how eval.json's mIoU is computed (fcn_zoo.metrics.ConfusionMatrix), said in the report itself
DEFINITION = {
    "mIoU": "one confusion matrix summed over the dataset; per class IoU = TP / (TP + FP + FN); the mean over the "
            "classes present in the ground truth or the prediction (a class absent from both is NaN and left out)",
    "ignore_index": IGNORE_INDEX,
    "ignored": "ground-truth pixels of value ignore_index after the dataset's mapping (ADE20K: 0 'other'; Cityscapes: "
               "the label ids outside the 19 train ids; VOC: 255) count neither as a false negative nor as a false positive",
}


def evaluate(model, dataset, *, tta: TTA | None = None, mode: str = "whole", ctx: DistributedContext | None = None,
             max_samples: int | None = None, progress: bool = True, eval_size: tuple[int, int] | None = None,
             fuse: bool = True, write: Callable[[int, np.ndarray], None] | None = None, score: bool = True) -> dict | None:
    """Run the protocol over ``dataset`` (no transforms: raw uint8 images) and return :meth:`ConfusionMatrix.compute`.

    ``eval_size`` replaces the resize bound of the protocol (default the model's own ``eval_size``, from its
    ``config.json``: what ``predict`` and the evaluation during training use). ``fuse``: evaluate a
    fused copy of the model (``model.fuse(inplace=False)``, made for this evaluation: faster, float rounding
    only); ``model`` itself is left in the modes it had either way. ``write(index, labels)`` receives each
    sample's predicted class indices (``(H, W)`` at the image's size), as ``--save-predictions`` saves them.
    With ``tta`` that includes scale 1, the result also holds ``"single_scale"``: the same images scored from
    the unflipped scale-1 logits of the same forward passes (what an evaluation without TTA gives).
    ``score=False``: predict and write only, read no labels (a test split) and return ``None``."""
    from tqdm.auto import tqdm

    from fcn_zoo.engine import Predictor
    from fcn_zoo.labels import upsample_argmax

    ctx = ctx or DistributedContext()
    device = device_of(model)
    # as predict runs it, one image at a time (evaluation sizes differ: a batch would mostly be one image anyway)
    predictor = Predictor(model, tta=tta, mode=mode, fuse=fuse, eval_size=eval_size, batch_size=1)
    matrix = ConfusionMatrix(model.num_classes, device)
    # the plain prediction's logits among TTA's: scales in order, each followed by its flip
    plain = tta.scales.index(1.0) * (2 if tta.flip else 1) if tta and 1.0 in tta.scales else None
    single = ConfusionMatrix(model.num_classes, device) if plain is not None else None
    count = sample_count(dataset, max_samples)
    indices = range(ctx.rank, count, ctx.world_size)

    def run() -> None:
        results = predictor.stream(indices, read=dataset.image, name=dataset.where, errors="raise")
        for i, seg in tqdm(results, total=len(indices), desc="eval", disable=not progress or not ctx.is_main, leave=False):
            if write is not None:
                write(i, seg.labels)
            if not score:
                continue
            label = dataset.label(i)
            check_sizes(seg.size, label.shape, dataset.where(i))
            label = torch.from_numpy(label).to(device, torch.int64)
            matrix.update(torch.from_numpy(seg.labels).to(device, torch.int64), label)
            if single is not None:
                single.update(upsample_argmax([seg.logits[plain].to(device)], seg.size), label)

    shared_step(run, ctx.world_size)  # a sample that fails in one process stops every process, before the sum
    if not score:
        return None
    matrix.all_reduce()
    results = matrix.compute()
    if not results["pixels"]:  # every process holds the summed matrix: each raises the same line
        raise DatasetLayoutError(
            f"the {count} sample(s) scored have no labelled pixel: every ground-truth pixel is {IGNORE_INDEX} "
            f"(ignored) after the dataset's mapping, so there is no mIoU to measure; check the masks' values"
            + (" (or score more samples than --eval-max-samples/--max-samples)" if count < len(dataset) else "")
        )
    if single is not None:
        single.all_reduce()
        results["single_scale"] = single.compute()
    return results


def write_report(results: dict, class_names: list[str], out_dir: Path, extra: dict | None = None) -> None:
    """``eval.json`` and ``eval_iou.png`` (per-class IoU bars) in ``out_dir``, and a table on stdout."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {**(extra or {}), **results, "classes": class_names, "definition": DEFINITION}
    write_json(out_dir / "eval.json", _strict_json(report))
    width = max(len(n) for n in class_names)
    print(f"{'class'.ljust(width)}  {'IoU':>6}  {'Acc':>6}")
    for name, iou, acc in zip(class_names, results["IoU"], results["Acc"]):
        print(f"{name.ljust(width)}  {100 * iou:6.2f}  {100 * acc:6.2f}")
    print(f"mIoU {100 * results['mIoU']:.2f}  aAcc {100 * results['aAcc']:.2f}  mAcc {100 * results['mAcc']:.2f}")
    if "single_scale" in results:
        single = results["single_scale"]
        print(f"the figures above with multi-scale + flip; single scale: mIoU {100 * single['mIoU']:.2f}  "
              f"aAcc {100 * single['aAcc']:.2f}  mAcc {100 * single['mAcc']:.2f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(class_names)), 4))
    ax.bar(range(len(class_names)), [0 if v != v else 100 * v for v in results["IoU"]])
    ax.set_xticks(range(len(class_names)), [n.split(",")[0] for n in class_names], rotation=90, fontsize=6)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"mIoU {100 * results['mIoU']:.2f}")
    fig.tight_layout()
    with atomic_path(out_dir / "eval_iou.png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None, prog: str = "python -m training.evaluate") -> int:
    """The command line (``fcn-zoo evaluate``, or ``python -m training.evaluate`` in a checkout)."""
    import fcn_zoo

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("model", help="zoo name, Hub repo id, save_pretrained folder or reference .pth")
    parser.add_argument("--data-root", help="a folder in one of the layouts (or --dataset-name)")
    parser.add_argument("--dataset", choices=("generic", *sorted(fcn_zoo.DATASETS)), help="the layout of --data-root (default: detected)")
    parser.add_argument("--split", default="val", choices=("train", "val", "test"),
                        help="test: the images alone (their labels are the benchmark server's), with --format-only")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="without images/val or a validation split: the held-out share (default: the one the model's "
                        "training run used)")
    add_hub_arguments(parser, evaluation=True)
    parser.add_argument("--mode", default="whole", choices=("whole", "slide"))
    parser.add_argument("--tta", action="store_true", help="flip + scales 0.5-1.75")
    parser.add_argument("--device", default=None)
    parser.add_argument("--max-samples", type=int, default=None, help="evaluate the first N samples only")
    parser.add_argument("--eval-size", type=int, nargs=2, metavar=("LONG", "SHORT"), default=None,
                        help="the resize bound of the protocol (default: the model's own, from its config.json)")
    parser.add_argument("--output-dir", help="where eval.json and eval_iou.png go (default: beside a model folder, "
                        "runs/mine/eval-best-val for runs/mine/best; else eval/<model>-<split>; -tta added with --tta)")
    parser.add_argument("--save-predictions", metavar="DIR", help="write each image's prediction as the dataset's "
                        "official tools take it (Cityscapes label ids, ADE20K 1..150, VOC palette PNGs, else class "
                        "indices + classes.txt); on Cityscapes, score them with cityscapesScripts too where installed")
    parser.add_argument("--overwrite-predictions", action="store_true",
                        help="--save-predictions into a folder that holds files: replace those of the same names")
    parser.add_argument("--format-only", action="store_true",
                        help="score nothing: write the --save-predictions files and, for VOC, ADE20K and Cityscapes, "
                        "the archive their servers take (DIR.zip; VOC: DIR.tar.gz), and say where to upload it")
    args = parser.parse_args(argv)
    if args.split == "test" and args.dataset_name:
        raise SystemExit(f"{prog}: --split test reads a --data-root layout; a Hugging Face dataset's unlabelled rows "
                         "are segmented with fcn-zoo predict or fcn_zoo.ray")
    if args.split == "test" and not args.format_only:
        raise SystemExit(f"{prog}: the test split has no labels to score; add --format-only --save-predictions DIR "
                         "to write the predictions its benchmark's server scores")
    if args.format_only and not args.save_predictions:
        raise SystemExit(f"{prog}: --format-only writes predictions and scores nothing; name their folder with "
                         "--save-predictions DIR")
    if args.max_samples is not None and args.max_samples < 1:
        raise SystemExit(f"{prog}: --max-samples {args.max_samples}: must be at least 1 (leave it out for every sample)")
    from fcn_zoo.model import MAX_SIDE

    if args.eval_size and not all(1 <= side <= MAX_SIDE for side in args.eval_size):
        raise SystemExit(f"{prog}: --eval-size: each side must be 1..{MAX_SIDE}, got {args.eval_size[0]} {args.eval_size[1]}")

    from fcn_zoo._files import writable
    from fcn_zoo.errors import FCNZooError

    out = Path(args.output_dir) if args.output_dir else default_output_dir(args.model, args.split + ("-tta" if args.tta else ""))
    if args.device is None and _int8_folder(args.model):  # OpenVINO runs it on the CPU, GPU or not
        args.device = "cpu"
    try:
        ctx = init_distributed(args.device)
    except FCNZooError as e:
        raise SystemExit(f"{prog}: {e}") from None
    predictions = Path(args.save_predictions) if args.save_predictions else None

    def load():  # every process learns of an error in any, so none is left waiting for another
        if predictions and ctx.is_main:  # before anything loads: a folder that holds files is refused at once
            kind = (args.dataset or detect_layout(args.data_root)) if args.data_root else "hub"
            check_folder(predictions, args.overwrite_predictions, archive=kind if args.format_only and kind in SERVERS else None)
        # the share its training held out, and on its Hugging Face dataset the splits it trained and validated on
        dataset, layout = evaluation_data(args, inherit_training_splits(args))
        model = fcn_zoo.from_pretrained(args.model, device=str(ctx.device))
        if model.num_classes != dataset.num_classes:
            how = (f"fcn-zoo train --init {args.model} fine-tunes one on them" if not hasattr(model, "quantization")
                   else "fine-tune the fp32 model this int8 one was made from, then quantize that")
            raise SystemExit(f"{args.model} predicts {model.num_classes} classes; {args.data_root or args.dataset_name} has "
                             f"{dataset.num_classes}: evaluate a model of these classes ({how})")
        if ctx.is_main and not args.format_only:  # before the evaluation, not after it: rank 0 writes the report
            writable(out, "the report's folder", "pass --output-dir a writable folder")
        writer = PredictionWriter(predictions, dataset, layout, model.palette, args.split) if predictions else None
        if writer and ctx.is_main:  # made only now: a run refused above leaves no folder behind
            make_folder(predictions)
            writer.write_classes()
        return dataset, layout, model, writer

    try:
        dataset, layout, model, writer = shared_step(load, ctx.world_size)
    except (DatasetLayoutError, FCNZooError) as e:
        raise SystemExit(f"{prog}: {e}") from None
    except SystemExit as e:  # options that do not go together, said as this command
        if isinstance(e.code, str):
            raise SystemExit(f"{prog}: {e.code}") from None
        raise
    try:
        results = evaluate(model, dataset, tta=TTA() if args.tta else None, mode=args.mode, ctx=ctx, max_samples=args.max_samples,
                           progress=sys.stderr.isatty(),
                           eval_size=tuple(args.eval_size) if args.eval_size else None, write=writer,
                           score=not args.format_only)
    except (DatasetLayoutError, FCNZooError) as e:  # a sample that does not read: no report was written
        raise SystemExit(f"{prog}: {e}") from None
    if ctx.is_main and args.format_only:
        count = sample_count(dataset, args.max_samples)
        print(f"wrote {count} prediction{'s' if count != 1 else ''} to {predictions}")
        try:
            print(archive(writer, count, args.split, complete=count == len(dataset)))
        except FCNZooError as e:
            raise SystemExit(f"{prog}: {e}") from None
    elif ctx.is_main:
        extra = submission(writer, dataset, layout, args.max_samples) if writer else {}
        write_report(results, dataset.class_names, out, {
            "model": args.model, "dataset": layout, "data_root": args.data_root, "dataset_name": args.dataset_name,
            "revision": args.revision, "split": getattr(dataset, "description", args.split), "mode": args.mode,
            "tta": tta_record(args.tta), "eval_size": list(args.eval_size or model.eval_size), "samples": sample_count(dataset, args.max_samples),
            "samples_sha256": dataset.fingerprint(sample_count(dataset, args.max_samples)),  # of the samples scored
            **extra,
        })
        official = extra.get("official")
        if official and "mIoU" in official:
            print(f"cityscapesScripts mIoU {100 * official['mIoU']:.2f} on the saved predictions (ours {100 * results['mIoU']:.2f})")
        elif official:
            print(f"cityscapesScripts could not score the saved predictions: {official['error']}")
        elif writer and layout == "cityscapes":
            print("pip install cityscapesscripts to have the official evaluator score the saved predictions too")
        print(f"wrote {out / 'eval.json'} and {out / 'eval_iou.png'}")
        if writer:
            print(f"wrote {extra['predictions']['files']} predictions to {predictions}")
    ctx.close()
    return 0


def submission(writer: PredictionWriter, dataset, layout: str, max_samples: int | None) -> dict:
    """What eval.json says of the saved predictions; on Cityscapes, cityscapesScripts' figure on them."""
    count = sample_count(dataset, max_samples)
    extra = {"predictions": {"folder": str(writer.folder), "format": FORMATS[layout], "files": count}}
    if layout == "cityscapes":
        official = cityscapes_official([writer.folder / writer.name(i) for i in range(count)],
                                       [Path(dataset.samples[i][1]) for i in range(count)],
                                       writer.label_ids[:dataset.num_classes].tolist())
        if official is not None:
            extra["official"] = official
    return extra


def _strict_json(value):
    """``value`` with NaN (a class absent from both ground truth and prediction) as ``None``: eval.json is strict
    JSON, which every reader takes (JavaScript's JSON.parse refuses NaN)."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


def _is_folder(model: str) -> bool:
    """Whether ``model`` names a folder to load (a zoo name is its row, even beside a folder of that name)."""
    from fcn_zoo.errors import FCNZooError
    from fcn_zoo.hub import source_kind

    try:
        return source_kind(model) == "folder"
    except FCNZooError:
        return False


def _folder_file(model: str, name: str) -> dict:
    """The JSON object ``name`` (``config.json``, ``provenance.json``) of the model folder ``model`` names, or ``{}``
    where ``model`` is no folder or the file is unreadable."""
    import json

    try:
        found = json.loads((Path(model).expanduser() / name).read_text(encoding="utf-8")) if _is_folder(model) else {}
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _int8_folder(model: str) -> bool:
    from fcn_zoo._files import is_quantized_config

    return is_quantized_config(_folder_file(model, "config.json"))


def sample_count(dataset, max_samples: int | None) -> int:
    """How many samples an evaluation with ``--max-samples`` runs: the first ones."""
    return len(dataset) if max_samples is None else min(max_samples, len(dataset))


def tta_record(tta: bool) -> dict | bool:
    """What eval.json says of ``--tta``: the scales and flip, and how their predictions are merged."""
    if not tta:
        return False
    return {"scales": list(TTA().scales), "flip": TTA().flip,
            "merge": "each scale's logits (and its flip's, flipped back) upsampled to the image's size, averaged, then "
                     "argmax: the reference's auginference (mmsegmentation averages softmax probabilities instead)",
            "single_scale": "in single_scale: the unflipped scale-1 logits of the same passes, as without --tta"}


def default_output_dir(model: str, split: str) -> Path:
    """Beside a model folder (``runs/mine/best`` -> ``runs/mine/eval-best-val``), else ``eval/<model>-<split>``."""
    folder = Path(model).expanduser()
    if _is_folder(model):
        return folder.resolve().parent / f"eval-{folder.resolve().name}-{split}"
    return Path("eval") / f"{model.replace('/', '--').replace('@', '-')}-{split}"


def inherit_training_splits(args: argparse.Namespace) -> float | None:
    """What the training run of a model folder (``best/``) chose, from its ``provenance.json``, for what the
    command line leaves out: returns its ``--val-fraction`` (the share of train it held out); on the same
    Hugging Face dataset it trained on, sets ``args.train_split`` to its training split where
    ``--train-split`` is not given, and ``args.val_split`` to its validation split where it validated on a
    named split and neither ``--val-split`` nor ``--val-fraction`` is given. Its held-out rows, or its
    validation split, are then the ones evaluated, not those of the default ``train`` split. On that dataset its
    ``--reduce-labels`` and columns hold too (its masks read otherwise would be scored against other classes), and
    on any Hugging Face dataset without class names of its own the model's are taken."""
    run = _training_run(args.model)
    fraction = run.get("val_fraction")
    fraction = fraction if isinstance(fraction, (int, float)) and not isinstance(fraction, bool) else None
    if getattr(args, "dataset_name", None):
        args.model_classes = _model_classes(args.model)
    data = run.get("data")
    if not getattr(args, "dataset_name", None) or not isinstance(data, dict) or not _same_hub_dataset(args, data):
        return fraction
    args.reduce_labels = args.reduce_labels or data.get("reduce_labels") is True
    columns = data.get("columns") if isinstance(data.get("columns"), dict) else {}
    args.image_column = args.image_column or columns.get("image")
    args.label_column = args.label_column or columns.get("label")
    trained, validated = data.get("train_split"), data.get("val_split")
    if args.train_split is None and isinstance(trained, str):
        args.train_split = trained
    if (args.train_split == trained and args.val_split is None and args.val_fraction is None and fraction is None
            and isinstance(validated, str) and not validated.startswith("held out ")):
        args.val_split = validated
    return fraction


def _same_hub_dataset(args: argparse.Namespace, data: dict) -> bool:
    """Whether ``--dataset-name`` (and ``--dataset-config``) name the Hugging Face dataset ``data`` records."""
    if data.get("layout") != "hub" or args.dataset_config not in (None, data.get("config")):
        return False
    if data.get("local_folder"):  # a folder is recorded by its name
        return Path(args.dataset_name).exists() and Path(args.dataset_name).resolve().name == data.get("name")
    return args.dataset_name == data.get("name")


def _model_classes(model: str) -> tuple[list[str], list] | None:
    """The class names and palette a model folder's ``config.json`` records, or ``None``."""
    config = _folder_file(model, "config.json")
    names = config.get("class_names")
    return (list(names), config.get("palette")) if isinstance(names, list) and names else None


def _training_run(model: str) -> dict:
    """The ``run`` of a model folder's ``provenance.json`` (what its training run recorded), or ``{}``."""
    run = _folder_file(model, "provenance.json").get("run")
    return run if isinstance(run, dict) else {}


if __name__ == "__main__":
    sys.exit(main())
