"""Fine-tuning on the user's own data and classes: the generic layout, --init from anything loadable,
a best/ folder that stands alone, evaluation on the same data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fcn_zoo
from conftest import serve_folder, tiny_fcn
from sample_data import make_generic
from reference import build_reference_fcn, save_reference_checkpoint
from training import evaluate as evaluate_module
from training import train as train_module
from training.sources import build_dataset
from training.evaluate import evaluate
from training.data import median_frequency_weights
from training.generic import splits

QUICK = ["--device", "cpu", "--num-workers", "0", "--no-progress", "--log-interval", "1"]


def test_fine_tuning_learns_the_users_classes_and_best_stands_alone(tmp_path, capsys):
    """A 21-class resnet10t FCN fine-tuned on a 3-class generated dataset (one folder, 20% held out):
    60 iterations reach a val mIoU of 0.88 on a 2-core CPU in about 30 s."""
    data = make_generic(tmp_path / "data", n_train=40, n_val=0, val=False, nested=True)
    torch.manual_seed(0)
    fcn_zoo.FCN(num_classes=21, backbone="resnet10t", head_channels=128, aux_channels=128, dataset="voc").save_pretrained(tmp_path / "src")
    out = tmp_path / "run"
    assert train_module.main([
        "--init", str(tmp_path / "src"), "--data-root", str(data), "--output-dir", str(out), "--val-fraction", "0.2",
        "--max-iters", "60", "--batch-size", "8", "--lr", "0.05", *QUICK,
    ]) == 0
    printed = capsys.readouterr()
    assert "21 classes" in printed.err  # the re-initialised classifiers are logged
    last_line = printed.out.strip().splitlines()[-1]  # the run ends saying how it did and where the result is
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if "mIoU" in line]
    assert f"final mIoU {100 * log[-1]['mIoU']:.2f} (iteration 60)" in last_line
    assert f"best {100 * max(r['mIoU'] for r in log):.2f}" in last_line
    assert str(out / "last") in last_line and str(out / "best") in last_line

    best = fcn_zoo.from_pretrained(out / "best")
    assert best.class_names == ["background", "box", "ellipse"] and best.palette[1] == (200, 40, 40)
    val = build_dataset("generic", data, "val", val_fraction=0.2)
    results = evaluate(best, val, progress=False)
    assert results["mIoU"] >= 0.8, results

    # the loaded folder predicts with the dataset's names and colours
    image, label = val[0]
    seg = best.predict(image.permute(1, 2, 0).numpy())
    assert set(seg.class_shares()) <= {"background", "box", "ellipse"}
    assert (seg.labels == label.numpy()).mean() > 0.8
    colours = np.asarray(seg.colorize().convert("RGB"))
    for index, colour in enumerate([(0, 0, 0), (200, 40, 40), (40, 200, 40)]):
        assert (colours[seg.labels == index] == colour).all()

    card = (out / "best" / "README.md").read_text()
    run = json.loads((out / "run.json").read_text())
    assert "datasets:" not in card.split("---")[1]  # a folder is no Hub dataset: the metadata links none
    assert f"{100 * results['mIoU']:.2f} (measured" in card
    assert "| box |" in card and "Per-class IoU" in card
    assert run["data"]["val_images"] == len(val) and run["data"]["train_images"] == 40 - len(val)
    assert run["data"]["val_sha256"] in card and run["data"]["train_sha256"] in card
    assert f"from `{tmp_path / 'src'}` (21 classes; its two classifiers re-initialised" in card

    # evaluate on the same data: the held-out share comes from the training run
    capsys.readouterr()
    assert evaluate_module.main([str(out / "best"), "--data-root", str(data), "--output-dir", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert abs(report["mIoU"] - results["mIoU"]) < 1e-9 and report["classes"] == ["background", "box", "ellipse"]
    assert "ellipse" in printed and f"mIoU {100 * results['mIoU']:.2f}" in printed


def _break(root: Path, case: str) -> str:
    """Damage a generic dataset one way; return what the error must name."""
    train = root / "images" / "train"
    if case == "value outside the classes":
        mask = np.zeros((64, 80), np.uint8)
        mask[5, 5] = 7
        Image.fromarray(mask).save(root / "masks" / "train" / "0001.png")
        return "0001.png: label values [7] are outside the 3 classes of classes.txt"
    if case == "image without mask":
        (root / "masks" / "train" / "0002.png").unlink()
        return "0002.jpg: has no mask"
    if case == "mask without image":
        (train / "0002.jpg").unlink()
        return "0002.png: has no image"
    if case == "size mismatch":
        Image.new("L", (40, 32)).save(root / "masks" / "val" / "0005.png")
        return "0005.png: mask is 40x32, its image 0005.jpg is 80x64"
    if case == "empty split":
        for kind in ("images", "masks"):
            for f in (root / kind / "val").iterdir():
                f.unlink()
        return "no images (.jpg, .png, ...) in the val split"
    if case == "colour mask":
        Image.new("RGB", (80, 64), (200, 40, 40)).save(root / "masks" / "train" / "0003.png")
        return "0003.png: a mask holds one class index per pixel"
    if case == "no val split":
        for kind in ("images", "masks"):
            for f in (root / kind / "val").iterdir():
                f.rename(root / kind / "train" / f.name)
            (root / kind / "val").rmdir()
        return "--val-fraction 0.1"
    if case == "two images of one id":
        (train / "0001.png").write_bytes((train / "0001.jpg").read_bytes())
        return f"{train / '0001.jpg'} and {train / '0001.png'}: two images of one id '0001'; keep one of them"
    if case == "classes without colours on every line":
        (root / "classes.txt").write_text("background 0 0 0\nbox\nellipse 1 2 3\n")
        return "class 1 (box) has no colour"
    raise AssertionError(case)


@pytest.mark.parametrize("case", [
    "value outside the classes", "image without mask", "mask without image", "size mismatch", "empty split",
    "colour mask", "no val split", "classes without colours on every line", "two images of one id",
])
def test_a_malformed_dataset_is_one_line_naming_the_file_before_training(tmp_path, tiny_folder, case):
    data = make_generic(tmp_path / "data", n_train=4, n_val=2)
    expected = _break(data, case)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as raised:
        train_module.main(["--init", str(tiny_folder), "--data-root", str(data), "--output-dir", str(out), *QUICK])
    message = str(raised.value)
    assert expected in message and "\n" not in message, message
    assert not out.exists()  # nothing was loaded, trained or written


def test_init_from_a_zoo_name_a_pth_and_a_folder_loads_every_weight(tmp_path, tiny_folder, monkeypatch, capsys):
    """--freeze-backbone keeps the source's backbone exactly: best/ holds the loaded weights, heads trained."""
    name = "fcn_resnet50os16_voc"
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    save_reference_checkpoint(build_reference_fcn(50, 16, num_classes=21, seed=3), mirror / f"{name}.pth")
    data = make_generic(tmp_path / "data", n_train=2, n_val=1)
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, exist_ok, repo_type):
            calls.append(("create_repo", repo_id))

        def upload_folder(self, folder_path, repo_id, allow_patterns, commit_message):
            calls.append(("upload_folder", repo_id, sorted(allow_patterns)))
            return type("CommitInfo", (), {"oid": "0" * 40})()

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_test")

    with serve_folder(mirror) as url:
        monkeypatch.setenv("FCN_ZOO_REFERENCE_URL", url)
        sources = {name: None, str(mirror / f"{name}.pth"): None, str(tiny_folder): None}
        for source in sources:
            sources[source] = fcn_zoo.from_pretrained(source).backbone.state_dict()
            out = tmp_path / f"run-{len(calls)}-{Path(source).name}"
            push = ["--push-to-hub", "me/shapes"] if source == str(tiny_folder) else []
            assert train_module.main([
                "--init", source, "--data-root", str(data), "--output-dir", str(out), "--freeze-backbone",
                "--class-weights", "auto", "--max-iters", "1", "--batch-size", "2", "--crop-size", "48", *push, *QUICK,
            ]) == 0
            best = fcn_zoo.from_pretrained(out / "best")
            loaded = best.backbone.state_dict()
            assert all(torch.equal(loaded[k], v) for k, v in sources[source].items()), source
            assert best.num_classes == 3 and best.decode_head.classifier.weight.shape[0] == 3
            run = json.loads((out / "run.json").read_text())
            assert run["init"] == source and run["init_classes"] == 21 and run["reinitialised_classifiers"]

    # median frequency balancing of the two train masks, computed here from the files
    masks = [np.array(Image.open(p)) for p in sorted((data / "masks" / "train").glob("*.png"))]
    pixels = np.array([sum(int((m == c).sum()) for m in masks) for c in range(3)])
    image_pixels = np.array([sum(m.size for m in masks if (m == c).any()) for c in range(3)])
    frequency = pixels / image_pixels
    expected = [np.median(frequency[pixels > 0]) / f if f > 0 else 1.0 for f in frequency]
    assert np.allclose(run["class_weights"], expected, rtol=1e-5)

    assert calls == [("create_repo", "me/shapes"), ("upload_folder", "me/shapes", ["README.md", "config.json", "model.safetensors", "provenance.json"])]
    assert 'from_pretrained("me/shapes")' in (out / "best" / "README.md").read_text()
    assert "uploaded" in capsys.readouterr().out


