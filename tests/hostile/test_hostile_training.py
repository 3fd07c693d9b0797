"""training/ under faults: missing files, bad labels, a full disk, a kill during a checkpoint write."""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sample_data import make_voc
from training import train as train_module

QUICK = ["--recipe", "fcn_resnet50os8_voc", "--device", "cpu", "--backbone-weights", "none", "--backbone", "resnet10t",
         "--num-workers", "0", "--crop-size", "48", "--scale", "256", "64", "--no-progress", "--batch-size", "2",
         "--checkpoint-interval", "1", "--log-interval", "1"]


def test_a_list_naming_missing_files_fails_before_training(tmp_path):
    make_voc(tmp_path / "data")
    sets = tmp_path / "data/VOCdevkit/VOC2012/ImageSets/Segmentation"
    (sets / "trainaug.txt").write_text((sets / "trainaug.txt").read_text() + "2012_999999\n")
    with pytest.raises(SystemExit, match=r"^python -m training.train: \S+2012_999999.jpg: missing .*expected VOCdevkit/VOC2012"):
        train_module.main([*QUICK, "--data-root", str(tmp_path / "data"), "--output-dir", str(tmp_path / "run"), "--max-iters", "1"])
    assert not list((tmp_path / "run").glob("ckpt-*"))


def test_a_label_png_with_values_outside_the_classes_is_named(tmp_path):
    make_voc(tmp_path / "data")
    label = tmp_path / "data/VOCdevkit/VOC2012/SegmentationClass/2007_000000.png"
    Image.fromarray(np.full((64, 80), 42, dtype=np.uint8)).save(label)
    with pytest.raises(SystemExit, match=r"2007_000000.png: label values \[42\] are outside the 21 classes"):
        train_module.main([*QUICK, "--data-root", str(tmp_path / "data"), "--output-dir", str(tmp_path / "run"), "--max-iters", "4"])


def test_a_full_disk_during_a_checkpoint_keeps_the_earlier_ones(tmp_path, monkeypatch):
    make_voc(tmp_path / "data")
    out = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def save(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            with open(path, "wb") as f:
                f.write(b"half a checkpoint")  # what a full disk leaves behind
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(SystemExit, match=r"ckpt-00000002.pt: could not be written .*No space left.*ckpt-00000001.pt.*--resume"):
        train_module.main([*QUICK, "--data-root", str(tmp_path / "data"), "--output-dir", str(out), "--max-iters", "3"])
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".ckpt", "ckpt"))) == ["ckpt-00000001.pt"]
    torch.load(out / "ckpt-00000001.pt", weights_only=True)  # intact

    monkeypatch.setattr(torch, "save", real_save)
    train_module.main([*QUICK, "--data-root", str(tmp_path / "data"), "--output-dir", str(out), "--max-iters", "3", "--resume"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log if "loss" in r][-2:] == [2, 3]


def test_a_kill_during_a_checkpoint_write_leaves_only_a_partial_file_that_is_never_loaded(tmp_path, capsys):
    make_voc(tmp_path / "data")
    out = tmp_path / "run"
    args = [*QUICK, "--data-root", str(tmp_path / "data"), "--output-dir", str(out)]
    train_module.main([*args, "--max-iters", "2"])
    (out / ".ckpt-00000003.pt.partial").write_bytes(b"\x80\x02 torn write")  # kill -9 inside torch.save
    train_module.main([*args, "--max-iters", "3", "--resume"])
    assert "resumed from" in capsys.readouterr().err and (out / "ckpt-00000003.pt").exists()
    torch.load(out / "ckpt-00000003.pt", weights_only=True)


def test_a_crop_size_of_three_numbers_is_refused_before_training(tmp_path):
    make_voc(tmp_path / "data")
    args = [a if a != "48" else "48 48 48" for a in QUICK]
    args = [x for a in args for x in a.split()]
    with pytest.raises(SystemExit, match="--crop-size takes H or H W, got 3 numbers"):
        train_module.main([*args, "--data-root", str(tmp_path / "data"), "--output-dir", str(tmp_path / "run"), "--max-iters", "1"])
    assert not list((tmp_path / "run").glob("ckpt-*"))
