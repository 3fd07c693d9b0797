"""One image, one answer on every door: the same file reaches every consumer as the same RGB array, and a
mask drawn on a phone photo as displayed lines up with it in training, evaluation and predict alike."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fcn_zoo
from conftest import PHOTOS, tiny_fcn
from fcn_zoo.errors import ImageError
from fcn_zoo.images import read_image, read_mask
from sample_data import shapes_sample

EXIF_ROTATE_CW = 6  # stored pixels are shown turned 90 degrees clockwise


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def save_as_phone_jpeg(displayed: np.ndarray, path: Path) -> None:
    """``displayed`` stored as a phone does: pixels turned 90 degrees counter-clockwise, EXIF orientation 6."""
    Image.fromarray(displayed).transpose(Image.Transpose.ROTATE_90).save(path, exif=_exif(EXIF_ROTATE_CW), quality=95)


def fixture_set(folder: Path) -> dict[str, Path]:
    """One file of each kind a reader must turn into the same RGB array everywhere."""
    folder.mkdir(parents=True, exist_ok=True)
    photo = np.asarray(Image.open(PHOTOS[0]).convert("RGB").resize((72, 56)))
    files = {}
    save_as_phone_jpeg(photo, files.setdefault("exif6", folder / "exif6.jpg"))
    grey = np.asarray(Image.fromarray(photo).convert("L"))
    Image.fromarray(grey.astype(np.uint16) * 257).save(files.setdefault("sixteen", folder / "sixteen.png"))
    rgba = Image.fromarray(photo).convert("RGBA")
    rgba.putalpha(40)
    rgba.save(files.setdefault("rgba", folder / "rgba.png"))
    Image.fromarray(photo).convert("CMYK").save(files.setdefault("cmyk", folder / "cmyk.jpg"), quality=95)
    Image.fromarray(photo).quantize(32).save(files.setdefault("palette", folder / "palette.png"))
    Image.fromarray(grey).save(files.setdefault("grey", folder / "grey.png"))
    return files


def test_the_reader_shows_each_kind_as_a_viewer_does(tmp_path):
    files = fixture_set(tmp_path)
    exif6 = read_image(files["exif6"])
    with Image.open(files["exif6"]) as stored:
        assert exif6.shape == (stored.width, stored.height, 3)  # turned: 56 wide stored becomes 56 high
        assert np.array_equal(exif6, np.asarray(stored.convert("RGB").transpose(Image.Transpose.ROTATE_270)))
    grey = np.asarray(Image.open(files["grey"]))
    assert np.array_equal(read_image(files["sixteen"]), np.stack([grey] * 3, -1))  # scaled, not clipped to white
    assert np.array_equal(read_image(files["rgba"]), np.asarray(Image.open(files["rgba"]).convert("RGB")))
    for kind, path in files.items():
        image = read_image(path)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, kind
        # bytes, an open PIL image and a Hugging Face cell are the same image
        data = path.read_bytes()
        assert np.array_equal(read_image(data), image), kind
        assert np.array_equal(read_image(Image.open(io.BytesIO(data))), image), kind
        assert np.array_equal(read_image({"bytes": None, "path": str(path)}), image), kind
    # floats in [0, 1] and 16-bit arrays are the same 8-bit image
    photo = read_image(files["rgba"])
    assert np.array_equal(read_image(photo.astype(np.float64) / 255), photo)
    assert np.array_equal(read_image(torch.from_numpy(photo).permute(2, 0, 1).float() / 255), photo)
    assert np.array_equal(read_image(photo.astype(np.uint16) * 257), photo)


def test_masks_keep_their_indices_and_turn_as_their_file_says(tmp_path):
    label = np.zeros((6, 10), dtype=np.uint8)
    label[1:3, 2:7] = 4
    palette = Image.fromarray(label, mode="P")
    palette.putpalette([255, 255, 255] * 256)  # colours that are not the classes
    palette.save(tmp_path / "p.png")
    assert np.array_equal(read_mask(tmp_path / "p.png"), label)
    Image.fromarray(label.astype(np.uint16)).save(tmp_path / "sixteen.png")
    assert np.array_equal(read_mask(tmp_path / "sixteen.png"), label)
    Image.fromarray(np.rot90(label, 1)).save(tmp_path / "turned.png", exif=_exif(EXIF_ROTATE_CW))
    assert np.array_equal(read_mask(tmp_path / "turned.png"), label)
    Image.fromarray(np.stack([label * 40] * 3, -1)).save(tmp_path / "rgb.png")
    with pytest.raises(fcn_zoo.ImageError, match=r"rgb.png: .*grey images"):
        read_mask(tmp_path / "rgb.png")


def test_one_fixture_set_reaches_the_same_array_through_every_door(tmp_path, capsys):
    """predict (path, bytes, batch), predict_iter, the Ray Segmenter, fcn-zoo predict DIR, a training folder,
    a Hugging Face dataset, the demo and video frames: one array, one answer."""
    model = tiny_fcn(num_classes=3, dataset=None, seed=1)
    model.eval_size = (96, 64)
    files = fixture_set(tmp_path / "photos")
    expected = {kind: read_image(path) for kind, path in files.items()}
    answers = {kind: model.predict(path).labels for kind, path in files.items()}

    for kind, path in files.items():
        seg = model.predict(path.read_bytes())
        assert np.array_equal(seg.image, expected[kind]) and np.array_equal(seg.labels, answers[kind]), kind
    for (path, seg), kind in zip(model.predict_iter(list(files.values()), fuse=False), files):
        assert np.array_equal(seg.image, expected[kind]) and np.array_equal(seg.labels, answers[kind]), kind

    from fcn_zoo.ray import Segmenter

    segmenter = Segmenter(model, fuse=False)
    out = segmenter({"bytes": np.array([p.read_bytes() for p in files.values()], dtype=object)})
    for labels, kind in zip(out["labels"], files):
        assert np.array_equal(labels, answers[kind]), kind

    from fcn_zoo.cli import main

    model.save_pretrained(tmp_path / "model")
    assert main(["predict", str(tmp_path / "model"), str(tmp_path / "photos"), "--out", str(tmp_path / "masks"), "--quiet"]) == 0
    for kind in files:
        assert np.array_equal(np.asarray(Image.open(tmp_path / "masks" / f"{kind}.png")), answers[kind]), kind

    from training.generic import generic_dataset

    samples = []
    for kind, path in files.items():
        mask = tmp_path / "masks-train" / f"{kind}.png"
        mask.parent.mkdir(exist_ok=True)
        Image.fromarray(np.zeros(expected[kind].shape[:2], dtype=np.uint8)).save(mask)
        samples.append((kind, path, mask))
    dataset = generic_dataset(samples, ["a", "b", "c"])
    for i, kind in enumerate(files):
        image, _ = dataset[i]
        assert np.array_equal(image.permute(1, 2, 0).numpy(), expected[kind]), kind

    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": p.read_bytes(), "path": None} for p in files.values()],
         "label": [{"bytes": (tmp_path / "masks-train" / f"{k}.png").read_bytes(), "path": None} for k in files]},
        features=features,
    ).cast_column("image", datasets.Image(decode=False)).cast_column("label", datasets.Image(decode=False))
    from training.hubdata import HubDataset

    hub = HubDataset("local", "train", table, list(range(len(files))), ("image", "label"), np.arange(256, dtype=np.uint8),
                     ["a", "b", "c"])
    for i, kind in enumerate(files):
        assert np.array_equal(hub.image(i), expected[kind]), kind

    av = pytest.importorskip("av")
    from fcn_zoo.video import segment_video

    # the arrays as frames of a lossless clip (those of one size: a clip has one): the frame door's answers
    same_size = [kind for kind in files if expected[kind].shape == expected["grey"].shape]
    clip = tmp_path / "frames.mov"
    with av.open(str(clip), "w") as container:
        stream = container.add_stream("png", rate=5)
        stream.width, stream.height, stream.pix_fmt = expected["grey"].shape[1], expected["grey"].shape[0], "rgb24"
        for kind in same_size:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(expected[kind], format="rgb24")))
        container.mux(stream.encode())
    segment_video(model, clip, None, masks_dir=tmp_path / "frames", fuse=False)
    for n, kind in enumerate(same_size):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "frames" / f"{n:06d}.png")), answers[kind]), kind

    pytest.importorskip("gradio")
    from fcn_zoo.demo import ModelCache, segment

    for kind, path in files.items():
        *_, timing, seg = segment(ModelCache(loader=lambda name: model), str(path), "m", False, False, "fp32", 0.5)
        assert np.array_equal(seg.labels, answers[kind]), kind
        height, width = expected[kind].shape[:2]
        assert f"{width}x{height}" in timing, (kind, timing)  # the size as displayed


def _phone_dataset(root: Path) -> Path:
    """A generic folder of phone JPEGs (EXIF 6, one square) and 16-bit PNGs, masks drawn as displayed."""
    rng = np.random.default_rng(3)
    root.mkdir(parents=True)
    (root / "classes.txt").write_text("background\nbox\nellipse\n")
    sizes = [(72, 48), (64, 64), (72, 48), (56, 40), (72, 48), (64, 64), (56, 40), (48, 72)]
    for n, size in enumerate(sizes):
        split = "val" if n >= 5 else "train"
        image, label = shapes_sample(rng, size, classes=(1, 2))
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "masks" / split).mkdir(parents=True, exist_ok=True)
        if n % 3 == 2:  # a 16-bit grey scan
            grey = np.asarray(Image.fromarray(image).convert("L")).astype(np.uint16) * 257
            Image.fromarray(grey).save(root / "images" / split / f"{n:02d}.png")
        else:
            save_as_phone_jpeg(image, root / "images" / split / f"{n:02d}.jpg")
        Image.fromarray(label.astype(np.uint8)).save(root / "masks" / split / f"{n:02d}.png")
    return root


def test_training_and_evaluate_see_phone_photos_as_predict_does(tmp_path, capsys):
    from training import evaluate as evaluate_module
    from training import train as train_module
    from fcn_zoo.metrics import ConfusionMatrix

    data = _phone_dataset(tmp_path / "data")
    torch.manual_seed(0)
    fcn_zoo.FCN(num_classes=3, backbone="resnet10t", head_channels=32, aux_channels=32, eval_size=[96, 64],
                crop_size=[48, 48]).save_pretrained(tmp_path / "src")
    out = tmp_path / "run"
    assert train_module.main(["--init", str(tmp_path / "src"), "--data-root", str(data), "--output-dir", str(out),
                              "--max-iters", "2", "--batch-size", "2", "--device", "cpu", "--num-workers", "0",
                              "--no-progress"]) == 0
    assert evaluate_module.main([str(out / "best"), "--data-root", str(data), "--output-dir", str(tmp_path / "eval"),
                                 "--device", "cpu"]) == 0
    reported = json.loads((tmp_path / "eval" / "eval.json").read_text())["mIoU"]

    model = fcn_zoo.from_pretrained(out / "best")
    matrix = ConfusionMatrix(3)
    for image in sorted((data / "images" / "val").iterdir()):
        seg = model.predict(image, fuse=True)
        mask = np.asarray(Image.open(data / "masks" / "val" / f"{image.stem}.png"))
        matrix.update(torch.from_numpy(seg.labels.astype(np.int64)), torch.from_numpy(mask.astype(np.int64)))
    assert reported == pytest.approx(matrix.compute()["mIoU"], abs=1e-12)

    # a new run into the same folder (no --resume) is refused: a later --resume would take this run's checkpoints
    logged = (out / "log.jsonl").read_text()
    with pytest.raises(SystemExit, match="holds an earlier run"):
        train_module.main(["--init", str(tmp_path / "src"), "--data-root", str(data), "--output-dir", str(out),
                           "--max-iters", "1", "--batch-size", "2", "--device", "cpu", "--num-workers", "0", "--no-progress"])
    assert (out / "log.jsonl").read_text() == logged


def test_a_mask_in_the_stored_orientation_is_refused_saying_why(tmp_path):
    from training.generic import load

    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    (data / "classes.txt").parent.mkdir(parents=True)
    (data / "classes.txt").write_text("background\nbox\nellipse\n")
    for split in ("train", "val"):
        (data / "images" / split).mkdir(parents=True)
        (data / "masks" / split).mkdir(parents=True)
        image, label = shapes_sample(rng, (40, 56), classes=(1, 2))
        save_as_phone_jpeg(image, data / "images" / split / "a.jpg")
        Image.fromarray(np.rot90(label).astype(np.uint8)).save(data / "masks" / split / "a.png")  # as stored
    from training.data import DatasetLayoutError

    with pytest.raises(DatasetLayoutError, match=r"a.png: mask is 40x56, its image a.jpg is 56x40 as displayed; .*EXIF"):
        load(data, None)


def test_evaluate_uses_the_models_eval_size_as_predict_does(tmp_path, capsys):
    """On a zoo layout, the evaluation resize is the model's (its config.json), not the dataset's bound."""
    from sample_data import make_voc
    from training import evaluate as evaluate_module
    from fcn_zoo.metrics import ConfusionMatrix

    root = make_voc(tmp_path / "voc", n_train=1, n_val=3, size=(120, 160))
    model = tiny_fcn(num_classes=21, dataset="voc", seed=2)
    model.eval_size = (80, 48)  # far below VOC's (2048, 512): every val image is resized
    model.save_pretrained(tmp_path / "model")
    assert evaluate_module.main([str(tmp_path / "model"), "--data-root", str(root), "--output-dir", str(tmp_path / "eval"),
                                 "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["eval_size"] == [80, 48]

    from training.sources import build_dataset

    val = build_dataset("voc", root, "val")
    matrix = ConfusionMatrix(21)
    loaded = fcn_zoo.from_pretrained(tmp_path / "model")
    for i in range(len(val)):
        image, label = val[i]
        seg = loaded.predict(image, fuse=True)
        matrix.update(torch.from_numpy(seg.labels.astype(np.int64)), label)
    assert report["mIoU"] == pytest.approx(matrix.compute()["mIoU"], abs=1e-12)


def test_a_batched_tensor_or_array_gives_a_list_of_results():
    model = tiny_fcn(num_classes=3, dataset=None, seed=1)
    model.eval_size = (96, 64)
    photo = read_image(PHOTOS[0])[:60, :80]
    other = read_image(PHOTOS[1])[:60, :80]
    alone = [model.predict(photo).labels, model.predict(other).labels]
    batch = torch.from_numpy(np.stack([photo, other])).permute(0, 3, 1, 2)
    for images in (batch, batch.float() / 255, np.stack([photo, other])):
        results = model.predict(images)
        assert isinstance(results, list) and len(results) == 2
        assert all(np.array_equal(r.labels, a) for r, a in zip(results, alone))


def test_a_folder_or_dataset_of_its_val_split_alone_evaluates(tmp_path):
    """evaluate needs no training split: a generic folder with images/val only, a Hugging Face dataset folder
    with a validation split only."""
    from sample_data import make_generic
    from training import evaluate as evaluate_module

    data = make_generic(tmp_path / "data", n_train=0, n_val=2)
    model = tiny_fcn(num_classes=3, dataset=None, seed=1)
    model.eval_size = (96, 64)
    model.save_pretrained(tmp_path / "m")
    assert evaluate_module.main([str(tmp_path / "m"), "--data-root", str(data), "--device", "cpu",
                                 "--output-dir", str(tmp_path / "e1")]) == 0
    assert json.loads((tmp_path / "e1" / "eval.json").read_text())["split"] == "val"
    pytest.importorskip("datasets")
    from sample_data import make_hub_dataset

    hub = make_hub_dataset(tmp_path / "hub", {"validation": 2})
    assert evaluate_module.main([str(tmp_path / "m"), "--dataset-name", str(hub), "--device", "cpu",
                                 "--output-dir", str(tmp_path / "e2")]) == 0
    assert json.loads((tmp_path / "e2" / "eval.json").read_text())["split"] == "validation"
    with pytest.raises(SystemExit, match="no split 'train' \\(it has validation\\); name one with --train-split"):
        evaluate_module.main([str(tmp_path / "m"), "--dataset-name", str(hub), "--split", "train", "--device", "cpu",
                              "--output-dir", str(tmp_path / "e3")])


def test_a_missing_image_is_a_file_not_found_error_and_an_image_error(tmp_path):
    from fcn_zoo.errors import MissingImageError

    with pytest.raises(FileNotFoundError, match="nope.jpg: no such image file"):
        read_image(tmp_path / "nope.jpg")
    with pytest.raises(fcn_zoo.ImageError):
        read_image(tmp_path / "nope.jpg")
    with pytest.raises(fcn_zoo.ImageError, match=r"3 bytes: not an image in a format Pillow reads") as raised:
        read_image(b"abc")
    assert "0x" not in str(raised.value) and not isinstance(raised.value, MissingImageError)


def test_the_size_checked_before_training_is_the_size_the_reader_gives(tmp_path):
    """A TIFF that Pillow turns itself and a PNG whose EXIF follows its pixels: the header-only size of the
    check before training agrees with the decoded image, so a mask drawn on what the reader shows passes."""
    import struct
    import zlib

    from fcn_zoo.images import displayed_size

    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    Image.fromarray(stored).save(tmp_path / "turned.tif", exif=_exif(EXIF_ROTATE_CW))
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, "PNG")
    png, data = buffer.getvalue(), _exif(EXIF_ROTATE_CW)
    chunk = struct.pack(">I", len(data)) + b"eXIf" + data + struct.pack(">I", zlib.crc32(b"eXIf" + data))
    end = png.rindex(b"IEND") - 4
    (tmp_path / "late.png").write_bytes(png[:end] + chunk + png[end:])  # the PNG spec allows eXIf after IDAT
    for name in ("turned.tif", "late.png"):
        height, width = read_image(tmp_path / name).shape[:2]
        assert displayed_size(tmp_path / name) == (width, height), name


def test_the_reader_owns_its_pixels_and_reads_float_files(tmp_path):
    """A buffer the caller writes again (a decoder's) does not change an earlier result; a float TIFF of 0..255
    values reads as before."""
    model = tiny_fcn(num_classes=3, dataset=None, seed=1)
    model.eval_size = (96, 64)
    buffer = np.full((32, 48, 3), 10, dtype=np.uint8)

    def frames():
        for value in (10, 200):
            buffer[:] = value
            yield buffer

    images = [seg.image[0, 0, 0] for _, seg in model.predict_iter(frames(), fuse=False, num_workers=0)]
    assert images == [10, 200]
    Image.fromarray(np.full((8, 8), 128.0, dtype=np.float32), mode="F").save(tmp_path / "f.tif")
    assert (read_image(tmp_path / "f.tif") == 128).all()


def test_a_failure_stops_a_raising_stream_only_after_the_results_before_it():
    """errors="raise" with the labels beside the next forward (a GPU's default): what came before the failing
    image is yielded first, then the failure raises."""
    from fcn_zoo.engine import Predictor

    model = tiny_fcn(num_classes=3, dataset=None, seed=1)
    model.eval_size = (96, 64)
    predictor = Predictor(model, batch_size=1)
    forward = predictor.forward

    def failing_on_wide(images, names, prepared=None):
        if images[0].shape[1] > 64:
            raise RuntimeError("boom on the wide image")
        return forward(images, names, prepared)

    predictor.forward = failing_on_wide
    got = []
    with pytest.raises(RuntimeError, match="boom"):
        for _, seg in predictor.stream([np.zeros((48, 64, 3), np.uint8), np.zeros((48, 96, 3), np.uint8)],
                                       errors="raise", overlap=True):
            got.append(seg.size)
    assert got == [(48, 64)]


def test_evaluate_refuses_an_eval_size_out_of_bounds(capsys):
    from training import evaluate as evaluate_module

    with pytest.raises(SystemExit) as refused:
        evaluate_module.main(["m", "--data-root", "d", "--eval-size", "0", "0"])
    assert str(refused.value.code) == "python -m training.evaluate: --eval-size: each side must be 1..8192, got 0 0"


def test_labels_that_fail_for_a_batch_are_made_image_by_image():
    """The labels step (upsampling to each image's size) failing for a batch fails only the images that fail
    alone, as the forward pass does."""
    from fcn_zoo.engine import Predictor

    model = tiny_fcn(num_classes=3, dataset=None, seed=1)
    model.eval_size = (96, 64)
    predictor = Predictor(model, batch_size=3)
    finish = predictor.finish

    def failing(images, names, logits):
        if len(images) > 1 or images[0][0, 0, 0] == 7:
            raise RuntimeError("out of memory upsampling")
        return finish(images, names, logits)

    predictor.finish = failing
    images = [np.full((48, 64, 3), value, np.uint8) for value in (1, 7, 3)]
    results = [result for _, result in predictor.stream(images, errors="yield")]
    assert [type(r).__name__ for r in results] == ["Segmentation", "RuntimeError", "Segmentation"]


def test_a_callers_pil_image_is_read_on_its_frame_and_left_there(tmp_path):
    frames = [Image.new("RGB", (8, 6), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    assert tuple(read_image(tmp_path / "a.gif")[0, 0]) == (255, 0, 0)  # a file: its first frame
    with Image.open(tmp_path / "a.gif") as image:
        image.seek(2)
        assert tuple(read_image(image)[0, 0]) == (0, 0, 255) and image.tell() == 2


def test_a_mask_of_another_mode_is_not_called_a_colour_image():
    for mode in ("F", "LA"):
        with pytest.raises(ImageError, match=f"got an image of mode {mode}; save the masks as 8-bit grey or palette"):
            read_mask(Image.new(mode, (4, 4)))


def test_more_than_256_classes_save_as_16_bit_class_indices(tmp_path):
    from fcn_zoo.segmentation import Segmentation

    labels = (np.arange(600, dtype=np.int32) % 300).reshape(20, 30)
    seg = Segmentation(labels, [f"c{i}" for i in range(300)], [(i % 256, i // 256, 0) for i in range(300)])
    assert np.array_equal(np.asarray(Image.open(seg.save(tmp_path / "m.png"))), labels)


def test_evaluate_refuses_a_max_samples_below_one(capsys):
    from training import evaluate as evaluate_module

    with pytest.raises(SystemExit) as refused:
        evaluate_module.main(["m", "--data-root", "d", "--max-samples", "0"])
    assert str(refused.value.code) == ("python -m training.evaluate: --max-samples 0: must be at least 1 (leave it out "
                                       "for every sample)")
