"""The core at whatever versions are installed: in the normal suite the tested ones, under ``.ci/floors`` the
minimum of every dependency pyproject.toml declares. A small model with random weights, offline, generated
images: saving, loading and predicting, a Hub repo id without a network, a channels_last model, and the
``fcn-zoo predict`` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fcn_zoo


def small_fcn() -> fcn_zoo.FCN:
    torch.manual_seed(0)
    return fcn_zoo.FCN(num_classes=3, backbone="resnet10t", output_stride=8, head_channels=16, aux_channels=None).eval()


def photo(path: Path, size: tuple[int, int] = (96, 64)) -> Path:
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("floors") / "small-fcn"
    small_fcn().save_pretrained(folder)
    return folder


def test_save_pretrained_from_pretrained_and_predict(small_folder, tmp_path):
    assert {"config.json", "model.safetensors"} <= {p.name for p in small_folder.iterdir()}
    model = fcn_zoo.from_pretrained(small_folder)
    expected = small_fcn().state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    seg = model.predict(Image.open(photo(tmp_path / "photo.jpg")))
    assert seg.labels.shape == (64, 96) and seg.labels.dtype == np.uint8 and seg.labels.max() < 3


def test_a_hub_repo_id_offline_with_an_empty_cache_is_an_fcn_zoo_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(fcn_zoo.FCNZooError):
        fcn_zoo.from_pretrained("someone/fcn-floors", cache_dir=tmp_path / "empty-cache")


def test_a_channels_last_model_saves_and_loads_with_equal_weights(tmp_path):
    model = small_fcn().to(memory_format=torch.channels_last)
    model.save_pretrained(tmp_path / "cl")
    loaded = fcn_zoo.from_pretrained(tmp_path / "cl")
    expected = model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())


def test_the_predict_command_writes_a_mask(small_folder, tmp_path):
    exe = Path(sys.executable).with_name("fcn-zoo")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FCN_ZOO_CACHE": str(tmp_path / "cache"),
           "HF_HUB_CACHE": str(tmp_path / "hf_cache")}
    source = photo(tmp_path / "street.jpg")
    run = subprocess.run([str(exe), "predict", str(small_folder), str(source), "--out", str(tmp_path / "masks")],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    mask = Image.open(tmp_path / "masks" / "street.png")
    assert mask.format == "PNG" and mask.size == (96, 64) and np.asarray(mask).max() < 3


def test_the_cache_lock_is_taken_and_given_back(tmp_path):
    from fcn_zoo._files import cache_lock

    for _ in range(2):
        with cache_lock("someone/fcn", tmp_path):
            assert (tmp_path / ".locks" / "someone--fcn.lock").exists()


def test_export_on_a_torch_without_named_dynamic_shapes_is_one_line(tmp_path, monkeypatch):
    from fcn_zoo.export import export

    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion("2.6.0"))
    with pytest.raises(fcn_zoo.FCNZooError, match=r"torch>=2\.7 \(this is torch 2\.6\.0\)"):
        export(small_fcn(), tmp_path / "model.onnx")
    assert not list(tmp_path.iterdir())
