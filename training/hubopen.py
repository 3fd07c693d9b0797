"""Opening a Hugging Face dataset for :mod:`training.hubdata`: the library's load (one line per error), the
image and mask columns, the class names (``--id2label``, ``--classes``, ``id2label.json``) and colours,
and one undecoded ``Image`` cell opened with PIL."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
from pathlib import Path

from PIL import Image

from .data import DatasetLayoutError, read_classes_file

IMAGE_COLUMNS = ("image", "pixel_values", "img")
LABEL_COLUMNS = ("label", "annotation", "mask", "semantic_segmentation", "segmentation")


def import_datasets():
    try:
        import datasets
    except ImportError:
        raise DatasetLayoutError("--dataset-name needs the datasets library: pip install 'fcn-zoo[datasets]'") from None
    return datasets


def open_dataset(datasets, args: argparse.Namespace) -> dict:
    """``{split: Dataset}`` of ``--dataset-name``: a ``save_to_disk`` folder, a dataset-repo folder or a Hub id."""
    name, path = args.dataset_name, Path(args.dataset_name)
    if name.startswith((".", "/", "~")) and not path.expanduser().exists():  # meant as a folder, not a Hub id
        raise DatasetLayoutError(f"--dataset-name {name}: no such folder")
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # its "Generating train split" bars: our own say what is checked
    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            if args.revision or args.dataset_config:
                raise DatasetLayoutError(f"--dataset-name {name}: a save_to_disk folder has one revision and "
                                         "configuration; drop --revision and --dataset-config")
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(name, args.dataset_config, revision=args.revision)
    except DatasetLayoutError:
        raise
    except Exception as e:  # the library's own errors are many; each becomes one line naming the dataset
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = ""
        empty = re.search(r'Instruction "([^"]+)" corresponds to no data', text)
        if empty:  # the library's words for a split without rows
            raise DatasetLayoutError(f"{name} split {empty.group(1)!r} has no rows") from None
        if "scripts are no longer supported" in text.lower():
            hint = "; script datasets load from their parquet conversion: --revision refs/convert/parquet"
        elif "config" in text.lower() and args.dataset_config is None:
            hint = "; name one with --dataset-config"
        raise DatasetLayoutError(f"--dataset-name {name}: cannot load it ({text}){hint}") from None
    finally:
        if bars:
            datasets.enable_progress_bars()
    if isinstance(loaded, datasets.Dataset):
        loaded = {"train": loaded}
    if not loaded:
        raise DatasetLayoutError(f"--dataset-name {name}: the dataset has no splits")
    return dict(loaded)


def columns(table, args: argparse.Namespace, where: str) -> tuple[str, str]:
    names = table.column_names

    def pick(given: str | None, usual: tuple[str, ...], what: str, flag: str) -> str:
        if given:
            if given not in names:
                raise DatasetLayoutError(f"{where}: no column {given!r} for {flag} (its columns: {', '.join(names)})")
            return given
        found = next((c for c in usual if c in names and is_image(table.features[c])), None)
        if found is None:
            near = next((c for c in usual if c in names), None)
            if near is not None:  # the name is there, its feature is not Image (bytes from pandas, a ClassLabel)
                not_images(where, near, table.features[near])
            raise DatasetLayoutError(f"{where}: no {what} column among its columns ({', '.join(names)}); "
                                     f"name it with {flag}")
        return found

    image = pick(args.image_column, IMAGE_COLUMNS, "image", "--image-column")
    label = pick(args.label_column, LABEL_COLUMNS, "mask", "--label-column")
    if image == label:
        raise DatasetLayoutError(f"{where}: the image and the mask cannot both be column {image!r}")
    for column in (image, label):
        if not is_image(table.features[column]):
            not_images(where, column, table.features[column])
    return image, label


def not_images(where: str, column: str, feature) -> None:
    hint = ""
    if type(feature).__name__ == "Value" and getattr(feature, "dtype", "") in ("binary", "large_binary", "string"):
        hint = f"; if it holds encoded images or paths, cast it first: ds.cast_column({column!r}, datasets.Image())"
    raise DatasetLayoutError(f"{where}: column {column!r} holds {feature!r}, not images{hint}")


def is_image(feature) -> bool:
    return type(feature).__name__ == "Image"


def classes(args: argparse.Namespace) -> tuple[list[str], list | None]:
    """Class names and colours: ``--id2label``, ``--classes`` or the dataset's ``id2label.json``. (A mask
    column is an ``Image`` feature: it carries no class names of its own.)"""
    if args.id2label and args.classes:
        raise SystemExit("--id2label and --classes both give the class names; give one")
    if args.classes:
        classes = read_classes_file(args.classes)
        return classes.names, classes.palette
    if args.id2label:
        return read_id2label(Path(args.id2label)), None
    local = Path(args.dataset_name) / "id2label.json"
    if local.is_file():
        return read_id2label(local), None
    if not Path(args.dataset_name).exists():  # a Hub id: its repo's id2label.json
        found = hub_id2label(args.dataset_name, args.revision)
        if found is not None:
            return read_id2label(found), None
    if getattr(args, "model_classes", None):  # evaluate: the classes of the model being evaluated
        return args.model_classes
    raise DatasetLayoutError(f"{args.dataset_name}: no class names (no id2label.json in the dataset); give --id2label FILE "
                             "(JSON {\"0\": \"name\", ...}) or --classes FILE (one name per line)")


def hub_id2label(repo: str, revision: str | None) -> str | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    from fcn_zoo.errors import first_line

    try:
        return hf_hub_download(repo, "id2label.json", repo_type="dataset", revision=revision)
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None
    except (HfHubHTTPError, OSError) as e:
        raise DatasetLayoutError(f"--dataset-name {repo}: cannot fetch its id2label.json ({first_line(e)}); "
                                 "give the class names with --id2label FILE or --classes FILE") from None


def read_id2label(path: Path) -> list[str]:
    """``{"0": "name", "1": ...}``: the names of classes 0..n-1, every index present."""
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
        ids = {int(k): str(v) for k, v in mapping.items()}
    except (OSError, ValueError, AttributeError) as e:
        raise DatasetLayoutError(f"{path}: not an id2label JSON object {{\"0\": \"name\", ...}} ({e})") from None
    missing = sorted(set(range(len(ids))) - set(ids))
    if not ids or missing:
        stray = sorted(set(ids) - set(range(len(ids))))  # a negative or too large id in place of the missing one
        raise DatasetLayoutError(f"{path}: class ids must be 0..{len(ids) - 1}" + (f"; {missing[0]} is missing" if missing else "")
                                 + (f" and {stray[0]} is not a class id" if stray else ""))
    return [ids[i] for i in range(len(ids))]


def mask_palette(table, column: str, num_classes: int, offset: int, where: str) -> list[tuple[int, int, int]] | None:
    """The colours of palette-PNG masks (the first row's palette) for values ``offset`` on, if they are such."""
    if not len(table):
        return None
    name = f"{where} row 0: column {column!r}"
    source = cell_source(table[0][column], name, roots(where.split(" split ")[0]))
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as mask:
            palette = mask.getpalette() if mask.mode == "P" else None
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetLayoutError(f"{name}: cannot read this image ({e})") from None
    if not palette or len(palette) < 3 * (num_classes + offset):
        return None
    return [tuple(palette[3 * i:3 * i + 3]) for i in range(offset, num_classes + offset)]


def roots(dataset_name: str) -> tuple[str, ...]:
    """The folders a row's path cell may name: the dataset's own folder (a local one) and the caches where
    the datasets library and huggingface_hub keep the files of Hub datasets."""
    import huggingface_hub.constants

    folders = [huggingface_hub.constants.HF_HUB_CACHE]
    try:
        import datasets

        folders.append(str(datasets.config.HF_DATASETS_CACHE))
    except ImportError:
        pass
    if Path(dataset_name).expanduser().is_dir():
        folders.append(str(Path(dataset_name).expanduser()))
    return tuple(dict.fromkeys(p for f in folders for p in (os.path.abspath(f), os.path.realpath(f))))


def cell_source(value, where: str, allowed: tuple[str, ...]) -> bytes | str:
    """An undecoded ``Image`` cell (``{"bytes": ..., "path": ...}``) as what :func:`fcn_zoo.images.read_image`
    reads: its bytes, or its path where that is a regular file inside one of the ``allowed`` folders (a row
    naming any other file, a FIFO or a device, is refused: a dataset carries its images)."""
    if isinstance(value, dict) and value.get("bytes") is not None:
        return value["bytes"]
    path = value.get("path") if isinstance(value, dict) else None
    if not path:
        raise DatasetLayoutError(f"{where}: empty (no image)")
    real = os.path.realpath(path)
    named = os.path.abspath(path)  # as named: a link inside the folder (git-annex, DVC) may point elsewhere
    if not any(p.startswith(root.rstrip(os.sep) + os.sep) for root in allowed for p in (named, real)):
        raise DatasetLayoutError(f"{where}: names the file {path} outside the dataset's folder; a dataset carries its "
                                 "images' bytes: make it as docs/training.md says (embed_table_storage before saving)")
    if not os.path.isfile(real):
        raise DatasetLayoutError(f"{where}: {path} is not an image file")
    return real
