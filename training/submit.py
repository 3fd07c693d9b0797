"""What ``fcn-zoo evaluate --save-predictions DIR`` writes: each evaluated image's prediction as its dataset's
official tools take it, at the image's own size, and for Cityscapes the official evaluator's figure on them.

- cityscapes: ``DIR/<city>_<seq>_<frame>_leftImg8bit.png`` holding label ids (the 19 train ids mapped back to
  the 34 label ids), found by cityscapesScripts' ``evalPixelLevelSemanticLabeling`` by the ``city_seq_frame``
  core of the name;
- ade20k: ``DIR/<image id>.png``, uint8 classes 1..150 (the model's 0..149 plus one; 0 is "other", which the
  scene-parsing devkit drops from the ground truth);
- voc: ``DIR/<image id>.png``, palette PNGs (the VOC colour map) holding class indices 0..20; for the test
  split in the devkit's results layout, ``DIR/results/VOC2012/Segmentation/comp6_test_cls/<image id>.png``
  (comp6: trained on data beyond VOC's own, as the zoo's rows are, on SBD's trainaug);
- generic (your folder) and hub (a Hugging Face dataset): ``DIR/<image id>.png``, palette PNGs holding class
  indices (an image's path under ``images/<split>`` is kept; a dataset row is named by its row number), and
  ``DIR/classes.txt`` (``name R G B`` per class, the format of the generic layout).

With ``--format-only`` (on any split; the test split's is the submission), :func:`archive` packs the files of
VOC, ADE20K and Cityscapes as their servers take them beside the folder (``DIR.zip``; VOC's server takes a tar:
``DIR.tar.gz``), and says where to upload it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from fcn_zoo._files import atomic_path, writable
from fcn_zoo.errors import FCNZooError
from fcn_zoo.images import save_image
from fcn_zoo.metrics import IGNORE_INDEX
from fcn_zoo.zoo import DATASETS

# VOC's test predictions, in the devkit's results layout
VOC_TEST_RESULTS = "results/VOC2012/Segmentation/comp6_test_cls/"
# what each layout's files hold, for eval.json
FORMATS = {
    "cityscapes": "cityscapesScripts: <city>_<seq>_<frame>_leftImg8bit.png, label ids (train ids mapped back)",
    "ade20k": "ADE20K scene-parsing devkit: <image id>.png, uint8 classes 1..150",
    "voc": "PASCAL VOC devkit: <image id>.png, palette PNG of class indices 0..20",
    "generic": "<image id>.png, palette PNG of class indices, and classes.txt",
    "hub": "<row>.png, palette PNG of class indices, and classes.txt",
}


# where each benchmark's server takes the zip of its test split's predictions
SERVERS = {
    "cityscapes": "https://www.cityscapes-dataset.com/submit/ (pixel-level semantic labeling; log in first)",
    "voc": "http://host.robots.ox.ac.uk:8080/ (PASCAL VOC evaluation server: VOC2012, Segmentation, comp6)",
    "ade20k": "the scene-parsing benchmark, as http://sceneparsing.csail.mit.edu says (ADE20K's test labels are not public)",
}


def check_folder(folder: Path, overwrite: bool, archive: str | None = None) -> None:
    """Refuse ``folder`` for predictions where it holds files already, unless ``overwrite`` (then files of the
    same names are replaced and any others are left as they are); nothing is created (:func:`make_folder` does,
    once the data and the model have loaded). ``archive``: the layout whose archive :func:`archive` writes
    beside the folder; one that exists is refused the same way."""
    if folder.exists() and not folder.is_dir():
        raise FCNZooError(f"{folder}: is a file; pass --save-predictions a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise FCNZooError(f"{folder}: not empty; name a new or empty folder for --save-predictions, "
                          "or add --overwrite-predictions to write over its files")
    if archive and archive_path(folder, archive).exists() and not overwrite:
        raise FCNZooError(f"{archive_path(folder, archive)}: exists; name another --save-predictions folder, or add "
                          "--overwrite-predictions to replace it")


def make_folder(folder: Path) -> None:
    """Create the predictions' folder, checked writable."""
    writable(folder, "the predictions' folder", "pass --save-predictions a writable folder")


def archive_path(folder: Path, layout: str) -> Path:
    """Where :func:`archive` writes ``folder``'s archive: beside it, ``DIR.zip`` (VOC: ``DIR.tar.gz``)."""
    folder = Path(folder).absolute()
    return folder.with_name(folder.name + (".tar.gz" if layout == "voc" else ".zip"))


def archive(writer: "PredictionWriter", count: int, split: str, complete: bool = True) -> str:
    """The files ``writer`` wrote for samples ``0..count-1``, packed as their benchmark's server takes them (paths
    relative to the folder: VOC's ``results/VOC2012/...`` tree in a tar.gz, the others' files in a zip); the line
    that says where to upload it (``complete``: every sample of the split was written, else the archive is said to
    be partial). Written beside its final name and renamed: a failed or interrupted run leaves no half archive.
    The generic and hub layouts have no server: their folder is all."""
    if writer.layout not in SERVERS:
        return f"no benchmark server scores a {writer.layout} dataset: {writer.folder} holds the predictions and classes.txt"
    path = archive_path(writer.folder, writer.layout)
    partial = path.with_name(f".{path.name}.partial")
    names = [writer.name(i) for i in range(count)]
    try:
        if writer.layout == "voc":
            with tarfile.open(partial, "w:gz") as tar:
                for name in names:
                    tar.add(writer.folder / name, name)
        else:
            with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED) as zf:  # PNGs are compressed already
                for name in names:
                    zf.write(writer.folder / name, name)
        os.replace(partial, path)
    except OSError as e:
        raise FCNZooError(f"{path}: could not be written ({e.strerror or e}); the predictions are in {writer.folder}") from e
    finally:  # failed or interrupted (Ctrl-C): no half archive left beside the final name
        partial.unlink(missing_ok=True)
    if not complete:
        where = f"the first {count} images only (--max-samples): a server scores the whole split"
    elif split == "test":
        where = f"upload it at {SERVERS[writer.layout]}"
    else:
        where = f"a server scores the test split only (this is {split}: evaluate it here)"
    return f"wrote {path} ({count} file{'s' if count != 1 else ''}); {where}"


