"""Fine-tuning and evaluation on Hugging Face datasets (``--dataset-name``): a dataset-repo folder of parquet
files, a ``save_to_disk`` folder, the usual column names, id2label.json, --reduce-labels, and the checks
that refuse a malformed dataset before training starts. Offline: the datasets are generated here."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import fcn_zoo

datasets = pytest.importorskip("datasets", reason="the datasets extra (pip install 'fcn-zoo[datasets]')")

from sample_data import HUB_CLASSES, hub_rows, make_hub_dataset  # noqa: E402
from training import evaluate as evaluate_module  # noqa: E402
from training import train as train_module  # noqa: E402
from training.hubdata import reduce_labels_lookup  # noqa: E402

QUICK = ["--device", "cpu", "--num-workers", "0", "--no-progress", "--log-interval", "1"]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """The datasets library's Arrow cache in the test's folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 21-class resnet10t FCN to fine-tune from (a save_pretrained folder)."""
    folder = tmp_path_factory.mktemp("init") / "src"
    torch.manual_seed(0)
    fcn_zoo.FCN(num_classes=21, backbone="resnet10t", head_channels=128, aux_channels=128, dataset="voc").save_pretrained(folder)
    return folder


def test_fine_tuning_on_a_parquet_dataset_folder(tmp_path, source, capsys):
    """Parquet shards under data/ with train and validation splits and id2label.json: 40 iterations reach a
    validation mIoU of 0.80 in about 9 s on a 2-core CPU (floor 0.7); best/ carries the dataset's classes, its card
    the dataset, its fingerprint and columns, and `fcn-zoo evaluate --dataset-name` measures the same."""
    data = make_hub_dataset(tmp_path / "sidewalk", {"train": 32, "validation": 8})
    out = tmp_path / "run"
    assert train_module.main([
        "--init", str(source), "--dataset-name", str(data), "--output-dir", str(out),
        "--max-iters", "40", "--batch-size", "8", "--lr", "0.05", *QUICK,
    ]) == 0
    best = fcn_zoo.from_pretrained(out / "best")
    assert best.class_names == HUB_CLASSES and best.num_classes == 3
    run = json.loads((out / "run.json").read_text())
    record = run["data"]
    assert record["layout"] == "hub" and record["name"] == data.name and record["local_folder"] is True
    assert record["columns"] == {"image": "image", "label": "label"}
    assert (record["train_images"], record["val_images"], record["val_split"]) == (32, 8, "validation")
    card = (out / "best" / "README.md").read_text()
    assert f"a Hugging Face dataset folder `{data.name}`" in card and record["fingerprint"] in card
    assert "datasets:" not in card.split("---")[1]  # a local folder is no Hub dataset: the metadata links none
    assert "columns `image` (images) and `label` (masks)" in card and "| ellipse |" in card

    capsys.readouterr()
    assert evaluate_module.main([str(out / "best"), "--dataset-name", str(data), "--device", "cpu",
                                 "--output-dir", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    provenance = json.loads((out / "best" / "provenance.json").read_text())
    assert report["mIoU"] >= 0.7, report["mIoU"]
    assert abs(100 * report["mIoU"] - provenance["measured_miou"]) < 0.01
    assert report["split"] == "validation" and report["classes"] == HUB_CLASSES


def test_fine_tuning_on_a_saved_dataset_without_a_validation_split(tmp_path, source):
    """A save_to_disk folder with pixel_values/label columns, one split and no id2label.json: the columns are
    found by name, the classes come from --classes (0.77 on the 4 rows held out, floor 0.5), --val-fraction holds rows out (the same ones when
    evaluating), --max-train-samples caps the training rows."""
    data = make_hub_dataset(tmp_path / "saved", {"train": 30}, columns=("pixel_values", "label"), form="disk", id2label=None)
    (tmp_path / "classes.txt").write_text("background 0 0 0\nbox 200 40 40\nellipse 40 200 40\n")
    out = tmp_path / "run"
    assert train_module.main([
        "--init", str(source), "--dataset-name", str(data), "--classes", str(tmp_path / "classes.txt"),
        "--val-fraction", "0.25", "--max-train-samples", "20", "--output-dir", str(out),
        "--max-iters", "30", "--batch-size", "4", "--lr", "0.05", *QUICK,
    ]) == 0
    record = json.loads((out / "run.json").read_text())["data"]
    assert record["columns"] == {"image": "pixel_values", "label": "label"}
    assert record["train_images"] == 20 and record["val_split"] == "held out 0.25 of train"
    held_out = record["val_images"]
    assert 3 <= held_out <= 12  # about a quarter of 30, chosen by row
    best = fcn_zoo.from_pretrained(out / "best")
    assert best.class_names == HUB_CLASSES and best.palette[1] == (200, 40, 40)
    assert evaluate_module.main([str(out / "best"), "--dataset-name", str(data), "--classes", str(tmp_path / "classes.txt"),
                                 "--device", "cpu", "--output-dir", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    provenance = json.loads((out / "best" / "provenance.json").read_text())
    assert report["mIoU"] >= 0.5 and abs(100 * report["mIoU"] - provenance["measured_miou"]) < 0.01


def test_reduce_labels_matches_transformers_formula():
    """0 -> ignore, v -> v - 1, 255 stays ignored: the computation of transformers' example, on every value."""
    raw = np.arange(256, dtype=np.uint8).reshape(16, 16)
    expected = raw.astype(np.int64)
    expected[expected == 0] = 255
    expected = expected - 1
    expected[expected == 254] = 255
    assert np.array_equal(reduce_labels_lookup()[raw], expected.astype(np.uint8))


