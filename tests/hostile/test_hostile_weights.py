"""Hostile and broken weights: refused with an error naming the file and the problem; no code runs."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fcn_zoo


@pytest.fixture()
def broken(tiny_folder, tmp_path) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(tiny_folder, folder)
    return folder


def test_a_pth_whose_pickle_runs_code_is_refused_and_the_code_never_runs(tmp_path):
    marker = tmp_path / "owned"
    payload = f"import pathlib; pathlib.Path({str(marker)!r}).touch()"

    class Exploit:
        def __reduce__(self):
            return (exec, (payload,))

    (tmp_path / "fcn_resnet50os8_voc.pth").write_bytes(pickle.dumps({"model": {"w": Exploit()}}))
    subprocess.run([sys.executable, "-c", f"import pickle; pickle.load(open({str(tmp_path / 'fcn_resnet50os8_voc.pth')!r}, 'rb'))"], check=True)
    assert marker.exists()  # the file is a real exploit
    marker.unlink()

    with pytest.raises(fcn_zoo.WeightsError, match="fcn_resnet50os8_voc.pth.*no code in it ran"):
        fcn_zoo.from_pretrained(tmp_path / "fcn_resnet50os8_voc.pth")
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["header", "truncated", "empty"])
def test_a_damaged_safetensors_file_is_refused(broken, damage):
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"header": b"\xff" * 8 + data[8:], "truncated": data[: len(data) // 2], "empty": b""}[damage])
    with pytest.raises(fcn_zoo.WeightsError, match=r"model.safetensors: not a readable safetensors file"):
        fcn_zoo.from_pretrained(broken)


def test_wrong_dtypes_are_refused_but_half_precision_is_accepted(broken):
    state = load_file(broken / "model.safetensors")
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, broken / "model.safetensors")
    half = fcn_zoo.from_pretrained(broken)
    assert half.decode_head.classifier.weight.dtype == torch.float32

    state["decode_head.0.weight"] = state["decode_head.0.weight"].to(torch.int32)
    save_file(state, broken / "model.safetensors")
    with pytest.raises(fcn_zoo.WeightsError, match=r"model.safetensors.*wrong dtypes decode_head.0.weight: torch.int32"):
        fcn_zoo.from_pretrained(broken)


@pytest.mark.parametrize("change,message", [
    ("shape", "wrong shapes backbone.layer1.0.conv1.weight"),
    ("extra", "unexpected keys decode_head.99.weight"),
    ("missing", "missing keys auxiliary_head.0.weight"),
])
def test_wrong_shapes_extra_and_missing_keys_are_named(broken, change, message):
    state = load_file(broken / "model.safetensors")
    if change == "shape":
        state["backbone.layer1.0.conv1.weight"] = state["backbone.layer1.0.conv1.weight"][:, :-1].contiguous()
    elif change == "extra":
        state["decode_head.99.weight"] = torch.zeros(2)
    else:
        del state["auxiliary_head.0.weight"]
    save_file(state, broken / "model.safetensors")
    with pytest.raises(fcn_zoo.WeightsError, match=message):
        fcn_zoo.from_pretrained(broken)


@pytest.mark.parametrize("config,message", [
    ("{not json", "config.json: not valid JSON"),
    ("[1, 2]", "config.json: expected a JSON object"),
    (json.dumps({"num_classes": 21, "backbone": "resnet_from_nowhere"}), "config.json does not describe a valid FCN.*resnet_from_nowhere"),
    (json.dumps({"num_classes": -3, "backbone": "resnet18d"}), "num_classes"),
])
def test_a_bad_config_is_refused(broken, config, message):
    (broken / "config.json").write_text(config)
    with pytest.raises(fcn_zoo.WeightsError, match=message):
        fcn_zoo.from_pretrained(broken)


@pytest.mark.parametrize("key", ["eval_size", "crop_size"])
def test_a_config_asking_for_a_huge_size_is_refused_naming_the_file_and_the_key(broken, key):
    """65536 x 65536 would run every photo out of memory: one line naming config.json and the key; 8192 a
    side is taken."""
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, key: [65536, 65536]}))
    with pytest.raises(fcn_zoo.WeightsError) as refused:
        fcn_zoo.from_pretrained(broken)
    assert str(refused.value) == (f"{broken}: config.json does not describe a valid FCN: {key} must be two integers "
                                  "from 1 to 8192, got [65536, 65536]")
    (broken / "config.json").write_text(json.dumps({**config, key: [8192, 8192]}))
    assert getattr(fcn_zoo.from_pretrained(broken), key) == (8192, 8192)


def test_a_checkpoint_for_another_number_of_classes_is_refused_unless_asked(broken):
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "num_classes": 19, "dataset": "cityscapes"}))
    with pytest.raises(fcn_zoo.WeightsError, match="config.json does not describe a valid FCN: class_names has 21 names but num_classes is 19"):
        fcn_zoo.from_pretrained(broken)
    metadata = ("class_names", "palette")  # a consistent config for 19 classes, weights for 21
    (broken / "config.json").write_text(json.dumps({**{k: v for k, v in config.items() if k not in metadata}, "num_classes": 19, "dataset": "cityscapes"}))
    with pytest.raises(fcn_zoo.WeightsError, match=r"wrong shapes .*decode_head.7.bias: file \(21,\) vs model \(19,\)"):
        fcn_zoo.from_pretrained(broken)
    (broken / "config.json").write_text(json.dumps(config))
    assert fcn_zoo.from_pretrained(broken, num_classes=19).num_classes == 19  # asked for: fine-tuning


def test_a_folder_without_weights_and_a_stray_safetensors_file(broken):
    (broken / "model.safetensors").rename(broken.parent / "model.safetensors")
    with pytest.raises(fcn_zoo.WeightsError, match="lacks model.safetensors"):
        fcn_zoo.from_pretrained(broken)
    with pytest.raises(fcn_zoo.WeightsError, match="save_pretrained folder"):
        fcn_zoo.from_pretrained(broken.parent / "model.safetensors")
