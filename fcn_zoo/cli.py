"""The ``fcn-zoo`` command: list, info, download, predict, convert, export, publish.

Errors are one line on stderr and exit 1, whatever raised them; ``--debug`` shows the traceback and the
debug logs of fcn_zoo and the libraries under it, which are otherwise kept quiet.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from pathlib import Path

from . import zoo
from .convert import FORMATS
from .console import configure_logging, interrupt_on_sigterm, print_columns, report
from .errors import FCNZooError

EXIT_FAILED = 1
TRAINING_VERBS = ("train", "evaluate", "prepare")  # run by fcn_zoo_training, which parses their arguments
#: what the training code imports beyond the package, by import name: told before a run, not at its end
TRAIN_EXTRA = ("matplotlib", "scipy", "cv2", "tqdm")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    verb = next((a for a in argv if a != "--debug"), None)
    if verb in TRAINING_VERBS:
        debug = "--debug" in argv
        configure_logging(debug)
        rest = [a for a in argv[argv.index(verb) + 1:] if a != "--debug"]
        return _guarded(lambda: _run_training(verb, rest), debug)
    args = _parser().parse_args(argv)
    configure_logging(args.debug)
    return _guarded(lambda: args.func(args), args.debug)


def _guarded(command, debug: bool) -> int:
    """``command()``'s exit status; an error (what the training code does not turn into its own one-line exit)
    is one line on stderr."""
    try:
        return command()
    except KeyboardInterrupt:
        print("fcn-zoo: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (fcn-zoo list | head): nothing more to say to it
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the final flush does not fail
        except (OSError, ValueError, AttributeError):  # a stdout that is no file
            pass
        return 0
    except Exception as e:
        report(e, debug)
        return EXIT_FAILED


def _run_training(verb: str, argv: list[str]) -> int:
    """``fcn-zoo train ...``, ``evaluate ...`` and ``prepare ...``: the training code's own command lines."""
    _needs(TRAIN_EXTRA, "train", f"fcn-zoo {verb}")
    if any(a == "--dataset-name" or a.startswith("--dataset-name=") for a in argv):
        _needs(("datasets",), "datasets", f"fcn-zoo {verb} --dataset-name")
    return importlib.import_module(f"fcn_zoo_training.{verb}").main(argv, prog=f"fcn-zoo {verb}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fcn-zoo", description="FCN semantic segmentation checkpoints.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="the zoo's models, their reference mIoU and whether they are cached")
    p.add_argument("--dataset", choices=sorted(zoo.DATASETS), help="only models trained on this dataset")
    p.add_argument("--cache-dir", help="fcn_zoo cache folder (default ~/.cache/fcn_zoo)")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("info", help="everything known about one model, and whether it is cached")
    p.add_argument("name")
    p.add_argument("--cache-dir", help="fcn_zoo cache folder (default ~/.cache/fcn_zoo)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("download", help="fetch and convert weights so that later loads work offline")
    p.add_argument("names", nargs="+", metavar="NAME", help="zoo names, Hub repo ids, or 'all'")
    p.add_argument("--cache-dir", help="where to keep the weights")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser(
        "predict", help="segment images, folders and videos, writing one palette PNG mask per image",
        description="Segment each INPUT: an image or video file, a folder (walked recursively), a quoted glob "
        "('photos/**/*.jpg') or @list.txt (one input per line). Masks keep the inputs' folder structure under "
        "--out; --out/summary.csv lists every input's size and class shares, and failures with their reason. "
        "Under torchrun the inputs are shared out over the processes.",
    )
    p.add_argument("name", help="zoo name, Hub repo id, save_pretrained folder or reference .pth")
    p.add_argument("images", nargs="+", metavar="INPUT")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--overlay", action="store_true", help="also write <image>_overlay.jpg")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the class colours")
    p.add_argument("--confidence", action="store_true",
                   help="also write <image>_confidence.png: 16-bit greyscale, max softmax probability x 65535")
    p.add_argument("--masks", action="store_true", help="videos: also write <video>/<frame>.png masks")
    p.add_argument("--resume", action="store_true", help="skip inputs whose outputs a previous run completed")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no line per input")
    p.add_argument("--workers", type=int, default=None,
                   help="threads reading images ahead of the network (default 2 on GPUs, 0 on a CPU whose cores torch uses)")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default 1 on CPU, 8 on GPUs)")
    p.add_argument("--tta", action="store_true", help="flip + multi-scale test-time augmentation")
    p.add_argument("--slide", action="store_true", help="sliding-window inference instead of whole image")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps (default cpu)")
    p.add_argument("--engine", default="torch", choices=("torch", "onnxruntime"),
                   help="onnxruntime: CPU only, ~15%% faster, exported once and cached (needs the export extra)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="bf16: GPUs, and CPUs with AVX512-BF16 or AMX (2-5x faster there); fp16: GPUs")
    p.add_argument("--compile", action="store_true", help="torch.compile the network first (pays off for many images)")
    p.add_argument("--cache-dir", help="where weights are kept")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("convert", help="turn a reference, torchvision or mmsegmentation .pth into a save_pretrained folder")
    p.add_argument("src", help="the .pth file")
    p.add_argument("--from", dest="source", required=True, choices=FORMATS, help="the layout of the file")
    p.add_argument("--out", required=True, help="the folder to create (must not exist yet)")
    p.add_argument("--output-stride", type=int, choices=(8, 16, 32), help="if the file name does not say")
    p.add_argument("--no-parity", action="store_true", help="skip the comparison with the source implementation")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="write a model as ONNX")
    p.add_argument("name", help="zoo name, Hub repo id, save_pretrained folder or reference .pth")
    p.add_argument("--format", dest="fmt", default="onnx", choices=("onnx",))
    p.add_argument("--out", help="the file to write (default: <name>.onnx)")
    p.add_argument("--cache-dir", help="where weights are kept")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("quantize", help="make a model's int8 version for CPUs (OpenVINO + NNCF; the int8 extra)",
                       description="Calibrate a model's int8 version on images like those it will see, measure its "
                       "agreement with fp32, and write a folder that from_pretrained and fcn-zoo predict run as int8.")
    p.add_argument("name", help="zoo name, Hub repo id, save_pretrained folder or reference .pth")
    p.add_argument("--calibration", nargs="+", required=True, metavar="INPUT",
                   help="images: folders (walked), quoted globs or @list.txt")
    p.add_argument("--num-samples", type=int, default=100, help="calibration images used (default 100)")
    p.add_argument("--validation", nargs="+", metavar="INPUT",
                   help="held-out images the agreement is measured on (default: 20 calibration images held out where there "
                   "are more than --num-samples + 20, else the calibration images)")
    p.add_argument("--validation-masks", metavar="DIR",
                   help="their masks, DIR/<name>.png named as the images are under their folder: the card gives both mIoUs")
    p.add_argument("--out", required=True, help="the folder to create (must not exist yet)")
    p.add_argument("--push-to-hub", metavar="REPO", help="also upload the folder to this Hub repo")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--cache-dir", help="where weights are kept")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("demo", help="a page to try models in a browser (Gradio; pip install 'fcn-zoo[demo]')")
    p.add_argument("names", nargs="*", metavar="NAME", help="models to offer (default: the twelve rows); zoo names, Hub repo ids, folders")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="0-65535 (default 7860)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default cpu)")
    p.add_argument("--share", action="store_true", help="also serve through a temporary public gradio.live link")
    p.add_argument("--max-models", type=int, default=2, help="models kept loaded at once (default 2)")
    p.set_defaults(func=cmd_demo)

    for verb, what in [("train", "fine-tune on your data, or reproduce a row (fcn-zoo train --help; the train extra)"),
                       ("evaluate", "mIoU of any model on a dataset (fcn-zoo evaluate --help; the train extra)"),
                       ("prepare", "convert a dataset download for training, e.g. SBD (fcn-zoo prepare --help)")]:
        sub.add_parser(verb, help=what, add_help=False)  # parsed by the training code: see main()

    p = sub.add_parser("publish", help="convert, verify and upload zoo rows to the Hugging Face Hub")
    p.add_argument("name", help="a zoo name, or 'all'")
    p.add_argument("--repo-id", help="OWNER/REPO for one name (default: the table's hub_repo_id)")
    p.add_argument("--namespace", help="with 'all': upload to NAMESPACE/<name>")
    p.add_argument("--out", default="publish", help="work folder; reruns resume from it (default ./publish)")
    p.add_argument("--dry-run", action="store_true", help="stop after writing and verifying the folders")
    p.add_argument("--token", help="Hub token (default: `hf auth login` or HF_TOKEN)")
    p.set_defaults(func=cmd_publish)
    return parser


