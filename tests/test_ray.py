"""fcn_zoo.ray.Segmenter: batches of images (arrays, bytes, paths, Hugging Face cells) to label maps with
predict's protocol, alone and under Ray Data's map_batches."""

from __future__ import annotations

import subprocess
from pathlib import Path
import sys

import numpy as np
import pytest
from PIL import Image

import fcn_zoo
from conftest import PHOTOS
from fcn_zoo.ray import Segmenter


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Six photos of two sizes (so that a batch holds images of unequal size)."""
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for i in range(6):
        size = (120, 90) if i % 2 else (96, 128)
        path = folder / f"photo{i}.jpg"
        Image.open(PHOTOS[i % len(PHOTOS)]).convert("RGB").resize(size).save(path, quality=90)
        paths.append(path)
    return paths


def _expected(model_folder, paths):
    model = fcn_zoo.from_pretrained(model_folder)
    return {str(p): model.predict(p).labels for p in paths}


def test_every_kind_of_cell_gives_predicts_labels(small_folder, photos):
    expected = _expected(small_folder, photos)
    assert len({int(v) for labels in expected.values() for v in np.unique(labels)}) > 1  # not one flat class
    segmenter = Segmenter(small_folder, device="cpu", confidence=True)
    paths = [str(p) for p in photos]
    batches = {
        "arrays": {"image": np.array([np.asarray(Image.open(p)) for p in paths], dtype=object), "path": np.array(paths)},
        "bytes": {"bytes": np.array([open(p, "rb").read() for p in paths], dtype=object), "path": np.array(paths)},
        "paths": {"path": np.array(paths)},
        "hf cells": {"image": np.array([{"bytes": open(p, "rb").read(), "path": None} for p in paths]), "path": np.array(paths)},
    }
    for kind, batch in batches.items():
        out = segmenter(batch)
        assert list(out["path"]) == paths, kind  # other columns are kept; the image column is not
        assert "image" not in out and "bytes" not in out
        for path, labels, shares, confidence in zip(paths, out["labels"], out["shares"], out["confidence"]):
            assert labels.dtype == np.uint8 and np.array_equal(labels, expected[path]), (kind, path)
            counts = np.bincount(labels.ravel(), minlength=21) / labels.size
            assert np.allclose(shares, counts) and abs(shares.sum() - 1) < 1e-5
            assert confidence.dtype == np.float16 and confidence.shape == labels.shape
            assert float(confidence.min()) >= 1 / 21 - 1e-3 and float(confidence.max()) <= 1.0
    assert segmenter.class_names == fcn_zoo.from_pretrained(small_folder).class_names


def test_a_stacked_batch_and_a_missing_column(small_folder, photos):
    tiny_model = fcn_zoo.from_pretrained(small_folder)
    same = [p for p in photos if Image.open(p).size == (96, 128)]
    stacked = np.stack([np.asarray(Image.open(p)) for p in same])  # (N, H, W, 3): read_images with equal sizes
    out = Segmenter(tiny_model)({"image": stacked})
    assert out["labels"].shape == (len(same), 128, 96) and out["shares"].shape == (len(same), 21)
    for labels, path in zip(out["labels"], same):
        assert np.array_equal(labels, tiny_model.predict(path).labels)
    with pytest.raises(KeyError, match=r"no image column 'image / bytes / path' \(its columns: photo\)"):
        Segmenter(tiny_model)({"photo": stacked})


def test_an_unreadable_image_is_its_rows_error_and_the_others_are_segmented(small_folder, photos, tmp_path):
    expected = _expected(small_folder, photos[:2])
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    good = [open(p, "rb").read() for p in photos[:2]]
    paths = [str(photos[0]), str(tmp_path / "missing.jpg"), str(text), str(photos[1]), "cut.jpg"]
    cells = {"path": np.array(paths),
             "bytes": np.array([good[0], b"", text.read_bytes(), good[1], good[1][:200]], dtype=object)}
    segmenter = Segmenter(small_folder, device="cpu", confidence=True, batch_size=2)
    for column in ("path", "bytes"):
        out = segmenter({column: cells[column], "path": cells["path"]})
        bad = [1, 2, 4]
        for i in bad:  # one line that names the image
            assert out["error"][i].startswith(paths[i] + ": ") and "\n" not in out["error"][i], (column, out["error"][i])
            assert out["labels"][i].shape == (0, 0) and out["labels"][i].dtype == np.uint8
            assert out["confidence"][i].shape == (0, 0) and out["confidence"][i].dtype == np.float16
            assert not out["shares"][i].any()
        for i, path in ((0, paths[0]), (3, paths[3])):
            assert out["error"][i] == "" and np.array_equal(out["labels"][i], expected[path]), (column, path)
            assert abs(out["shares"][i].sum() - 1) < 1e-5
        assert out["shares"].shape == (5, 21) and list(out["path"]) == paths
    assert "cannot read" in out["error"][4]  # a truncated JPEG, not only a missing file


def test_a_failed_forward_pass_is_retried_one_image_at_a_time(small_folder, photos):
    """Out of memory for a batch of three: each image again alone; only the one that fails alone is marked."""
    segmenter = Segmenter(small_folder, device="cpu", batch_size=3)
    predictor, calls = segmenter.predictor, []
    forward = predictor.forward
    same_size = [photos[0], photos[2], photos[4], photos[1]]  # a forward pass takes images of one size

    def flaky(images, names, prepared=None):
        calls.append(len(names))
        if len(names) > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details")
        if names == [str(same_size[1])]:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return forward(images, names, prepared)

    predictor.forward = flaky
    paths = [str(p) for p in same_size]
    out = segmenter({"path": np.array(paths)})
    assert calls == [3, 1, 1, 1, 1]  # the batch of three, each of them alone, then the fourth image
    assert list(out["error"]) == ["", f"{paths[1]}: CUDA out of memory. Tried to allocate 1.00 GiB", "", ""]
    expected = _expected(small_folder, same_size)
    for i in (0, 2, 3):
        assert np.array_equal(out["labels"][i], expected[paths[i]])
    assert out["labels"][1].shape == (0, 0) and not out["shares"][1].any()


def test_no_ray_at_import():
    pytest.importorskip("ray", reason="without Ray installed there is nothing to import")
    code = "import sys, fcn_zoo, fcn_zoo.ray; print(any(m == 'ray' or m.startswith('ray.') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_ray_data_map_batches_gives_predicts_labels_and_a_row_per_failure(small_folder, photos, tmp_path):
    """A local Ray (2 CPUs), the documented recipe: read_binary_files, map_batches over an actor pool. The
    photos' labels are predict's (a phone photo's at its displayed size: fcn-zoo's reader decodes the bytes),
    and an unreadable file is its row's error, the others going on."""
    import shutil

    ray = pytest.importorskip("ray", reason="the ray extra (pip install 'fcn-zoo[ray]')")
    folder = tmp_path / "in"
    folder.mkdir()
    for photo in photos[:3]:
        shutil.copy(photo, folder / photo.name)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter clockwise
    Image.open(photos[0]).save(folder / "phone.jpg", exif=exif.tobytes(), quality=90)
    (folder / "broken.jpg").write_bytes(photos[0].read_bytes()[:150])
    readable = sorted(p for p in folder.iterdir() if p.name != "broken.jpg")
    expected = _expected(small_folder, readable)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False,
             configure_logging=False)
    try:
        ds = ray.data.read_binary_files(str(folder), include_paths=True)
        rows = ds.map_batches(Segmenter, fn_constructor_kwargs={"model": str(small_folder), "device": "cpu"}, batch_size=3,
                              num_cpus=1, compute=ray.data.ActorPoolStrategy(size=1)).take_all()
    finally:
        ray.shutdown()
    by_name = {Path(row["path"]).name: row for row in rows}
    assert sorted(by_name) == sorted(p.name for p in folder.iterdir())
    broken = by_name["broken.jpg"]
    assert broken["error"].startswith(broken["path"] + ": ") and broken["labels"].shape == (0, 0)
    for path in readable:
        row = by_name[path.name]
        assert row["error"] == "" and np.array_equal(row["labels"], expected[str(path)]), path.name
        assert row["shares"].shape == (21,)
    with Image.open(photos[0]) as stored:
        assert by_name["phone.jpg"]["labels"].shape == (stored.width, stored.height)  # as displayed


def test_a_cell_that_names_its_file_names_it_in_its_error(small_folder, tmp_path):
    gone = tmp_path / "gone.png"
    out = Segmenter(small_folder, device="cpu")({"image": [{"bytes": None, "path": str(gone)}]})
    assert out["error"][0].startswith(f"{gone}: no such image file")