@pytest.mark.parametrize("source", ["folder", "torchvision"])
def test_fine_tuning_a_model_without_an_auxiliary_head_trains_the_main_head_alone(tmp_path, source, capsys):
    if source == "folder":  # a save_pretrained FCN with aux_channels=None
        init = tmp_path / "no-aux"
        fcn_zoo.FCN(num_classes=5, backbone="resnet10t", head_channels=16, aux_channels=None).save_pretrained(init)
    else:  # torchvision's FCN built with aux_loss=False, converted
        import torchvision

        from fcn_zoo.cli import main

        tv = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=4, aux_loss=False)
        torch.save(tv.state_dict(), tmp_path / "fcn_resnet50.pth")
        init = tmp_path / "tv"
        assert main(["convert", str(tmp_path / "fcn_resnet50.pth"), "--from", "torchvision", "--out", str(init), "--no-parity"]) == 0
    assert fcn_zoo.from_pretrained(init).auxiliary_head is None
    data = make_generic(tmp_path / "data", n_train=2, n_val=1)
    out = tmp_path / "run"
    assert train_module.main(["--init", str(init), "--data-root", str(data), "--output-dir", str(out), "--max-iters", "2",
                              "--batch-size", "2", "--crop-size", "32", *QUICK]) == 0
    assert "no auxiliary head; the loss is the main head's alone" in capsys.readouterr().err
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if "loss" in line]
    assert [r["iter"] for r in steps] == [1, 2] and all(r["loss_aux"] == 0 and r["loss"] == r["loss_main"] > 0 for r in steps)
    assert json.loads((out / "run.json").read_text())["aux_loss_weight"] is None
    best = fcn_zoo.from_pretrained(out / "best")
    assert best.num_classes == 3 and best.auxiliary_head is None


