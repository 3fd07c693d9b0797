"""``fcn-zoo evaluate --save-predictions``: the files it writes, scored as each benchmark scores them
(cityscapesScripts itself; the ADE20K and VOC devkits' definitions written out here), give evaluate's mIoU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fcn_zoo
from conftest import tiny_fcn
from sample_data import make_ade20k, make_cityscapes, make_generic, make_voc
from training.evaluate import main


def _model(folder: Path, num_classes: int, dataset: str | None, classes: list[int], seed: int = 0) -> str:
    """A random tiny FCN that predicts only ``classes`` (its classifier's other biases pushed down): on the
    generated shapes it gets some pixels right and many wrong, which is what a comparison of metrics needs."""
    model = tiny_fcn(num_classes, dataset, seed)
    with torch.no_grad():
        others = torch.ones(num_classes, dtype=torch.bool)
        others[classes] = False
        model.decode_head[-1].bias[others] = -1e4
    model.eval_size = (128, 64)  # the generated images' own size: no resize
    model.save_pretrained(folder)
    return str(folder)


def _evaluate(model: str, data: Path, tmp_path: Path, *more: str) -> dict:
    assert main([model, "--data-root", str(data), "--device", "cpu", "--output-dir", str(tmp_path / "eval"),
                 "--save-predictions", str(tmp_path / "preds"), *more]) == 0
    return json.loads((tmp_path / "eval" / "eval.json").read_text())


def _mixed(report: dict) -> None:
    """The prediction is neither one class nor all wrong, so that agreeing means something."""
    iou = np.array(report["IoU"], dtype=float)
    assert np.sum(~np.isnan(iou)) >= 3 and np.nanmax(iou) > 0.05 and 0 < report["mIoU"] < 0.9, iou


def test_cityscapes_predictions_are_label_ids_that_cityscapesscripts_scores_as_evaluate_does(tmp_path, capsys):
    official = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    from cityscapesscripts.helpers.labels import labels
    from training.layouts import CITYSCAPES_TRAIN_IDS

    assert CITYSCAPES_TRAIN_IDS == {l.id: l.trainId for l in labels if not l.ignoreInEval}  # the mapping is theirs
    data = make_cityscapes(tmp_path / "data", n_train=0, n_val=3)
    # road, building, person, car are in the ground truth; pole is not (false positives only)
    report = _evaluate(_model(tmp_path / "m", 19, "cityscapes", [0, 2, 5, 11, 13]), data, tmp_path)
    _mixed(report)

    # found as the official script finds a prediction for each ground-truth file: by the city_seq_frame core
    args = official.CArgs()
    args.__dict__.update(vars(official.args))
    args.predictionPath, args.predictionWalk = str(tmp_path / "preds"), None
    gt = sorted(str(p) for p in (data / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"))
    found = [official.getPrediction(args, g) for g in gt]
    assert [Path(p).name for p in found] == [Path(g).name.replace("_gtFine_labelIds", "_leftImg8bit") for g in gt]
    for p, g in zip(found, gt):
        pred = Image.open(p)
        assert pred.mode == "L" and pred.size == Image.open(g).size
        assert set(np.unique(np.asarray(pred)).tolist()) <= {7, 11, 17, 24, 26}  # label ids, not train ids

    args.evalInstLevelScore, args.JSONOutput, args.quiet, args.colorized = False, False, True, False
    theirs = official.evaluateImgLists(found, gt, args)
    assert theirs["averageScoreClasses"] == pytest.approx(report["mIoU"], abs=1e-4)
    assert report["official"]["mIoU"] == pytest.approx(report["mIoU"], abs=1e-4)
    assert np.allclose(np.array(report["official"]["IoU"], dtype=float), np.array(report["IoU"], dtype=float), atol=1e-4, equal_nan=True)
    said = capsys.readouterr().out
    assert f"cityscapesScripts mIoU {100 * theirs['averageScoreClasses']:.2f} on the saved predictions" in said
    assert report["definition"]["ignore_index"] == 255 and "summed over the dataset" in report["definition"]["mIoU"]


def _ade_devkit_iou(pairs) -> np.ndarray:
    """The scene-parsing devkit's ``intersectionAndUnion`` (histograms of classes 1..150) summed over the
    images: IoU per class, NaN for a class with no pixels. ``pairs``: (prediction, annotation) arrays."""
    num_classes, edges = 150, (1, 150)
    intersection, union = np.zeros(num_classes), np.zeros(num_classes)
    for pred, gt in pairs:
        pred = pred * (gt > 0)  # predictions on "other" (0) are not counted
        hit = np.histogram(pred[pred == gt], bins=num_classes, range=edges)[0]
        intersection += hit
        union += np.histogram(pred, bins=num_classes, range=edges)[0] + np.histogram(gt, bins=num_classes, range=edges)[0] - hit
    return np.where(union > 0, intersection / np.maximum(union, 1), np.nan)


def test_ade20k_predictions_are_classes_1_to_150_that_the_devkits_definition_scores_as_evaluate_does(tmp_path):
    data = make_ade20k(tmp_path / "data", n_train=0, n_val=3)
    report = _evaluate(_model(tmp_path / "m", 150, "ade20k", [0, 1, 2, 3], seed=1), data, tmp_path)
    _mixed(report)
    annotations = sorted((data / "ADEChallengeData2016" / "annotations" / "validation").glob("*.png"))
    pairs = []
    for annotation in annotations:
        pred = Image.open(tmp_path / "preds" / annotation.name)
        assert pred.mode == "L" and pred.size == Image.open(annotation).size
        pred, gt = np.asarray(pred), np.asarray(Image.open(annotation))
        assert pred.min() >= 1 and pred.max() <= 4  # the model's 0..3 plus one
        pairs.append((pred, gt))
    iou = _ade_devkit_iou(pairs)
    # the devkit averages all 150 classes (each occurs in the real val set); one with no pixels has no IoU here
    assert np.nanmean(iou) == pytest.approx(report["mIoU"], abs=1e-4)
    assert np.allclose(iou, np.array(report["IoU"], dtype=float), atol=1e-4, equal_nan=True)


def test_voc_predictions_are_palette_pngs_that_the_devkits_definition_scores_as_evaluate_does(tmp_path):
    data = make_voc(tmp_path / "data", n_train=0, n_val=3)
    report = _evaluate(_model(tmp_path / "m", 21, "voc", [0, 1, 2, 3, 4], seed=2), data, tmp_path)
    _mixed(report)
    ids = (data / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    pairs = []
    for i in ids:
        pred = Image.open(tmp_path / "preds" / f"{i}.png")
        assert pred.mode == "P" and pred.getpalette()[:63] == [c for rgb in fcn_zoo.DATASETS["voc"].palette for c in rgb]
        gt = np.asarray(Image.open(data / "VOCdevkit" / "VOC2012" / "SegmentationClass" / f"{i}.png"))
        pairs.append((np.asarray(pred), gt))
    # VOCevalseg: one confusion matrix over the images, pixels whose ground truth is 255 left out
    kept = [(pred[gt < 255], gt[gt < 255]) for pred, gt in pairs]
    confusion = sum(np.bincount(gt.astype(int) * 21 + pred, minlength=21 * 21).reshape(21, 21) for pred, gt in kept)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    assert np.nanmean(iou) == pytest.approx(report["mIoU"], abs=1e-4)
    assert np.allclose(iou, np.array(report["IoU"], dtype=float), atol=1e-4, equal_nan=True)


def test_a_folder_that_holds_files_is_refused_unless_asked_to_overwrite(tmp_path):
    from training.data import read_classes_file

    data = make_generic(tmp_path / "data", n_train=0, n_val=2, nested=True)
    model = _model(tmp_path / "m", 3, None, [0, 1, 2])
    (tmp_path / "preds").mkdir()
    (tmp_path / "preds" / "old.png").write_bytes(b"")
    with pytest.raises(SystemExit) as refused:  # said before the model or the data is read
        main(["no-such-model", "--data-root", str(data), "--save-predictions", str(tmp_path / "preds")])
    assert str(refused.value.code) == (
        f"python -m training.evaluate: {tmp_path / 'preds'}: not empty; name a new or empty folder for "
        "--save-predictions, or add --overwrite-predictions to write over its files")
    report = _evaluate(model, data, tmp_path, "--overwrite-predictions")
    # your folder's layout: the image's path under images/val kept, and the classes beside the files
    assert sorted(p.relative_to(tmp_path / "preds").as_posix() for p in (tmp_path / "preds").rglob("*.png")) == [
        "a/0001.png", "b/0000.png", "old.png"]
    assert read_classes_file(tmp_path / "preds" / "classes.txt").names == ["background", "box", "ellipse"]
    assert report["predictions"] == {"folder": str(tmp_path / "preds"), "files": 2,
                                     "format": "<image id>.png, palette PNG of class indices, and classes.txt"}


def _zip_matches_folder(archive: Path, folder: Path, names: list[str]) -> None:
    """The zip holds exactly ``names``, each the bytes of the folder's file."""
    import zipfile

    with zipfile.ZipFile(archive) as zf:
        assert sorted(zf.namelist()) == sorted(names)
        for name in names:
            assert zf.read(name) == (folder / name).read_bytes()


def test_a_cityscapes_test_split_gives_a_submission_folder_and_its_zip(tmp_path, capsys):
    data = make_cityscapes(tmp_path / "data", n_train=0, n_val=0, n_test=3)  # images alone: no gtFine/test
    model = _model(tmp_path / "m", 19, "cityscapes", [0, 2, 5, 11, 13])
    preds = tmp_path / "sub"
    with pytest.raises(SystemExit) as refused:  # nothing to score: said at once, nothing made
        main([model, "--data-root", str(data), "--split", "test", "--save-predictions", str(preds)])
    assert "the test split has no labels to score; add --format-only" in str(refused.value.code)
    with pytest.raises(SystemExit) as refused:
        main([model, "--data-root", str(data), "--split", "test", "--format-only"])
    assert "name their folder with --save-predictions DIR" in str(refused.value.code)
    with pytest.raises(SystemExit) as refused:  # a model of other classes: said before any folder is made
        main([_model(tmp_path / "m21", 21, "voc", [0]), "--data-root", str(data), "--split", "test", "--format-only",
              "--save-predictions", str(preds / "deeper")])
    assert "predicts 21 classes" in str(refused.value.code) and "fine-tunes one on them" in str(refused.value.code)
    assert not preds.exists()

    assert main([model, "--data-root", str(data), "--device", "cpu", "--split", "test", "--format-only",
                 "--save-predictions", str(preds), "--output-dir", str(tmp_path / "eval")]) == 0
    images = sorted((data / "leftImg8bit" / "test").glob("*/*_leftImg8bit.png"))
    names = sorted(p.name for p in preds.iterdir())
    assert names == [p.name for p in images]  # the city_seq_frame names cityscapesScripts and the server find
    loaded = fcn_zoo.from_pretrained(model)
    to_label_id = np.array([7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33], dtype=np.uint8)
    for image in images:  # predict's answer, as label ids
        assert np.array_equal(np.asarray(Image.open(preds / image.name)), to_label_id[loaded.predict(image).labels])
    _zip_matches_folder(tmp_path / "sub.zip", preds, names)
    said = capsys.readouterr().out
    assert f"wrote {tmp_path / 'sub.zip'} (3 files); upload it at https://www.cityscapes-dataset.com/submit/" in said
    assert not (tmp_path / "eval").exists()  # nothing scored, no report

    (tmp_path / "again.zip").write_bytes(b"kept")
    with pytest.raises(SystemExit) as refused:  # a zip is not written over unless asked
        main([model, "--data-root", str(data), "--split", "test", "--format-only", "--save-predictions", str(tmp_path / "again")])
    assert f"{tmp_path / 'again.zip'}: exists" in str(refused.value.code)
    assert (tmp_path / "again.zip").read_bytes() == b"kept"


def test_voc_test_predictions_are_in_the_devkits_results_layout_in_a_tar(tmp_path, capsys):
    import tarfile

    data = make_voc(tmp_path / "data", n_train=0, n_val=1, n_test=2)
    model = _model(tmp_path / "m", 21, "voc", [0, 1, 2, 3, 4], seed=2)
    assert main([model, "--data-root", str(data), "--device", "cpu", "--split", "test", "--format-only",
                 "--save-predictions", str(tmp_path / "sub")]) == 0
    ids = (data / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "test.txt").read_text().split()
    names = [f"results/VOC2012/Segmentation/comp6_test_cls/{i}.png" for i in ids]
    assert sorted(p.relative_to(tmp_path / "sub").as_posix() for p in (tmp_path / "sub").rglob("*.png")) == names
    assert all(Image.open(tmp_path / "sub" / n).mode == "P" for n in names)
    with tarfile.open(tmp_path / "sub.tar.gz") as tar:  # the VOC server takes a tar of the results tree
        assert sorted(tar.getnames()) == names
        assert all(tar.extractfile(n).read() == (tmp_path / "sub" / n).read_bytes() for n in names)
    said = capsys.readouterr().out
    assert f"wrote {tmp_path / 'sub.tar.gz'} (2 files); upload it at http://host.robots.ox.ac.uk:8080/" in said

    assert main([model, "--data-root", str(data), "--device", "cpu", "--split", "test", "--format-only", "--max-samples",
                 "1", "--save-predictions", str(tmp_path / "part")]) == 0
    assert "the first 1 images only (--max-samples): a server scores the whole split" in capsys.readouterr().out


def test_ade20ks_test_images_alone_and_your_folders_test_split(tmp_path, capsys):
    root = tmp_path / "ade"  # release_test.zip unpacked alone: told as ADE20K by its folder
    (root / "release_test" / "testing").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((40, 56, 3), 60 * i, np.uint8)).save(root / "release_test" / "testing" / f"ADE_test_{i:08d}.jpg")
    model = _model(tmp_path / "m150", 150, "ade20k", [0, 1, 2, 3], seed=1)
    assert main([model, "--data-root", str(root), "--device", "cpu", "--split", "test", "--format-only",
                 "--save-predictions", str(tmp_path / "ade-sub")]) == 0
    for i in range(2):
        pred = np.asarray(Image.open(tmp_path / "ade-sub" / f"ADE_test_{i:08d}.png"))
        assert pred.shape == (40, 56) and pred.min() >= 1 and pred.max() <= 4  # classes 1..150
    _zip_matches_folder(tmp_path / "ade-sub.zip", tmp_path / "ade-sub", [f"ADE_test_{i:08d}.png" for i in range(2)])

    data = make_generic(tmp_path / "data", n_train=2, n_val=0, val=False)
    for kind in ("images", "masks"):  # images/ and masks/ without split folders: val is held out of them
        (data / kind / "train").rename(data / f"{kind}-flat")
        (data / kind).rmdir()
        (data / f"{kind}-flat").rename(data / kind)
    (data / "images" / "test").mkdir()
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(data / "images" / "test" / "new.jpg")
    model = _model(tmp_path / "m3", 3, None, [0, 1, 2])
    assert main([model, "--data-root", str(data), "--device", "cpu", "--split", "test", "--format-only",
                 "--save-predictions", str(tmp_path / "mine")]) == 0
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["classes.txt", "new.png"]
    assert "no benchmark server scores a generic dataset" in capsys.readouterr().out
    # the test images are not training images without masks
    assert main([model, "--data-root", str(data), "--device", "cpu", "--val-fraction", "0.5",
                 "--output-dir", str(tmp_path / "eval")]) == 0
    with pytest.raises(SystemExit) as refused:
        main([model, "--dataset-name", str(tmp_path), "--split", "test", "--format-only", "--save-predictions", str(tmp_path / "x")])
    assert "--split test reads a --data-root layout" in str(refused.value.code)


def test_tta_is_reported_beside_single_scale_from_the_same_passes(tmp_path):
    data = make_voc(tmp_path / "data", n_train=0, n_val=3)
    model = _model(tmp_path / "m", 21, "voc", [0, 1, 2, 3, 4], seed=2)
    plain = _evaluate(model, data, tmp_path / "plain")
    both = _evaluate(model, data, tmp_path / "tta", "--tta")
    # the single-scale figures are those of an evaluation without TTA, exactly
    assert {k: both["single_scale"][k] for k in ("mIoU", "aAcc", "pixels")} == {k: plain[k] for k in ("mIoU", "aAcc", "pixels")}
    assert both["mIoU"] != plain["mIoU"]  # the multi-scale + flip figure is its own
    assert both["tta"]["scales"] == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75] and both["tta"]["flip"] is True
    assert plain["tta"] is False and "single_scale" not in plain