def cmd_list(args) -> int:
    from .about import listing

    print_columns(listing(args.dataset, args.cache_dir))
    return 0


def cmd_info(args) -> int:
    from .about import describe

    print_columns(describe(args.name, args.cache_dir))
    return 0


def _needs(modules: tuple[str, ...], extra: str, what: str) -> None:
    """One line naming the missing modules of an extra and how to install them, before anything is loaded."""
    import importlib.util

    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise FCNZooError(f"{what} needs {' and '.join(missing)}: pip install 'fcn-zoo[{extra}]' "
                          f"(in a checkout: pip install -e '.[{extra}]')")


def cmd_demo(args) -> int:
    _needs(("gradio",), "demo", "the demo")
    from .demo import launch
    from .hub import resolve, source_kind

    if not 0 <= args.port <= 65535:
        raise FCNZooError(f"--port {args.port}: must be 0-65535")
    for name in (n for n in args.names if source_kind(n) == "folder"):  # an unknown name, a missing path or a folder
        resolve(name)  # without a model is one line now, not a page that cannot load it
    launch(args.names or None, host=args.host, port=args.port, device=args.device, share=args.share, max_models=args.max_models)
    return 0


def cmd_download(args) -> int:
    from .hub import resolve

    names = list(zoo.CHECKPOINTS) if args.names == ["all"] else args.names
    return _for_each(names, lambda name: print(f"{name}: {resolve(name, cache_dir=args.cache_dir)}"), args, "downloads")