def test_the_held_out_share_depends_on_the_id_only(tmp_path):
    data = make_generic(tmp_path / "data", n_train=20, n_val=0, val=False, nested=True)
    train, val, how = splits(data, 0.25)
    assert 2 <= len(val) <= 9 and len(train) + len(val) == 20 and how == "held out 0.25"
    assert {i for i, _, _ in train}.isdisjoint({i for i, _, _ in val}) and all("/" in i for i, _, _ in val)
    assert splits(data, 0.25)[1] == val
    # twice the images: the earlier ones keep their side
    more = make_generic(tmp_path / "more", n_train=40, n_val=0, val=False, nested=True)
    train2, val2, _ = splits(more, 0.25)
    assert {i for i, _, _ in val} <= {i for i, _, _ in val2} and {i for i, _, _ in train} <= {i for i, _, _ in train2}


def test_median_frequency_weights():
    pixels = np.array([300, 100, 0, 20])
    image_pixels = np.array([400, 200, 0, 100])  # frequencies 0.75, 0.5, -, 0.2: median 0.5
    assert median_frequency_weights(pixels, image_pixels) == [pytest.approx(2 / 3), 1.0, 1.0, 2.5]


@pytest.mark.parametrize("text,expected", [
    ("\ufeffbackground 0 0 0\nbox 1 2 3\n", (["background", "box"], [(0, 0, 0), (1, 2, 3)])),  # Notepad's BOM
    ("\ufeffbackground\nlevel 2\n", (["background", "level 2"], None)),  # no colours: a whole line is a name
    ("a 0 0 0\nb 3 4\n", "classes.txt:2: the colour of 'b 3 4' is malformed; give the name, then R G B"),
    ("a 0 0 0\nb ² 0 0\n", "classes.txt:2: the colour of 'b ² 0 0' is malformed"),  # no ASCII digit: no traceback
    ("a 0 0 0\nb\n", "class 1 (b) has no colour"),
])
def test_a_classes_file_with_a_bom_a_numbered_name_or_a_malformed_colour(tmp_path, text, expected):
    from training.data import DatasetLayoutError, read_classes_file

    (tmp_path / "classes.txt").write_text(text, encoding="utf-8")
    if isinstance(expected, tuple):
        classes = read_classes_file(tmp_path / "classes.txt")
        assert (classes.names, classes.palette) == expected
    else:
        with pytest.raises(DatasetLayoutError, match=re.escape(expected)):
            read_classes_file(tmp_path / "classes.txt")


