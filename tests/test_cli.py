"""The fcn-zoo command: tables, errors as one line, masks written whole or not at all."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fcn_zoo
from conftest import PHOTOS, answering
from fcn_zoo import hub
from fcn_zoo.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_shows_the_twelve_rows_and_what_is_cached(capsys, tiny_folder):
    cached = hub.cache_root() / "reference" / "fcn_resnet101os16_ade20k"
    shutil.copytree(tiny_folder, cached)
    code, out, err = run(capsys, "list")
    assert code == 0 and err == ""
    lines = out.strip().splitlines()
    assert lines[0].split() == ["name", "dataset", "classes", "mIoU", "cached"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == set(fcn_zoo.list_models())
    assert rows["fcn_resnet101os8_cityscapes"][1:] == ["cityscapes", "19", "76.31", "no"]
    assert rows["fcn_resnet101os16_ade20k"][-1] == "yes"

    code, out, _ = run(capsys, "list", "--dataset", "voc")
    assert len(out.strip().splitlines()) == 1 + 4


def test_info_describes_a_row(capsys):
    code, out, _ = run(capsys, "info", "fcn_resnet50os16_cityscapes")
    assert code == 0
    assert "73.94" in out and "512x1024" in out and "resnet50c" in out and "batch 8, 220 epochs" in out
    assert "nothing-listens-here/fcn_resnet50os16_cityscapes.pth" in out  # FCN_ZOO_REFERENCE_URL applies


def test_info_describes_a_save_pretrained_folder_from_its_config(capsys, tiny_folder, tiny_model, tmp_path):
    code, out, err = run(capsys, "info", str(tiny_folder))
    assert code == 0, err
    assert "resnet18d (timm), output stride 8" in out and "PASCAL VOC 2012, 21 classes" in out
    assert "background; aeroplane; bicycle" in out and "512x512" in out
    params = sum(p.numel() for n, p in tiny_model.named_parameters() if not n.startswith("auxiliary_head."))
    assert f"{params / 1e6:.2f} M at inference" in out
    (tmp_path / "empty").mkdir()
    code, out, err = run(capsys, "info", str(tmp_path / "empty"))
    assert code == 1 and out == "" and err.count("\n") == 1 and "lacks config.json" in err


def test_unknown_name_is_one_line_with_suggestions(capsys):
    code, out, err = run(capsys, "info", "fcn_resnet50_voc")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "fcn_resnet50os8_voc" in err and "Traceback" not in err


def test_predict_writes_masks_and_overlays(capsys, tiny_folder, tmp_path):
    out_dir = tmp_path / "masks"
    code, out, err = run(capsys, "predict", str(tiny_folder), *map(str, PHOTOS[:2]), "--out", str(out_dir), "--overlay")
    assert code == 0, err
    for photo in PHOTOS[:2]:
        mask = Image.open(out_dir / f"{photo.stem}.png")
        overlay = Image.open(out_dir / f"{photo.stem}_overlay.jpg")
        assert mask.mode == "P" and mask.size == overlay.size == Image.open(photo).size
        assert np.asarray(mask).max() < 21
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        [f"{p.stem}.png" for p in PHOTOS[:2]] + [f"{p.stem}_overlay.jpg" for p in PHOTOS[:2]] + ["summary.csv", ".fcn-zoo"]
    )


def test_predict_passes_precision_and_compile_through(capsys, tiny_folder, tmp_path, monkeypatch):
    from fcn_zoo.engine import Predictor

    seen = []
    real = Predictor.__init__
    monkeypatch.setattr(Predictor, "__init__", lambda self, model, **kw: seen.append(kw) or real(self, model, **kw))
    code, _, err = run(capsys, "predict", str(tiny_folder), str(PHOTOS[0]), "--out", str(tmp_path / "m"), "--precision", "bf16")
    assert code == 0, err
    assert seen[-1]["precision"] == "bf16" and seen[-1]["compile"] is False
    code, _, err = run(capsys, "predict", str(tiny_folder), str(PHOTOS[0]), "--out", str(tmp_path / "m"), "--precision", "fp16")
    assert code == 1 and "fp16" in err and "Traceback" not in err  # fp16 is for GPUs: one clear line
    assert not list((tmp_path / "m").glob("*.partial*"))
    code, _, err = run(capsys, "predict", str(tiny_folder), str(PHOTOS[0]), "--out", str(tmp_path / "c"),
                       "--compile", "--engine", "onnxruntime")
    assert code == 1 and err.count("\n") == 1 and "--compile" in err and not (tmp_path / "c").exists()


def test_one_bad_image_fails_alone_and_leaves_nothing_half_written(capsys, tiny_folder, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(PHOTOS[0].read_bytes()[:200])  # a truncated JPEG
    out_dir = tmp_path / "masks"
    code, out, err = run(capsys, "predict", str(tiny_folder), str(bad), str(PHOTOS[1]), "--out", str(out_dir))
    assert code == 1
    assert "broken.jpg" in err and "1 of 2 inputs failed" in err and "Traceback" not in err
    assert sorted(p.name for p in out_dir.iterdir()) == [".fcn-zoo", f"{PHOTOS[1].stem}.png", "summary.csv"]


def test_out_pointing_at_a_file_is_refused(capsys, tiny_folder, tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    code, _, err = run(capsys, "predict", str(tiny_folder), str(PHOTOS[0]), "--out", str(target))
    assert code == 1 and "--out" in err and target.read_text() == "keep me"


def test_download_offline_fails_with_a_clear_line(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run(capsys, "download", "fcn_resnet50os8_voc")
    assert code == 1 and "fcn-zoo download fcn_resnet50os8_voc" in err


def test_download_reports_a_failed_fetch(capsys):
    code, _, err = run(capsys, "download", "fcn_resnet50os8_voc")  # the reference URL points nowhere
    assert code == 1 and "FCN_ZOO_REFERENCE_URL" in err and "Traceback" not in err


def test_console_script_is_installed_and_debug_shows_the_traceback(tmp_path):
    exe = Path(sys.executable).with_name("fcn-zoo")
    env = {**os.environ, "FCN_ZOO_CACHE": str(tmp_path)}
    plain = subprocess.run([str(exe), "info", "nope"], capture_output=True, text=True, env=env)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr and "unknown model 'nope'" in plain.stderr
    debug = subprocess.run([str(exe), "--debug", "info", "nope"], capture_output=True, text=True, env=env)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    usage = subprocess.run([str(exe), "predict"], capture_output=True, text=True, env=env)
    assert usage.returncode == 2 and "usage" in usage.stderr


def test_info_gives_both_miou_figures_the_costs_and_where_the_model_is_cached(capsys, tiny_folder):
    code, out, _ = run(capsys, "info", "fcn_resnet50os8_voc")
    assert code == 0
    assert "67.80" in out and "66.86" in out and "35.34 M" in out and "401.1 GFLOPs" in out and "160.5 MB" in out
    assert "fcn_resnet50os8_voc_train.pth" in out  # the reference's older file name is tried too
    assert "cached      no" in out
    cached = hub.cache_root() / "reference" / "fcn_resnet50os8_voc"
    shutil.copytree(tiny_folder, cached)
    _, out, _ = run(capsys, "info", "fcn_resnet50os8_voc")
    assert f"cached      yes, {cached}" in out


def test_the_class_summary_is_unambiguous_for_names_with_commas(capsys, tmp_path):
    from conftest import tiny_fcn

    model = tiny_fcn(num_classes=150, dataset="ade20k")
    model.save_pretrained(tmp_path / "ade")
    code, out, err = run(capsys, "predict", str(tmp_path / "ade"), str(PHOTOS[0]), "--out", str(tmp_path / "m"))
    assert code == 0, err
    summary = out.splitlines()[0].rsplit("(", 1)[1].rstrip(")")  # the image's line; the run's line follows
    names = [part.rsplit(" ", 1)[0] for part in summary.split("; ")]
    assert names and all(name in fcn_zoo.DATASETS["ade20k"].classes for name in names), summary


def test_the_cli_leaves_the_root_logger_alone(tmp_path):
    """Set to INFO, the root logger would print every library's chatter (httpx requests, onnxscript passes)."""
    code = "import logging, sys; from fcn_zoo.cli import main; main(sys.argv[1:]); r = logging.getLogger(); print(r.level, len(r.handlers))"
    result = subprocess.run([sys.executable, "-c", code, "list"], capture_output=True, text=True,
                            env={**os.environ, "FCN_ZOO_CACHE": str(tmp_path)}, check=True)
    assert result.stdout.splitlines()[-1] == f"{logging.WARNING} 0"