def cmd_predict(args) -> int:
    from .devices import check_device_available, check_device_options, distributed_rank, has_cuda
    from .hub import source_kind
    from .inputs import Expansion, expand_inputs

    # everything that can be told without torch is checked first: a mistake is one line within a second
    out = Path(args.out)
    if args.compile and args.engine != "torch":
        raise FCNZooError("--compile applies to --engine torch; onnxruntime compiles its graph itself")
    if not 0.0 <= args.alpha <= 1.0:
        raise FCNZooError(f"--alpha {args.alpha}: must be in [0, 1]")
    for option, value, least in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0)):
        if value is not None and value < least:
            raise FCNZooError(f"{option} {value}: must be at least {least}")
    nearest = next(p for p in (out, *out.parents) if p.exists())  # --out, or the folder it is to be made in
    if not nearest.is_dir() or not os.access(nearest, os.W_OK | os.X_OK):
        raise FCNZooError(f"--out {out}: {nearest} is not a folder this user can write; pass another folder")
    source_kind(args.name)  # an unknown name or a missing file, before anything is imported or loaded
    check_device_options(args.device, args.precision, args.engine)
    rank, world, local_rank = distributed_rank()
    # under torchrun the first process alone looks for the inputs; the others work from its list (runner.py)
    found = expand_inputs(args.images, exclude=out) if rank == 0 else Expansion([], [])
    device = args.device
    if world > 1 and (device or ("cuda" if has_cuda() else "cpu")).startswith("cuda"):
        device = f"cuda:{local_rank}"  # one GPU per process under torchrun
    check_device_available(device or "cpu", f"--device {device}")  # torch alone, not yet what runs models
    if (device or "").startswith("cuda:"):
        import torch

        torch.cuda.set_device(device)  # this process's GPU, before anything allocates on one

    from ._fusion import fuse
    from .hub import from_pretrained
    from .records import made_by
    from .runner import Outputs, only_writer, segment_sources
    from .weights import state_dict_sha256

    outputs = Outputs(out, args.overlay, args.alpha, args.confidence, args.masks)
    options = {"tta": args.tta or None, "mode": "slide" if args.slide else "whole", "engine": args.engine,
               "precision": args.precision}
    model = from_pretrained(args.name, device=device, cache_dir=args.cache_dir)
    made = made_by(args.name, state_dict_sha256(model), model.hub_config(), outputs, options)
    fuse(model)  # this command owns the model for the whole run: its fast path, in place (channels_last on a GPU)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FCNZooError(f"--out {out}: cannot be made ({e.strerror or e}); pass another folder") from e
    # one run at a time into --out on this machine (under torchrun the processes share it: see runner.py)
    with only_writer(out, args.cache_dir) if world == 1 else contextlib.nullcontext():
        totals = segment_sources(model, found.sources, outputs, resume=args.resume, not_inputs=len(found.skipped),
                                 quiet=args.quiet, made=made, num_workers=args.workers, batch_size=args.batch_size,
                                 compile=args.compile, cache_dir=args.cache_dir, **options)
    if rank != 0:  # its failed inputs are told by the first process, in the end line and its exit status:
        return 0  # torchrun would end every process (the first one writing the summary) at a non-zero exit
    already = f", {totals.already} already done" if totals.already else ""  # by an earlier run (--resume)
    line = (f"{totals.done} done{already}, {totals.failed} failed, {totals.skipped} skipped in {totals.elapsed:.1f} s; "
            f"{out / 'summary.csv'}")
    if totals.failed:
        print(f"fcn-zoo: {totals.failed} of {totals.done + totals.failed} inputs failed ({line})", file=sys.stderr)
        return EXIT_FAILED
    if not args.quiet:
        print(line)
    return 0