class PredictionWriter:
    """Writes sample ``index``'s predicted labels (a ``(H, W)`` array of class indices at the image's size)
    under ``folder`` in the format of ``layout`` (voc, ade20k, cityscapes, generic or hub); call it with
    ``(index, labels)``. ``palette``: the colours of the palette PNGs (VOC's colour map for voc); ``split``:
    the dataset's split (VOC's test predictions go in the devkit's results layout)."""

    def __init__(self, folder: Path, dataset, layout: str, palette, split: str = "val"):
        if layout not in FORMATS:
            raise ValueError(f"unknown layout {layout!r}; use one of {', '.join(FORMATS)}")
        if dataset.num_classes > 256:
            raise FCNZooError(f"{dataset.num_classes} classes do not fit a PNG of class indices (256 at most)")
        self.folder, self.dataset, self.layout = Path(folder), dataset, layout
        self.prefix = VOC_TEST_RESULTS if layout == "voc" and split == "test" else ""
        self.palette = DATASETS["voc"].palette if layout == "voc" else palette
        if layout == "cityscapes":  # train id -> label id: the inverse of the dataset's own label id -> train id
            self.label_ids = np.zeros(256, dtype=np.uint8)
            for label_id, train_id in enumerate(dataset.lookup.tolist()):
                if train_id != IGNORE_INDEX:
                    self.label_ids[train_id] = label_id

    def name(self, index: int) -> str:
        """Sample ``index``'s file, relative to the folder."""
        if self.layout == "hub":
            return f"{self.dataset.rows[index]:06d}.png"
        if self.layout == "generic":
            return f"{self.dataset.ids[index]}.png"
        # the image's name: <id>.jpg, <...>_leftImg8bit.png
        return f"{self.prefix}{Path(self.dataset.samples[index][0]).stem}.png"

    def write_classes(self) -> None:
        """``classes.txt`` for generic and hub (the other layouts' classes are the benchmark's own)."""
        if self.layout in ("generic", "hub"):
            lines = [f"{name} {r} {g} {b}" for name, (r, g, b) in zip(self.dataset.class_names, self.palette)]
            with atomic_path(self.folder / "classes.txt") as tmp:  # a reader never sees half the classes
                tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def __call__(self, index: int, labels: np.ndarray) -> None:
        path = self.folder / self.name(index)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(self.encode(labels), path)

    def encode(self, labels: np.ndarray) -> Image.Image:
        """``labels`` (class indices) as the PNG image this layout's tools read."""
        if self.layout == "cityscapes":
            return Image.fromarray(self.label_ids[labels], mode="L")
        if self.layout == "ade20k":
            return Image.fromarray((labels.astype(np.uint8) + 1), mode="L")
        img = Image.fromarray(labels.astype(np.uint8), mode="P")
        img.putpalette([c for rgb in self.palette for c in rgb])
        return img


def cityscapes_official(predictions: list[Path], ground_truth: list[Path], label_ids: list[int]) -> dict | None:
    """cityscapesScripts' ``evaluateImgLists`` on saved label-id predictions and the gtFine ``*_labelIds.png``
    files, in order: its mIoU (``averageScoreClasses``) and IoU of each of ``label_ids`` (the label id of each
    train id, :attr:`PredictionWriter.label_ids`); ``None`` where cityscapesscripts
    is not installed. It leaves pixels whose ground truth is ignored out of the false positives and skips
    classes with no pixels, as our confusion matrix does, so the two agree to float rounding."""
    try:
        from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official
    except ImportError:
        return None
    except ValueError as e:  # at import, a $CITYSCAPES_EXPORT_DIR that is not a folder
        return {"evaluator": "cityscapesscripts", "error": str(e)}
    from importlib.metadata import version

    args = copy.copy(official.args)  # the module's settings object; its own stays as it was
    args.evalInstLevelScore = False  # nIoU needs the gtFine instanceIds files
    args.evalPixelAccuracy = False
    args.JSONOutput = False  # else it writes a results file under $CITYSCAPES_DATASET
    args.quiet, args.colorized, args.bold, args.nocol = True, False, "", ""
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said):  # it prints its errors, then exits
            result = official.evaluateImgLists([str(p) for p in predictions], [str(g) for g in ground_truth], args)
    except SystemExit:
        lines = said.getvalue().strip().splitlines() or ["(nothing said)"]
        return {"evaluator": f"cityscapesscripts {version('cityscapesscripts')}", "error": lines[-1]}
    return {
        "evaluator": f"cityscapesscripts {version('cityscapesscripts')} evalPixelLevelSemanticLabeling.evaluateImgLists",
        "mIoU": float(result["averageScoreClasses"]),
        "IoU": [float(result["classScores"][official.id2label[i].name]) for i in label_ids],
    }


__all__ = ["FORMATS", "SERVERS", "PredictionWriter", "archive", "archive_path", "check_folder", "cityscapes_official",
           "make_folder"]