def _quiet_env(tmp_path, **extra):
    return {**os.environ, "FCN_ZOO_CACHE": str(tmp_path / "cache"), "HF_HUB_CACHE": str(tmp_path / "hf"), **extra}


def test_an_unreachable_hub_is_one_line_within_seconds(tmp_path):
    """huggingface_hub alone retries for ~24 s and prints its retry warnings and httpx's request lines."""
    import time

    exe = Path(sys.executable).with_name("fcn-zoo")
    env = _quiet_env(tmp_path, HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens there
    start = time.perf_counter()
    result = subprocess.run([str(exe), "predict", "someone/fcn", str(PHOTOS[0]), "--out", str(tmp_path / "m")],
                            capture_output=True, text=True, env=env)
    assert time.perf_counter() - start < 10
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "someone/fcn: the Hugging Face Hub cannot be reached" in result.stderr


def test_a_hub_answering_404_is_one_line_without_httpx_or_retry_chatter(tmp_path):
    server, url = answering(404)
    try:
        exe = Path(sys.executable).with_name("fcn-zoo")
        result = subprocess.run([str(exe), "download", "someone/fcn"], capture_output=True, text=True,
                                env=_quiet_env(tmp_path, HF_ENDPOINT=url))
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 1 and result.stderr.count("\n") == 2, result.stderr  # the error and the summary
    assert "HTTP Request" not in result.stderr and "Retrying" not in result.stderr


EARLY = r"""
import json, sys
from fcn_zoo.cli import main
out, photos = sys.argv[1], sys.argv[2]
cases = [
    ["fcn_resnet50os8_vco", photos, "--out", out],
    ["fcn_resnet50os8_voc", out + "-no-such-folder", "--out", out],
    ["fcn_resnet50os8_voc", photos, "--out", out, "--precision", "fp16"],
    ["fcn_resnet50os8_voc", photos, "--out", out, "--device", "gpu"],
    ["fcn_resnet50os8_voc", photos, "--out", out, "--engine", "onnxruntime", "--device", "cuda"],
    ["runs/x/best", photos, "--out", out],
    ["fcn_resnet50os8_voc", photos, "--out", out, "--batch-size", "0"],
    ["fcn_resnet50os8_voc", photos, "--out", out, "--workers", "-1"],
    ["fcn_resnet50os8_voc", photos, "--out", photos + "/chelsea.jpg/masks"],
]
codes = [main(["predict", *argv]) for argv in cases]
print(json.dumps({"codes": codes, "torch": "torch" in sys.modules}))
"""


def test_predict_refuses_mistakes_before_importing_torch_and_creates_nothing(tmp_path):
    from conftest import DATA

    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-c", EARLY, str(out), str(DATA)], capture_output=True, text=True)
    result = json.loads(run.stdout.splitlines()[-1])
    assert result == {"codes": [1] * 9, "torch": False}, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 9 and all(line.startswith("fcn-zoo: error: ") for line in lines)
    for line, expected in zip(lines, ["did you mean fcn_resnet50os8_voc", "-no-such-folder: no such file or folder",
                                      "fp16 is for GPUs", "--device gpu: not a device", "runs on the CPU in fp32",
                                      "runs/x/best: no such file or folder", "--batch-size 0: must be at least 1",
                                      "--workers -1: must be at least 0", "chelsea.jpg is not a folder this user can write; pass another folder"]):
        assert expected in line, line
    assert not out.exists()


def test_a_gpu_that_torch_cannot_see_is_one_line_before_the_weights_load(capsys, tiny_folder, tmp_path, monkeypatch):
    import torch

    from fcn_zoo import devices

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    argv = ["predict", str(tiny_folder), str(PHOTOS[0]), "--out", str(tmp_path / "out"), "--device", "cuda"]
    expected = (devices.no_cuda_device() or "torch sees no CUDA GPU here",  # told without importing torch
                "torch sees no CUDA GPU here")  # a driver but no GPU torch can use: asked of torch
    for message in expected:
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "--device cuda: " in err and message in err and "use the CPU" in err, err
        assert len(err.strip().splitlines()) == 1 and "RuntimeError" not in err
        assert not (tmp_path / "out").exists()
        monkeypatch.setattr(devices, "no_cuda_device", lambda: None)


def test_train_with_a_dataset_name_says_which_extra_is_missing(monkeypatch, capsys):
    """Without the datasets library, one line before any training code is imported."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a))
    assert main(["train", "--init", "x", "--dataset-name", "segments/sidewalk-semantic", "--output-dir", "o"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("fcn-zoo: error: fcn-zoo train --dataset-name needs datasets: pip install "
                   "'fcn-zoo[datasets]' (in a checkout: pip install -e '.[datasets]')")


def test_a_reader_that_goes_away_is_no_error(tmp_path):
    """fcn-zoo list | head: the pipe closes before fcn-zoo has written; it ends quietly."""
    exe = Path(sys.executable).with_name("fcn-zoo")
    process = subprocess.Popen([str(exe), "list"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**_quiet_env(tmp_path), "PYTHONUNBUFFERED": "1"})
    process.stdout.close()
    err = process.stderr.read().decode()
    assert process.wait() == 0 and err == ""


def test_info_takes_a_folder_under_the_home_folder(tmp_path, tiny_folder, monkeypatch, capsys):
    import shutil

    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(tiny_folder, tmp_path / "model")
    assert main(["info", "~/model"]) == 0
    assert "resnet" in capsys.readouterr().out


def test_a_closed_stdout_is_no_error(tmp_path):
    exe = Path(sys.executable).with_name("fcn-zoo")
    result = subprocess.run([str(exe), "list"], stderr=subprocess.PIPE, text=True, env=_quiet_env(tmp_path),
                            preexec_fn=lambda: os.close(1))
    assert result.returncode == 0 and result.stderr == ""
