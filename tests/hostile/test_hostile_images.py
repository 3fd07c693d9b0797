"""Hostile and broken images: each is one ImageError naming the input, or a correct answer; never a crash."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import fcn_zoo
from conftest import PHOTOS, png_header_only
from fcn_zoo.cli import main


BROKEN_FILES = {
    "empty.jpg": lambda: b"",
    "truncated.jpg": lambda: PHOTOS[0].read_bytes()[:300],
    "truncated.png": lambda: _encoded_png()[:500],
    "notes.jpg": lambda: b"this is a text file, not a photograph\n",
    "bomb.png": lambda: png_header_only(40000, 40000),  # 1.6 G pixels: over Pillow's limit
    "html.png": lambda: b"<html><body>404 Not Found</body></html>",
}


def _encoded_png() -> bytes:
    buffer = io.BytesIO()
    Image.open(PHOTOS[0]).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("name", sorted(BROKEN_FILES))
def test_broken_image_files_raise_one_error_naming_the_file(tiny_model, tmp_path, name):
    path = tmp_path / name
    path.write_bytes(BROKEN_FILES[name]())
    with pytest.raises(fcn_zoo.ImageError) as e:
        tiny_model.predict(path)
    assert name in str(e.value)


@pytest.mark.parametrize("name", sorted(BROKEN_FILES))
def test_the_cli_prints_one_line_and_keeps_the_good_images(tiny_folder, tmp_path, capsys, name):
    bad = tmp_path / name
    bad.write_bytes(BROKEN_FILES[name]())
    out = tmp_path / "masks"
    code = main(["predict", str(tiny_folder), str(PHOTOS[1]), str(bad), str(PHOTOS[2]), "--out", str(out), "--overlay"])
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("fcn-zoo: error:")]
    assert len(lines) == 1 and name in lines[0] and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{p.stem}{suffix}" for p in (PHOTOS[1], PHOTOS[2]) for suffix in (".png", "_overlay.jpg")] + ["summary.csv", ".fcn-zoo"]
    )
    assert f"{name},image,,,,failed," in (out / "summary.csv").read_text()  # the failure is listed


@pytest.mark.parametrize("size", [(1, 1), (1, 300), (300, 1), (2, 5)])
def test_tiny_and_one_pixel_wide_images_get_labels_of_their_size(tiny_model, size):
    image = np.full((*size, 3), 120, dtype=np.uint8)
    assert tiny_model.predict(image).labels.shape == size


def test_a_16_bit_tiff_and_a_float_tiff_are_scaled_to_8_bit_range(tiny_model, tmp_path):
    grey = np.asarray(Image.open(PHOTOS[0]).convert("L"))
    expected = tiny_model.predict(torch.from_numpy(grey.copy()).float().div(255).expand(3, -1, -1)).labels
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "grey16.tif")
    Image.fromarray(grey.astype(np.float32) / 255).save(tmp_path / "float.tif")
    for name in ("grey16.tif", "float.tif"):
        assert (tiny_model.predict(tmp_path / name).labels == expected).mean() > 0.999, name


def test_a_palette_image_with_transparency_uses_its_colours(tiny_model, tmp_path):
    rgb = Image.open(PHOTOS[0]).convert("RGB")
    palette = rgb.quantize(32)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "palette.png", transparency=0)
    expected = tiny_model.predict(palette.convert("RGB")).labels
    assert np.array_equal(tiny_model.predict(tmp_path / "palette.png").labels, expected)


def test_an_animated_gif_uses_the_first_frame_and_says_so(tiny_model, tmp_path, caplog):
    frames = [Image.new("RGB", (64, 48), colour) for colour in ((250, 10, 10), (10, 250, 10), (10, 10, 250))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    with caplog.at_level(logging.INFO, logger="fcn_zoo"):
        seg = tiny_model.predict(tmp_path / "anim.gif")
    assert "3 frames" in caplog.text and "first" in caplog.text
    first = Image.open(tmp_path / "anim.gif").convert("RGB")
    assert np.array_equal(seg.labels, tiny_model.predict(first).labels)


@pytest.mark.parametrize("tensor,message", [
    (torch.full((3, 16, 16), float("inf")), "NaN or infinite"),
    (torch.full((3, 16, 16), float("nan")), "NaN or infinite"),
    (torch.zeros(2, 1, 3, 16, 16), "shape"),
    (torch.zeros(4, 16, 16), "shape"),
    (torch.zeros(3, 16, 16, dtype=torch.int32), "float or uint8"),
    (torch.zeros(3, 0, 16), "empty"),
    (torch.full((3, 8, 8), -0.5), r"\[0, 1\]"),
])
def test_bad_tensors_are_refused_with_the_reason(tiny_model, tensor, message):
    with pytest.raises(fcn_zoo.ImageError, match=message):
        tiny_model.predict(tensor)


@pytest.mark.parametrize("value,message", [
    (np.zeros((8, 8, 2), dtype=np.uint8), "shape"),
    (np.full((8, 8, 3), 2.0, dtype=np.float32), r"\[0, 1\].*astype\(np.uint8\)"),
    (np.zeros((8, 8, 3), dtype=np.int64), "uint8"),
    ([], "no images"),
    ("", "no such image"),
    (12345, "expected a path"),
])
def test_bad_arrays_and_objects_are_refused(tiny_model, value, message):
    with pytest.raises(fcn_zoo.ImageError, match=message):
        tiny_model.predict(value)


def test_running_out_of_memory_suggests_sliding_windows(tiny_model, monkeypatch):
    def oom(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1234567890 bytes")

    monkeypatch.setattr(tiny_model, "forward_features", oom)
    with pytest.raises(fcn_zoo.ImageError, match="mode='slide'") as e:
        tiny_model.predict(PHOTOS[0])
    assert PHOTOS[0].name in str(e.value)


@pytest.mark.parametrize("message,oom", [
    ("CUDA out of memory. Tried to allocate 2.00 GiB", True),
    ("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1234 bytes", True),
    ("CUDA error: an illegal memory access was encountered", False),
    ("memory format channels_last is not supported here", False),
])
def test_only_running_out_of_memory_is_reported_as_such(tiny_model, monkeypatch, message, oom):
    from fcn_zoo.errors import is_out_of_memory

    def fail(*args, **kwargs):
        raise RuntimeError(message)

    assert is_out_of_memory(RuntimeError(message)) is oom
    monkeypatch.setattr(tiny_model, "forward_features", fail)
    with pytest.raises(fcn_zoo.ImageError if oom else RuntimeError) as e:
        tiny_model.predict(PHOTOS[0])
    assert ("mode='slide'" in str(e.value)) is oom
