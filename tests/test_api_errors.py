"""Every failure of the public API is the kind the docs promise (python.md, safety.md): an ``FCNZooError`` subclass for what the
user named wrongly (models, files, images), ``ValueError``/``TypeError`` for a bad argument; never a bare
``FileNotFoundError``, ``KeyError`` or a library's own exception."""

from __future__ import annotations

import numpy as np
import pytest

import fcn_zoo
from fcn_zoo import errors

IMAGE = np.zeros((40, 50, 3), dtype=np.uint8)


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _cases(tmp_path, tiny_folder):
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    text = tmp_path / "notes.txt"
    text.write_text("not weights")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "model.safetensors").write_bytes(b"")
    model = fcn_zoo.from_pretrained(tiny_folder)
    model.eval_size = (64, 64)

    def export(fmt, path):
        from fcn_zoo.export import export as run

        return run(model, path, fmt)

    def video(path):
        from fcn_zoo.video import segment_video

        return segment_video(model, path, tmp_path / "out.mp4")

    return [
        ("unknown zoo name", lambda: fcn_zoo.from_pretrained("fcn_resnet50os8_vco"), errors.UnknownModelError),
        ("missing folder", lambda: fcn_zoo.from_pretrained("runs/x/best"), errors.MissingFileError),
        ("missing .pth", lambda: fcn_zoo.from_pretrained(tmp_path / "fcn_resnet50os8_voc.pth"), errors.MissingFileError),
        ("folder without weights", lambda: fcn_zoo.from_pretrained(empty), errors.WeightsError),
        ("a text file", lambda: fcn_zoo.from_pretrained(text), errors.WeightsError),
        ("a damaged folder", lambda: fcn_zoo.from_pretrained(broken), errors.WeightsError),
        ("not cached, offline", lambda: fcn_zoo.from_pretrained("fcn_resnet50os8_voc", local_files_only=True), errors.NotCachedError),
        ("repo not cached, offline", lambda: fcn_zoo.from_pretrained("someone/fcn", local_files_only=True), errors.NotCachedError),
        ("bad num_classes", lambda: fcn_zoo.from_pretrained(tiny_folder, num_classes=0), ValueError),
        ("bad device", lambda: fcn_zoo.from_pretrained(tiny_folder, device="gpu"), ValueError),
        ("a GPU that is not there", lambda: fcn_zoo.from_pretrained(tiny_folder, device=f"cuda:{_gpus()}"), errors.FCNZooError),
        ("unknown row", lambda: fcn_zoo.get_checkpoint("fcn_resnet50"), errors.UnknownModelError),
        ("missing image", lambda: model.predict(tmp_path / "missing.jpg"), errors.ImageError),
        ("no images", lambda: model.predict([]), errors.ImageError),
        ("not an image", lambda: model.predict(text), errors.ImageError),
        ("bad mode", lambda: model.predict(IMAGE, mode="tiles"), ValueError),
        ("bad precision", lambda: model.predict(IMAGE, precision="int8"), ValueError),
        ("fp16 on the CPU", lambda: model.predict(IMAGE, precision="fp16"), ValueError),
        ("bad errors=", lambda: model.predict_iter([IMAGE], errors="ignore"), ValueError),
        ("unknown class", lambda: model.predict(IMAGE).probabilities("unicorn"), ValueError),
        ("unknown export format", lambda: export("tflite", tmp_path / "m.tflite"), ValueError),
        ("missing video", lambda: video(tmp_path / "missing.mp4"), errors.ImageError),
        ("bad FCN argument", lambda: fcn_zoo.FCN(num_classes=0), ValueError),
    ]


def test_every_failure_of_the_public_api_has_the_promised_type(tmp_path, tiny_folder):
    wrong = []
    for what, call, expected in _cases(tmp_path, tiny_folder):
        try:
            call()
        except expected as e:
            if isinstance(e, OSError) and not isinstance(e, errors.FCNZooError):
                wrong.append(f"{what}: a bare {type(e).__name__}")
            elif not str(e) or "\n" in str(e).strip():
                wrong.append(f"{what}: the message is not one line: {str(e)!r:.200}")
        except Exception as e:  # noqa: BLE001 - the point is to name whatever came instead
            wrong.append(f"{what}: {type(e).__name__}: {errors.first_line(e)}")
        else:
            wrong.append(f"{what}: nothing raised")
    assert wrong == []


def test_a_missing_folder_is_caught_as_the_readme_says(tmp_path):
    with pytest.raises(fcn_zoo.FCNZooError, match="no such file or folder"):
        fcn_zoo.from_pretrained(tmp_path / "runs" / "mine" / "best")
    with pytest.raises(FileNotFoundError):  # and still a FileNotFoundError for code that catches that
        fcn_zoo.from_pretrained(tmp_path / "runs" / "mine" / "best")