def cmd_convert(args) -> int:
    from .convert import convert_checkpoint

    out = _new(Path(args.out))
    checkpoint = zoo.checkpoint_for_file(args.src) if args.source == "reference" else None
    provenance = convert_checkpoint(args.src, out, args.source, checkpoint=checkpoint, output_stride=args.output_stride,
                                    parity=not args.no_parity, provenance={"source_file": Path(args.src).name})
    parity = provenance.get("parity")
    why = " (mmsegmentation's needs mmcv's compiled ops)" if args.source == "mmseg" else " (sssegmentation not importable)"
    figures = (f"max abs logit difference {parity['max_abs_diff']:.2e}, label agreement {parity['label_agreement']:.4f} "
               f"vs {parity['implementation']}" if parity else "parity not measured" + (why if "parity" in provenance else ""))
    print(f"{out}: converted ({figures})")
    return 0


def cmd_export(args) -> int:
    from .hub import source_kind

    out = Path(args.out or f"{Path(args.name).name.removesuffix('.pth')}.{args.fmt}")
    if out.is_dir():
        raise FCNZooError(f"--out {out}: is a folder; pass a file name")
    _new(out, "file name")
    source_kind(args.name)  # an unknown name or a missing file, before torch is imported
    _needs(("onnx", "onnxscript"), "export", "fcn-zoo export")
    if not out.parent.is_dir():
        raise FCNZooError(f"--out {out}: the folder {out.parent} does not exist; create it or name another file")
    from .export import export, max_abs_difference
    from .hub import from_pretrained

    model = from_pretrained(args.name, cache_dir=args.cache_dir)
    export(model, out, args.fmt, source=args.name)
    diff = max_abs_difference(model, out, args.fmt)
    check = "not checked (install onnxruntime)" if diff is None else f"max abs logit difference {diff:.2e} vs PyTorch"
    print(f"{out}: written ({check})")
    return 0


def cmd_quantize(args) -> int:
    from .hub import source_kind
    from .inputs import readable_images

    out = _new(Path(args.out))
    if args.num_samples < 1:
        raise FCNZooError(f"--num-samples {args.num_samples}: must be at least 1")
    if args.validation_masks and not args.validation:
        raise FCNZooError("--validation-masks needs --validation: the images the masks belong to")
    source_kind(args.name)
    _needs(("openvino", "nncf"), "int8", "fcn-zoo quantize")
    readable_images(args.calibration, "--calibration")  # an empty or unreadable set is one line before any loading
    validation = readable_images(args.validation, "--validation", args.validation_masks) if args.validation else None
    from .hub import from_pretrained
    from .quantization import quantize, save_new_folder, summary

    model = from_pretrained(args.name, cache_dir=args.cache_dir)
    int8 = quantize(model, args.calibration, num_samples=args.num_samples, validation=validation,
                    progress=not args.quiet, source=args.name)
    save_new_folder(int8, out)
    if args.push_to_hub:
        int8.push_to_hub(args.push_to_hub)
    print(f"{out}: {summary(int8)}" + (f"; uploaded to {args.push_to_hub}" if args.push_to_hub else ""))
    return 0


def cmd_publish(args) -> int:
    from .publish import publish

    if args.name == "all":
        if args.repo_id:
            raise FCNZooError("--repo-id names one repo; with 'all' use --namespace")
        names = list(zoo.CHECKPOINTS)
    else:
        names = [zoo.get_checkpoint(args.name).name]
    def publish_one(name: str) -> None:
        repo_id = args.repo_id or (f"{args.namespace}/{name}" if args.namespace else None)
        publish(name, args.out, repo_id=repo_id, dry_run=args.dry_run, token=args.token)

    return _for_each(names, publish_one, args, "rows", "; rerun the same command to resume")


def _new(out: Path, kind: str = "folder") -> Path:  # --out, which must not exist yet: nothing is overwritten
    if out.exists():
        raise FCNZooError(f"--out {out}: already exists; pass a new {kind} so that nothing is overwritten")
    return out


def _for_each(items: list[str], action, args, what: str, hint: str = "") -> int:
    """Run ``action`` on every item; a failure is one line on stderr and does not stop the others."""
    failed = 0
    for item in items:
        try:
            action(item)
        except Exception as e:
            failed += 1
            report(e, args.debug)
    if failed:
        print(f"fcn-zoo: {failed} of {len(items)} {what} failed{hint}", file=sys.stderr)
    return EXIT_FAILED if failed else 0


def run() -> None:
    """The console script: :func:`main`, then exit without tearing the interpreter down (all is written by then;
    freeing torch's, torchvision's and timm's modules takes 1.4 s of a 10 s one-photo predict: RESULTS.md)."""
    interrupt_on_sigterm()
    code = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):  # a closed pipe, or no stream (>&-)
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