def _bad_masks(case: str) -> tuple[dict, list[str]]:
    """Validation masks broken one way at row 3, and what the refusal must name."""
    _, masks = hub_rows(6, seed=1)
    if case == "size":
        masks[3] = masks[3].resize((40, 30))
        return {"validation": masks}, ["split 'validation' row 3", "40x30", "80x64"]
    if case == "values":
        masks[3] = Image.fromarray(np.full((64, 80), 7, dtype=np.uint8), mode="L")
        return {"validation": masks}, ["split 'validation' row 3", "[7]", "3 classes"]
    if case == "truncated":  # a whole header, half a body
        encoded = io.BytesIO()
        masks[3].save(encoded, format="PNG")
        masks[3] = {"bytes": encoded.getvalue()[:len(encoded.getvalue()) // 2], "path": None}
        return {"validation": masks}, ["split 'validation' row 3", "column 'label'", "does not decode"]
    if case == "colour":
        grey = np.asarray(masks[3])
        masks[3] = Image.fromarray(np.stack([grey * 60, grey * 20, grey * 90], axis=-1).astype(np.uint8), mode="RGB")
        return {"validation": masks}, ["split 'validation' row 3", "colour image", "RGB"]
    if case == "grey stored as colour":
        masks[3] = masks[3].convert("RGB")
        return {"validation": masks}, ["split 'validation' row 3", "three equal channels", "mask.convert('L')"]
    raise ValueError(case)


@pytest.mark.parametrize("case", ["size", "values", "colour", "grey stored as colour", "truncated"])
def test_a_malformed_row_is_refused_before_training(tmp_path, source, case):
    masks, expected = _bad_masks(case)
    data = make_hub_dataset(tmp_path / "bad", {"train": 6, "validation": 6}, masks=masks)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as refused:
        train_module.main(["--init", str(source), "--dataset-name", str(data), "--output-dir", str(out),
                           "--max-iters", "2", *QUICK])
    message = str(refused.value.code)
    assert message.startswith("python -m training.train: ") and "\n" not in message
    for part in expected:
        assert part in message, (part, message)
    assert not (out / "log.jsonl").exists()  # not one step was taken


def test_reduce_labels_is_applied_before_the_class_check(tmp_path, source):
    """Masks whose 0 is "other" and classes 1..3 (ADE20K's convention), palette PNGs: without
    --reduce-labels value 3 is outside the three classes; with it the values become 255, 0, 1, 2, training
    starts, and best/ takes the colours of mask values 1..3 from the masks' palette."""
    colours = [(9, 9, 9), (10, 20, 30), (40, 50, 60), (70, 80, 90)]
    data = make_hub_dataset(tmp_path / "ade", {"train": 8, "validation": 4}, shift=1,
                            palette=[c for rgb in colours for c in rgb] + [0, 0, 0] * 252)
    with pytest.raises(SystemExit, match=r"split 'train' row \d+: label values \[3\] are outside the 3 classes"):
        train_module.main(["--init", str(source), "--dataset-name", str(data), "--output-dir", str(tmp_path / "a"),
                           "--max-iters", "1", *QUICK])
    _, masks = hub_rows(4, seed=1, shift=1)
    masks[2] = Image.fromarray(np.full((64, 80), 9, dtype=np.uint8), mode="L")
    beyond = make_hub_dataset(tmp_path / "beyond", {"train": 8, "validation": 4}, shift=1, masks={"validation": masks})
    with pytest.raises(SystemExit, match=r"split 'validation' row 2: label values \[9\] after --reduce-labels \[8\] are outside"):
        train_module.main(["--init", str(source), "--dataset-name", str(beyond), "--reduce-labels",
                           "--output-dir", str(tmp_path / "c"), "--max-iters", "1", *QUICK])
    assert train_module.main(["--init", str(source), "--dataset-name", str(data), "--reduce-labels",
                              "--output-dir", str(tmp_path / "b"), "--max-iters", "1", "--batch-size", "2", *QUICK]) == 0
    record = json.loads((tmp_path / "b" / "run.json").read_text())["data"]
    assert record["reduce_labels"] is True
    assert fcn_zoo.from_pretrained(tmp_path / "b" / "best").palette == colours[1:]


@pytest.mark.parametrize("case", ["empty split", "no columns", "no classes", "no validation", "bytes columns", "no folder"])
def test_dataset_level_refusals_name_what_to_do(tmp_path, source, case):
    data = None
    if case == "bytes columns":  # parquet written without Image features (pandas): the images are plain bytes
        import datasets as hf

        (tmp_path / "d" / "data").mkdir(parents=True)
        images, masks = hub_rows(2)
        encoded = [[_png(i) for i in images], [_png(m) for m in masks]]
        hf.Dataset.from_dict({"image": encoded[0], "label": encoded[1]}).to_parquet(str(tmp_path / "d" / "data" / "train-00000-of-00001.parquet"))
        data = tmp_path / "d"
        expected = "column 'image' holds Value('binary'), not images; if it holds encoded images or paths, cast it first"
    elif case == "no folder":
        data = "./no-such-dataset-folder"
        expected = "--dataset-name ./no-such-dataset-folder: no such folder"
    elif case == "empty split":
        data = make_hub_dataset(tmp_path / "d", {"train": 4, "validation": 0})
        expected = "split 'validation' has no rows"
    elif case == "no columns":
        data = make_hub_dataset(tmp_path / "d", {"train": 4, "validation": 2}, columns=("photo", "target"))
        expected = "no image column among its columns (photo, target); name it with --image-column"
    elif case == "no classes":
        data = make_hub_dataset(tmp_path / "d", {"train": 4, "validation": 2}, id2label=None)
        expected = "no class names"
    else:
        data = make_hub_dataset(tmp_path / "d", {"train": 4})
        expected = "no validation split (it has train); hold out part of train with --val-fraction 0.1"
    with pytest.raises(SystemExit) as refused:
        train_module.main(["--init", str(source), "--dataset-name", str(data), "--output-dir", str(tmp_path / "run"),
                           "--max-iters", "1", *QUICK])
    assert expected in str(refused.value.code), refused.value.code


def _png(image: Image.Image) -> bytes:
    encoded = io.BytesIO()
    image.save(encoded, format="PNG")
    return encoded.getvalue()


def test_data_root_and_dataset_name_exclude_each_other(tmp_path, source):
    with pytest.raises(SystemExit, match="give --data-root FOLDER or --dataset-name ID"):
        train_module.main(["--init", str(source), "--output-dir", str(tmp_path / "run"), *QUICK])
    with pytest.raises(SystemExit, match="--reduce-labels is for --dataset-name"):
        train_module.main(["--init", str(source), "--data-root", str(tmp_path), "--reduce-labels",
                           "--output-dir", str(tmp_path / "run"), *QUICK])


def test_named_columns_and_an_id2label_file(tmp_path, source):
    data = make_hub_dataset(tmp_path / "d", {"train": 6, "valid": 2}, columns=("photo", "target"), id2label=None)
    (tmp_path / "names.json").write_text(json.dumps({"0": "sky", "1": "roof", "2": "dome"}))
    out = tmp_path / "run"
    assert train_module.main(["--init", str(source), "--dataset-name", str(data), "--image-column", "photo",
                              "--label-column", "target", "--id2label", str(tmp_path / "names.json"),
                              "--output-dir", str(out), "--max-iters", "1", "--batch-size", "2", *QUICK]) == 0
    record = json.loads((out / "run.json").read_text())["data"]
    assert record["columns"] == {"image": "photo", "label": "target"} and record["val_split"] == "valid"
    assert fcn_zoo.from_pretrained(out / "best").class_names == ["sky", "roof", "dome"]


def test_the_held_out_share_applies_only_where_there_is_no_validation_split(tmp_path, source):
    """A run that held out train rows (--val-fraction) is evaluated on another dataset's own validation
    split, not on held-out rows of it; --val-fraction where a validation split exists is refused."""
    plain = make_hub_dataset(tmp_path / "plain", {"train": 12}, seed=3)
    out = tmp_path / "run"
    assert train_module.main(["--init", str(source), "--dataset-name", str(plain), "--val-fraction", "0.25",
                              "--output-dir", str(out), "--max-iters", "1", "--batch-size", "2", *QUICK]) == 0
    split = make_hub_dataset(tmp_path / "split", {"train": 4, "validation": 3})
    for data, expected in ((split, "validation"), (plain, "held out 0.25 of train")):
        assert evaluate_module.main([str(out / "best"), "--dataset-name", str(data), "--device", "cpu",
                                     "--output-dir", str(tmp_path / data.name)]) == 0
        assert json.loads((tmp_path / data.name / "eval.json").read_text())["split"] == expected
    with pytest.raises(SystemExit, match="has a validation split \\('validation'\\): drop --val-fraction"):
        train_module.main(["--init", str(source), "--dataset-name", str(split), "--val-fraction", "0.25",
                           "--output-dir", str(tmp_path / "again"), "--max-iters", "1", *QUICK])
    with pytest.raises(SystemExit, match="--max-train-samples must be at least 1, got 0"):
        train_module.main(["--init", str(source), "--dataset-name", str(split), "--max-train-samples", "0",
                           "--output-dir", str(tmp_path / "again"), "--max-iters", "1", *QUICK])


def test_evaluate_says_a_bad_row_in_one_line(tmp_path):
    """Evaluation reads each row as it goes: a mask of the wrong size is one line naming the row, and no
    report is written."""
    _, masks = hub_rows(3, seed=1)
    masks[1] = masks[1].resize((40, 30))
    data = make_hub_dataset(tmp_path / "d", {"train": 2, "validation": 3}, masks={"validation": masks})
    torch.manual_seed(0)
    fcn_zoo.FCN(num_classes=3, backbone="resnet10t", head_channels=8, aux_channels=None).save_pretrained(tmp_path / "m")
    with pytest.raises(SystemExit) as refused:
        evaluate_module.main([str(tmp_path / "m"), "--dataset-name", str(data), "--device", "cpu",
                              "--output-dir", str(tmp_path / "eval")])
    assert str(refused.value.code) == (f"python -m training.evaluate: {data} split 'validation' row 1: mask is "
                                       "40x30, its image is 80x64 as displayed")
    assert not (tmp_path / "eval" / "eval.json").exists()


@pytest.mark.slow  # several processes: run after the suite (python -m pytest -q -m slow)
def test_under_torchrun_each_process_checks_its_share_of_the_rows(tmp_path, source):
    """Two gloo processes: a bad row in the second one's share (odd rows) stops the run with its line; on a
    good dataset the class weights from the shares' pixel counts equal one process's."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "datasets_cache")}

    def run(data: Path, out: Path, port: int) -> subprocess.CompletedProcess:
        return subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", str(port), "-m", "training.train",
                               "--init", str(source), "--dataset-name", str(data), "--output-dir", str(out),
                               "--class-weights", "auto", "--max-iters", "1", "--batch-size", "2", *QUICK],
                              cwd=repo, env=env, capture_output=True, text=True, timeout=300)

    masks, expected = _bad_masks("size")
    bad = make_hub_dataset(tmp_path / "bad", {"train": 6, "validation": 6}, masks=masks)
    refused = run(bad, tmp_path / "refused", 29531)
    assert refused.returncode != 0 and not (tmp_path / "refused" / "log.jsonl").exists()
    lines = [line for line in refused.stderr.splitlines() if "split 'validation' row 3: mask is 40x30" in line]
    # the same line from each process that says it before torchrun stops the other (which one first is a race)
    assert lines and len(set(line.split(": ", 1)[-1] for line in lines)) == 1, refused.stderr[-2000:]

    good = make_hub_dataset(tmp_path / "good", {"train": 9, "validation": 4}, seed=5)
    assert run(good, tmp_path / "two", 29532).returncode == 0
    assert train_module.main(["--init", str(source), "--dataset-name", str(good), "--output-dir", str(tmp_path / "one"),
                              "--class-weights", "auto", "--max-iters", "1", "--batch-size", "2", *QUICK]) == 0
    weights = [json.loads((tmp_path / name / "run.json").read_text())["class_weights"] for name in ("one", "two")]
    assert weights[0] == weights[1] and len(set(weights[0])) > 1


def test_each_process_reads_only_its_rows_and_the_shares_add_up(tmp_path, monkeypatch):
    """Process 0 of 2 checks the even rows only: a bad odd row is not its to find (the other process's
    error reaches it through the gather), a bad even row is; the two shares' pixel counts and sizes add
    up to one process's."""
    import torch.distributed as dist

    from training import hubdata

    masks, _ = _bad_masks("size")  # validation row 3 is bad
    data = make_hub_dataset(tmp_path / "d", {"train": 7, "validation": 6}, masks=masks)
    args = train_module.parse_args(["--init", "x", "--dataset-name", str(data), "--output-dir", "o"])
    source = hubdata._Source(args)
    (train_split, train_rows), (val_split, val_rows, _) = source.splits(None)
    train, val = source.dataset(train_split, train_rows), source.dataset(val_split, val_rows)
    good_val = source.dataset(val_split, [0, 1, 2, 4, 5])  # row 3 left out

    others: list = []  # what the other process would have found: (its error, its share)
    monkeypatch.setattr(dist, "all_gather_object", lambda out, mine: out.__setitem__(slice(None), [mine, *others]))
    others[:] = [(None, ((np.zeros(3, np.int64), np.zeros(3, np.int64)), []))]
    hubdata._check_shard(train, val, 3, False, (0, 2))  # rows 0, 2, 4 of validation: no error here
    others[:] = [(("layout", "the other process's error"), None)]
    with pytest.raises(hubdata.DatasetLayoutError, match="the other process's error"):
        hubdata._check_shard(train, val, 3, False, (0, 2))
    with pytest.raises(hubdata.DatasetLayoutError, match="row 3: mask is 40x30"):
        hubdata._check_shard(train, val, 3, False, (1, 2))  # rows 1, 3, 5: its own error

    found = []  # each process's own findings, as it hands them to the gather
    empty = (None, ((np.zeros(3, np.int64), np.zeros(3, np.int64)), []))
    monkeypatch.setattr(dist, "all_gather_object", lambda out, mine: (found.append(mine[1]), out.__setitem__(slice(None), [mine, empty])))
    for rank in (0, 1):
        hubdata._check_shard(train, good_val, 3, False, (rank, 2))
    whole_pixels, whole_sizes = hubdata._check_shard(train, good_val, 3, False, (0, 1))
    assert [len(sizes) for _, sizes in found] == [4, 3]  # rows 0, 2, 4, 6 and 1, 3, 5 of train
    for i in range(2):
        assert np.array_equal(found[0][0][i] + found[1][0][i], whole_pixels[i])
    assert [size for _, size in sorted(found[0][1] + found[1][1])] == whole_sizes


@pytest.mark.parametrize("given,chosen", [
    (["--train-split", "validation"], "the validation split"),
    (["--train-split", "validation", "--val-split", "validation"], "--val-split"),
])
def test_a_split_chosen_for_both_training_and_validation_is_refused(tmp_path, source, given, chosen):
    """Validating on the rows trained on inflates the mIoU: --train-split validation (which the default
    validation split would be) or the same split named twice is one line saying what to do, before training."""
    data = make_hub_dataset(tmp_path / "d", {"train": 4, "validation": 6})
    with pytest.raises(SystemExit) as refused:
        train_module.main(["--init", str(source), "--dataset-name", str(data), *given,
                           "--output-dir", str(tmp_path / "run"), "--max-iters", "1", *QUICK])
    assert str(refused.value.code) == (
        f"python -m training.train: {data}: split 'validation' is both the training split (--train-split) and {chosen}, "
        "so the mIoU would be measured on the rows trained on; name another with --val-split, or hold out part of "
        "'validation' with --val-fraction 0.1")
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_training_on_the_validation_split_holds_out_part_of_it_or_validates_on_another(tmp_path):
    """What the refusal offers: --val-fraction holds rows of the training split out (disjoint from the rows
    trained on), and --val-split names another split."""
    from training import hubdata

    data = make_hub_dataset(tmp_path / "d", {"train": 4, "validation": 6})

    def splits(*given):
        args = train_module.parse_args(["--init", "x", "--dataset-name", str(data), "--output-dir", "o", *given])
        return hubdata._Source(args).splits(args.val_fraction)

    (train_split, train_rows), (val_split, val_rows, how) = splits("--train-split", "validation", "--val-fraction", "0.5")
    assert train_split == val_split == "validation" and how == "held out 0.5 of validation"
    assert train_rows and val_rows and not set(train_rows) & set(val_rows) and len(train_rows) + len(val_rows) == 6
    (train_split, train_rows), (val_split, val_rows, how) = splits("--train-split", "validation", "--val-split", "train")
    assert (train_split, len(train_rows), val_split, len(val_rows), how) == ("validation", 6, "train", 4, "train")


def _recipe_folder(root, images, masks, embed: bool) -> None:
    """docs/training.md's recipe for a dataset folder made from paths (``embed``: with its embedding step)."""
    from datasets.table import embed_table_storage

    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    for split in ("train", "validation"):
        ds = datasets.Dataset.from_dict({"image": images, "label": masks}, features=features)
        if embed:
            ds = ds.with_format("arrow").map(embed_table_storage, batched=True).with_format(None)
        (root / "data").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    (root / "id2label.json").write_text(json.dumps(dict(enumerate(HUB_CLASSES))))


def test_a_dataset_folder_made_from_paths_as_the_docs_say_loads_anywhere(tmp_path, monkeypatch):
    """The documented recipe embeds the images: the folder evaluates after the source files are gone; a folder
    whose rows name files elsewhere is refused in one line, never read from wherever the paths point."""
    import shutil

    monkeypatch.chdir(tmp_path)
    images, masks = hub_rows(3, seed=4)
    (tmp_path / "src").mkdir()
    for i, (image, mask) in enumerate(zip(images, masks)):
        image.save(tmp_path / "src" / f"{i}.jpg")
        mask.save(tmp_path / "src" / f"{i}.png")
    paths = [f"src/{i}.jpg" for i in range(3)], [f"src/{i}.png" for i in range(3)]
    _recipe_folder(tmp_path / "made" / "embedded", *paths, embed=True)
    _recipe_folder(tmp_path / "made" / "paths", *paths, embed=False)
    torch.manual_seed(0)
    fcn_zoo.FCN(num_classes=3, backbone="resnet10t", head_channels=8, aux_channels=None).save_pretrained(tmp_path / "m")
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "made", elsewhere)
    monkeypatch.chdir(elsewhere)  # where the rows' relative paths point at nothing of theirs
    assert evaluate_module.main([str(tmp_path / "m"), "--dataset-name", str(elsewhere / "embedded"), "--device", "cpu",
                                 "--output-dir", str(tmp_path / "eval")]) == 0
    with pytest.raises(SystemExit) as refused:
        evaluate_module.main([str(tmp_path / "m"), "--dataset-name", str(elsewhere / "paths"), "--device", "cpu",
                              "--output-dir", str(tmp_path / "eval2")])
    assert "outside the dataset's folder" in str(refused.value.code) and "embed_table_storage" in str(refused.value.code)


def test_a_path_cell_naming_a_fifo_or_a_file_elsewhere_is_refused_without_reading_it(tmp_path):
    """A row may name any path: only regular files inside the dataset's folder (or the caches) are opened, so a
    FIFO cannot hang the check and a file elsewhere is never read."""
    import os

    from training.data import DatasetLayoutError
    from training.hubopen import cell_source

    folder = tmp_path / "ds"
    folder.mkdir()
    os.mkfifo(folder / "pipe.png")
    (folder / "ok.png").write_bytes(b"\x89PNG")
    (tmp_path / "secret.png").write_bytes(b"\x89PNG")
    roots = (str(folder.resolve()),)
    assert cell_source({"bytes": None, "path": str(folder / "ok.png")}, "row 0", roots) == str((folder / "ok.png").resolve())
    with pytest.raises(DatasetLayoutError, match=r"row 1: .*pipe.png is not an image file"):
        cell_source({"bytes": None, "path": str(folder / "pipe.png")}, "row 1", roots)
    with pytest.raises(DatasetLayoutError, match=r"row 2: names the file .*secret.png outside the dataset's folder"):
        cell_source({"bytes": None, "path": str(folder / ".." / "secret.png")}, "row 2", roots)
    (folder / "linked.png").symlink_to(tmp_path / "secret.png")  # git-annex, DVC: a link inside the folder
    assert cell_source({"bytes": None, "path": str(folder / "linked.png")}, "row 3", roots) == str((tmp_path / "secret.png").resolve())


@pytest.mark.parametrize("splits,given,expected", [
    ({"mytrain": 10, "train": 6}, ["--train-split", "mytrain", "--val-fraction", "0.3"], "held out 0.3 of mytrain"),
    ({"train": 4, "validation": 6}, ["--train-split", "validation", "--val-fraction", "0.5"], "held out 0.5 of validation"),
    ({"train": 4, "validation": 6}, ["--train-split", "validation", "--val-split", "train"], "train"),
], ids=["another-train-split", "held-out-of-validation", "another-val-split"])
def test_evaluate_takes_the_splits_the_model_trained_and_validated_on(tmp_path, source, splits, given, expected):
    """`fcn-zoo evaluate best/ --dataset-name DS` without split options scores the rows the training run
    validated on (its --train-split and --val-split or held-out share, from provenance.json): not held-out
    rows of the default train split, nor a validation split it trained on. The mIoU is the one recorded."""
    data = make_hub_dataset(tmp_path / "d", splits, size=(48, 64))
    out = tmp_path / "run"
    assert train_module.main(["--init", str(source), "--dataset-name", str(data), *given, "--output-dir", str(out),
                              "--max-iters", "1", "--batch-size", "2", "--crop-size", "32", *QUICK]) == 0
    assert evaluate_module.main([str(out / "best"), "--dataset-name", str(data), "--device", "cpu",
                                 "--output-dir", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    provenance = json.loads((out / "best" / "provenance.json").read_text())
    assert report["split"] == expected == provenance["run"]["data"]["val_split"]
    assert report["samples_sha256"] == provenance["run"]["val_samples_sha256"]
    assert abs(100 * report["mIoU"] - provenance["measured_miou"]) < 0.01


def test_an_id2label_file_with_a_negative_id_names_it(tmp_path):
    from training.data import DatasetLayoutError
    from training.hubopen import read_id2label

    path = tmp_path / "id2label.json"
    path.write_text('{"-1": "void", "0": "road"}')
    with pytest.raises(DatasetLayoutError, match=r"class ids must be 0\.\.1; 1 is missing and -1 is not a class id"):
        read_id2label(path)
    path.write_text('{"0": "void", "1": "road"}')
    assert read_id2label(path) == ["void", "road"]


def test_evaluate_reads_the_dataset_as_training_did_without_repeating_its_options(tmp_path):
    """A model trained with --reduce-labels and --classes on a dataset without id2label.json is evaluated there
    with --dataset-name alone: the labels are reduced as in training and the classes are the model's, so the mIoU
    is the one training measured. Before, the classes were missing (an error), and without --reduce-labels the
    masks would be scored unreduced."""
    from conftest import tiny_fcn
    from training import evaluate as evaluate_module
    from training import train as train_module

    data = make_hub_dataset(tmp_path / "d", {"train": 4, "validation": 2}, id2label=None, shift=1)
    (tmp_path / "classes.txt").write_text("background\nbox\nellipse\n")
    init = tmp_path / "init"
    tiny_fcn(num_classes=3, dataset=None).save_pretrained(init)
    out = tmp_path / "run"
    assert train_module.main(["--init", str(init), "--dataset-name", str(data), "--reduce-labels", "--classes",
                              str(tmp_path / "classes.txt"), "--output-dir", str(out), "--max-iters", "1",
                              "--batch-size", "2", "--crop-size", "32", "--device", "cpu", "--num-workers", "0",
                              "--no-progress"]) == 0
    measured = json.loads((out / "best" / "provenance.json").read_text())["measured_miou"]
    assert evaluate_module.main([str(out / "best"), "--dataset-name", str(data), "--device", "cpu",
                                 "--output-dir", str(tmp_path / "eval")]) == 0
    assert round(100 * json.loads((tmp_path / "eval" / "eval.json").read_text())["mIoU"], 2) == measured
