"""Names and arguments a user can get wrong: each error says what was wrong and what to do."""

from __future__ import annotations

import pytest

import fcn_zoo
from fcn_zoo.cli import main


@pytest.mark.parametrize("name,suggestion", [
    ("fcn_resnet50os8_vco", "fcn_resnet50os8_voc"),
    ("FCN_RESNET101OS16_ADE20K", None),
    ("fcn_resnet50_cityscapes", "fcn_resnet50os8_cityscapes"),
    ("deeplabv3", None),
])
def test_unknown_names_suggest_the_closest(name, suggestion, capsys):
    with pytest.raises(fcn_zoo.UnknownModelError) as e:
        fcn_zoo.from_pretrained(name)
    if suggestion:
        assert f"did you mean {suggestion}" in str(e.value) or suggestion in str(e.value)
    else:
        assert "fcn_resnet50os8_voc" in str(e.value)  # without a close match, the known names are listed
    assert main(["predict", name, "x.jpg", "--out", "masks"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fcn-zoo: error: unknown model") and err.count("\n") == 1


@pytest.mark.parametrize("num_classes", [0, -3, True, 2.5, "5"])
def test_bad_num_classes_are_refused(tiny_folder, num_classes):
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        fcn_zoo.from_pretrained(tiny_folder, num_classes=num_classes)


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu0"])
def test_an_unknown_device_is_named(tiny_folder, device):
    with pytest.raises(ValueError, match=f"unknown device '{device}'"):
        fcn_zoo.from_pretrained(tiny_folder, device=device)


def test_bad_predict_options_are_named(tiny_model):
    image = fcn_zoo.DATASETS and __import__("numpy").zeros((16, 16, 3), dtype="uint8")
    with pytest.raises(ValueError, match="mode must be"):
        tiny_model.predict(image, mode="tiles")
    with pytest.raises(ValueError, match="precision must be"):
        tiny_model.predict(image, precision="int8")
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        tiny_model.predict(image, batch_size=0)


@pytest.mark.parametrize("command", [
    ["predict", "{tiny}", "{photo}", "--out", "{file}"],
    ["convert", "{photo}", "--from", "reference", "--out", "{file}"],
    ["export", "{tiny}", "--out", "{dir}"],
])
def test_out_pointing_at_the_wrong_kind_of_path_is_refused(command, tiny_folder, tmp_path, capsys):
    from conftest import PHOTOS

    (tmp_path / "file.txt").write_text("keep")
    (tmp_path / "dir").mkdir()
    argv = [a.format(tiny=tiny_folder, photo=PHOTOS[0], file=tmp_path / "file.txt", dir=tmp_path / "dir") for a in command]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "--out" in err and err.count("\n") == 1
    assert (tmp_path / "file.txt").read_text() == "keep" and list((tmp_path / "dir").iterdir()) == []