def test_a_given_epochs_count_and_eval_interval_0_are_taken_as_given(tmp_path, tiny_folder):
    """Fine-tuning's floor of 500 iterations and its 10 evaluations are defaults: --epochs 2 is 2 epochs and
    --eval-interval 0 evaluates only at the end."""
    from training.distributed import DistributedContext
    from training.plan import FINETUNE_MIN_ITERS, make_plan

    data = make_generic(tmp_path / "data", n_train=4, n_val=1, size=(48, 64))
    start = ["--init", str(tiny_folder), "--data-root", str(data), "--device", "cpu", "--batch-size", "2"]
    plan = make_plan(train_module.parse_args([*start, "--output-dir", str(tmp_path / "a"), "--epochs", "2",
                                              "--eval-interval", "0"]), DistributedContext())
    assert (plan.iters_per_epoch, plan.max_iters, plan.eval_interval, plan.meta["epochs"]) == (2, 4, 0, 2)
    plan = make_plan(train_module.parse_args([*start, "--output-dir", str(tmp_path / "b")]), DistributedContext())
    assert (plan.max_iters, plan.eval_interval) == (FINETUNE_MIN_ITERS, FINETUNE_MIN_ITERS // 10)  # the defaults


def test_eval_max_samples_is_what_provenance_and_the_card_count(tmp_path, tiny_folder):
    """With --eval-max-samples 1 of 3 val images the card's val count and sha256 are those of the one image
    scored; provenance keeps the whole split's beside them."""
    data = make_generic(tmp_path / "data", n_train=2, n_val=3, size=(48, 64))
    out = tmp_path / "run"
    assert train_module.main(["--init", str(tiny_folder), "--data-root", str(data), "--output-dir", str(out),
                              "--max-iters", "1", "--batch-size", "2", "--crop-size", "32", "--eval-max-samples", "1",
                              *QUICK]) == 0
    run = json.loads((out / "best" / "provenance.json").read_text())["run"]
    val = build_dataset("generic", data, "val")
    assert run["eval_samples"] == 1 and run["val_samples_sha256"] == val.fingerprint(1) != val.fingerprint()
    assert (run["data"]["val_images"], run["data"]["val_images_all"]) == (1, 3)
    assert (run["data"]["val_sha256"], run["data"]["val_sha256_all"]) == (val.fingerprint(1), val.fingerprint())
    card = (out / "best" / "README.md").read_text()
    assert "2 train and 1 val images" in card and val.fingerprint(1) in card and val.fingerprint() not in card
    assert json.loads((out / "run.json").read_text())["data"]["val_images"] == 3  # the data itself, as it is


def test_a_val_split_without_a_labelled_pixel_is_one_line_not_a_nan_mIoU(tmp_path, tiny_folder):
    """Val masks that are all 255 (ignored) have no mIoU: training and evaluate say so in one line. Before, the
    mIoU was NaN, which never beats the best so far: training ended without writing best/."""
    data = make_generic(tmp_path / "data", n_train=2, n_val=2, size=(48, 64))
    for mask in (data / "masks" / "val").iterdir():
        Image.fromarray(np.full((48, 64), 255, np.uint8)).save(mask)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as raised:
        train_module.main(["--init", str(tiny_folder), "--data-root", str(data), "--output-dir", str(out),
                           "--max-iters", "1", "--batch-size", "2", "--crop-size", "32", *QUICK])
    message = str(raised.value)
    assert "have no labelled pixel" in message and "\n" not in message, message
    three = tmp_path / "three"
    tiny_fcn(num_classes=3, dataset=None).save_pretrained(three)
    with pytest.raises(SystemExit) as raised:
        evaluate_module.main([str(three), "--data-root", str(data), "--output-dir", str(tmp_path / "eval"),
                              "--device", "cpu"])
    assert "the 2 sample(s) scored have no labelled pixel" in str(raised.value)
    assert not (tmp_path / "eval" / "eval.json").exists()


def test_an_upload_that_fails_leaves_a_complete_run_that_resume_uploads(tmp_path, tiny_folder, monkeypatch, capsys):
    """The run's last line comes before the upload; the failure says to rerun with --resume, which uploads
    without training again. Only best/ is uploaded, so only best/'s card names the repo."""
    data = make_generic(tmp_path / "data", n_train=2, n_val=1, size=(48, 64))
    out = tmp_path / "run"
    uploads = []

    class Api:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, exist_ok, repo_type):
            if not uploads:
                raise ConnectionError("Name or service not known")

        def upload_folder(self, folder_path, repo_id, allow_patterns, commit_message):
            uploads.append(folder_path)
            return type("CommitInfo", (), {"oid": "0" * 40})()

    monkeypatch.setattr("huggingface_hub.HfApi", Api)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    argv = ["--init", str(tiny_folder), "--data-root", str(data), "--output-dir", str(out), "--max-iters", "1",
            "--batch-size", "2", "--crop-size", "32", "--push-to-hub", "me/shapes", *QUICK]
    with pytest.raises(SystemExit) as failed:
        train_module.main(argv)
    assert "cannot be reached" in str(failed.value) and "rerun the command with --resume" in str(failed.value)
    assert "1 iterations: final mIoU" in capsys.readouterr().out
    assert "me/shapes" in (out / "best" / "README.md").read_text()
    assert "me/shapes" not in (out / "last" / "README.md").read_text()
    log = (out / "log.jsonl").read_text()
    uploads.append("reachable now")
    assert train_module.main([*argv, "--resume"]) == 0
    assert uploads[-1] == out / "best" and (out / "log.jsonl").read_text() == log  # uploaded, nothing trained again


def test_resume_continues_the_run_it_finds_or_says_there_is_none(tmp_path, tiny_folder, capsys, monkeypatch):
    """--resume with other data is refused in one line (the card would describe data the run began without); the
    same folder named another way is the same data. A folder without a checkpoint is said to start anew, and a
    killed run's partial checkpoint is removed."""
    data = make_generic(tmp_path / "data", n_train=2, n_val=1, size=(48, 64))
    other = make_generic(tmp_path / "other", n_train=2, n_val=1, size=(48, 64))
    out = tmp_path / "run"
    common = ["--init", str(tiny_folder), "--output-dir", str(out), "--batch-size", "2", "--crop-size", "32", *QUICK]
    assert train_module.main([*common, "--data-root", str(data), "--max-iters", "1", "--resume"]) == 0
    assert f"--resume: no checkpoint in {out}; starting at iteration 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        train_module.main([*common, "--data-root", str(other), "--max-iters", "2", "--resume"])
    assert f"--resume: {out} holds a run made with --data-root {str(data)!r}" in str(refused.value)
    assert "\n" not in str(refused.value)
    (out / ".ckpt-00000002.pt.99999-1.partial").write_bytes(b"half a checkpoint")
    monkeypatch.chdir(tmp_path)
    assert train_module.main([*common, "--data-root", "./data/", "--max-iters", "2", "--resume"]) == 0
    assert not list(out.glob(".*.partial")) and (out / "ckpt-00000002.pt").is_file()


def test_an_int8_model_is_refused_as_init_before_anything_is_written(tmp_path, tiny_folder):
    import shutil

    int8 = tmp_path / "int8"
    int8.mkdir()
    config = json.loads((tiny_folder / "config.json").read_text())
    (int8 / "config.json").write_text(json.dumps({**config, "quantization": {"engine": "openvino", "source": "runs/x/best"}}))
    for name in ("openvino_model.xml", "openvino_model.bin"):
        (int8 / name).write_bytes(b"")
    shutil.copy(tiny_folder / "README.md", int8 / "README.md")
    data = make_generic(tmp_path / "data", n_train=2, n_val=1, size=(48, 64))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as refused:
        train_module.main(["--init", str(int8), "--data-root", str(data), "--output-dir", str(out), *QUICK])
    assert "an int8 model cannot be trained; fine-tune the fp32 model it was made from (runs/x/best)" in str(refused.value)
    assert not out.exists()
