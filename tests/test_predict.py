"""predict(): every kind of input, the Segmentation API, TTA and sliding windows."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fcn_zoo
from conftest import PHOTOS
from fcn_zoo.predict import TTA
from fcn_zoo.zoo import eval_resize_shape


@pytest.fixture(scope="module")
def photo():
    return np.asarray(Image.open(PHOTOS[0]).convert("RGB"))


def test_eval_resize_matches_the_reference_rule():
    # a VOC image: 500x375 -> short side to 512, long side follows
    assert eval_resize_shape(375, 500, (2048, 512)) == (512, 683)
    # a Cityscapes frame is evaluated at full resolution
    assert eval_resize_shape(1024, 2048, (2048, 1024)) == (1024, 2048)
    # a very wide panorama is limited by the long side
    assert eval_resize_shape(100, 4000, (2048, 512)) == (51, 2048)


@pytest.mark.parametrize("path", PHOTOS, ids=lambda p: p.name)
def test_real_photographs_give_labels_at_their_own_size(tiny_model, path):
    seg = tiny_model.predict(path)
    with Image.open(path) as img:
        width, height = img.size
    assert seg.labels.shape == (height, width) and seg.labels.dtype == np.uint8
    assert seg.labels.max() < 21
    assert seg.class_names == list(fcn_zoo.DATASETS["voc"].classes)
    shares = seg.class_shares()
    assert abs(sum(shares.values()) - 1) < 1e-9 and list(shares.values()) == sorted(shares.values(), reverse=True)


def test_segmentation_colorize_overlay_and_save(tiny_model, photo, tmp_path):
    seg = tiny_model.predict(photo)
    mask = seg.colorize()
    assert mask.mode == "P" and mask.size == (photo.shape[1], photo.shape[0])
    assert mask.getpalette()[3 * 15:3 * 16] == list(fcn_zoo.DATASETS["voc"].palette[15])

    saved = seg.save(tmp_path / "mask.png")
    assert np.array_equal(np.asarray(Image.open(saved)), seg.labels)
    with pytest.raises(ValueError, match="png"):
        seg.save(tmp_path / "mask.jpg")

    blended = np.asarray(seg.overlay(alpha=0.25), dtype=np.float64)
    colours = np.asarray(seg.palette, dtype=np.float64)[seg.labels]
    assert np.abs(blended - (0.75 * photo + 0.25 * colours)).max() <= 0.5 + 1e-9
    assert np.array_equal(np.asarray(seg.overlay(alpha=0.0)), photo)


def test_every_input_type_gives_the_same_labels(tiny_model, photo, tmp_path):
    tiny_model.eval_size = (400, 200)  # what is compared is the input handling, not the network
    png = tmp_path / "photo.png"
    Image.fromarray(photo).save(png)
    as_array = tiny_model.predict(photo).labels
    for image in (png, str(png), Image.fromarray(photo), torch.from_numpy(photo.copy()).permute(2, 0, 1)):
        assert np.array_equal(tiny_model.predict(image).labels, as_array), type(image)
    as_float = tiny_model.predict(torch.from_numpy(photo.copy()).permute(2, 0, 1).float() / 255).labels
    assert np.array_equal(as_float, as_array)  # float inputs become the same 8-bit image
    assert np.array_equal(tiny_model.predict(photo.astype(np.float32) / 255).labels, as_array)


def test_a_list_of_images_of_different_sizes(tiny_model, photo):
    small = photo[:100, :150]
    results = tiny_model.predict([photo, small, photo], batch_size=2)
    assert [r.labels.shape for r in results] == [photo.shape[:2], small.shape[:2], photo.shape[:2]]
    assert np.array_equal(results[0].labels, results[2].labels)
    assert np.array_equal(results[1].labels, tiny_model.predict(small).labels)


def _encode(img: Image.Image, fmt: str, **kwargs) -> Image.Image:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    buffer.seek(0)
    return Image.open(buffer)


def test_odd_image_modes_are_converted_as_a_user_expects(tiny_model, photo):
    tiny_model.eval_size = (400, 200)
    rgb = Image.fromarray(photo)
    grey = np.asarray(rgb.convert("L"))
    expected_grey = tiny_model.predict(np.stack([grey] * 3, axis=-1)).labels

    assert np.array_equal(tiny_model.predict(rgb.convert("L")).labels, expected_grey)
    assert np.array_equal(tiny_model.predict(_encode(rgb.convert("LA"), "PNG")).labels, expected_grey)
    # 16-bit greyscale: 0..65535 scaled to 0..255 (value / 257, rounded)
    grey16 = Image.fromarray(np.minimum(grey.astype(np.uint32) * 257 + 100, 65535).astype(np.uint16))
    assert np.array_equal(tiny_model.predict(_encode(grey16, "PNG")).labels, expected_grey)
    # alpha is dropped, not blended
    rgba = rgb.convert("RGBA")
    rgba.putalpha(0)
    assert np.array_equal(tiny_model.predict(rgba).labels, tiny_model.predict(rgb).labels)
    # palette images are expanded to their colours
    palette = rgb.quantize(64)
    assert np.array_equal(tiny_model.predict(palette).labels, tiny_model.predict(palette.convert("RGB")).labels)
    # CMYK becomes RGB the way Pillow converts it
    cmyk = rgb.convert("CMYK")
    assert np.array_equal(tiny_model.predict(cmyk).labels, tiny_model.predict(cmyk.convert("RGB")).labels)


def test_exif_rotated_photos_are_segmented_as_a_viewer_shows_them(tiny_model, photo, tmp_path):
    rgb = Image.fromarray(photo)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    rgb.save(path, exif=exif.tobytes(), quality=95)
    shown = np.asarray(Image.open(path).transpose(Image.Transpose.ROTATE_270))

    seg = tiny_model.predict(path)

    assert seg.labels.shape == (photo.shape[1], photo.shape[0])
    assert np.array_equal(seg.labels, tiny_model.predict(shown).labels)


def test_bad_inputs_raise_image_errors_naming_the_input(tiny_model, tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(fcn_zoo.ImageError, match="notes.jpg"):
        tiny_model.predict(tmp_path / "notes.jpg")
    with pytest.raises(fcn_zoo.ImageError, match="missing.png"):
        tiny_model.predict(tmp_path / "missing.png")
    with pytest.raises(fcn_zoo.ImageError, match=r"\[0, 1\]"):
        tiny_model.predict(torch.full((3, 8, 8), 200.0))
    with pytest.raises(fcn_zoo.ImageError, match="NaN"):
        tiny_model.predict(torch.full((3, 8, 8), float("nan")))
    with pytest.raises(fcn_zoo.ImageError, match="shape"):
        tiny_model.predict(torch.zeros(8, 8))
    with pytest.raises(fcn_zoo.ImageError, match=r"float images must hold values in \[0, 1\].*astype\(np.uint8\)"):
        tiny_model.predict(np.full((8, 8, 3), 200.0))
    with pytest.raises(fcn_zoo.ImageError, match="uint8"):
        tiny_model.predict(np.zeros((8, 8, 3), dtype=np.int64))
    with pytest.raises(fcn_zoo.ImageError, match="no images"):
        tiny_model.predict([])
    with pytest.raises(ValueError, match="GPU"):
        tiny_model.predict(np.zeros((8, 8, 3), dtype=np.uint8), precision="fp16")


def test_flip_tta_is_mirror_symmetric(tiny_model, photo):
    flipped = np.ascontiguousarray(photo[:, ::-1])
    tta = TTA(scales=(1.0,), flip=True)
    a = tiny_model.predict(photo, tta=tta).labels
    b = tiny_model.predict(flipped, tta=tta).labels
    assert (a[:, ::-1] == b).mean() > 0.999


def test_tta_with_one_scale_and_no_flip_is_plain_prediction(tiny_model, photo):
    tiny_model.eval_size = (320, 160)  # six scales at VOC's 512 would only cost time
    plain = tiny_model.predict(photo).labels
    assert np.array_equal(tiny_model.predict(photo, tta=TTA(scales=(1.0,), flip=False)).labels, plain)
    multi = tiny_model.predict(photo, tta=True).labels
    assert multi.shape == plain.shape


def test_sliding_windows_batched_equal_one_at_a_time(tiny_model, photo):
    tiny_model.eval_size = (640, 300)  # 300 x 400: still 2 x 3 windows of 160
    window, stride = (160, 160), (100, 100)
    image = torch.from_numpy(photo.copy()).permute(2, 0, 1)
    from fcn_zoo.protocol import _slide

    with torch.inference_mode():
        inputs = fcn_zoo.preprocess(tiny_model, image)
        batched = _slide(tiny_model.forward_features, inputs, window, stride, batch_size=16)
        one_by_one = _slide(tiny_model.forward_features, inputs, window, stride, batch_size=1)
    assert batched.shape[-2:] == inputs.shape[-2:]
    assert (batched - one_by_one).abs().max() < 1e-5

    seg = tiny_model.predict(image, mode="slide", window=window, stride=stride)
    assert seg.labels.shape == photo.shape[:2]
    assert (seg.labels == tiny_model.predict(image).labels).mean() > 0.5  # same model, mostly the same answer


@pytest.mark.parametrize("shape", [(9, 12, 67, 93), (64, 86, 512, 683), (10, 10, 7, 13)])
def test_banded_upsample_argmax_equals_full_interpolation(shape):
    from fcn_zoo.labels import upsample_argmax

    h, w, height, width = shape
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(1, 19, h, w, generator=g) * 5, torch.randn(1, 19, h, w, generator=g)]
    full = sum(torch.nn.functional.interpolate(lg, size=(height, width), mode="bilinear", align_corners=False) for lg in logits)
    banded = upsample_argmax(logits, (height, width), budget_bytes=1 << 16)  # many small bands
    assert banded.shape == (height, width)
    assert (banded == full[0].argmax(0)).float().mean() > 0.9999


def _scene_logits(classes: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Logits like a trained model's: a layout of a few regions, each with a confident class, and noise."""
    g = torch.Generator().manual_seed(seed)
    layout = torch.nn.functional.interpolate(torch.randn(1, 6, max(2, h // 8), max(2, w // 8), generator=g), size=(h, w), mode="bilinear").argmax(1)
    present = torch.randperm(classes, generator=g)[:6]
    logits = torch.randn(1, classes, h, w, generator=g)
    logits.scatter_add_(1, present[layout][:, None], torch.full((1, 1, h, w), 6.0))
    return torch.nn.functional.avg_pool2d(logits, 3, 1, 1)


@pytest.mark.parametrize("shape", [(150, 32, 43, 750, 1000), (19, 64, 128, 512, 1024), (21, 9, 12, 67, 93)])
def test_upsample_argmax_scores_only_the_classes_that_can_win_and_agrees(shape):
    from fcn_zoo.labels import upsample_argmax, upsample_argmax_candidates

    classes, h, w, height, width = shape
    logits = _scene_logits(classes, h, w)
    full = torch.nn.functional.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)[0].argmax(0)
    labels = upsample_argmax_candidates(logits[0], height, width, budget_bytes=1 << 16)  # many chunks
    assert labels is not None  # the pruned path ran
    assert (labels == full).float().mean() > 0.99999
    assert torch.equal(upsample_argmax([logits], (height, width)), labels)


def test_a_class_that_wins_between_corners_only_is_not_pruned():
    from fcn_zoo.labels import upsample_argmax_candidates

    logits = torch.full((1, 40, 1, 2), -5.0)
    logits[0, 3, 0] = torch.tensor([1.0, 0.0])
    logits[0, 7, 0] = torch.tensor([0.0, 1.0])
    logits[0, 5, 0] = 0.6  # 0.6 beats 0.5/0.5 halfway, though it is top at neither corner
    labels = upsample_argmax_candidates(logits[0], 1, 100, budget_bytes=1 << 20)
    full = torch.nn.functional.interpolate(logits, size=(1, 100), mode="bilinear", align_corners=False)[0].argmax(0)
    assert labels is not None and torch.equal(labels, full)
    assert set(labels.unique().tolist()) == {3, 5, 7}


def test_upsample_argmax_scores_every_class_when_too_many_can_win():
    from fcn_zoo.labels import upsample_argmax_candidates

    noise = torch.randn(19, 16, 16, generator=torch.Generator().manual_seed(0))  # untrained: all contested
    assert upsample_argmax_candidates(noise, 100, 100, budget_bytes=1 << 20) is None


def test_bf16_on_cpu_runs_the_network_in_bf16_and_keeps_the_labels(tiny_model, photo, monkeypatch):
    seen = []
    forward = tiny_model.forward_features

    def spy(x):
        out = forward(x)
        seen.append((x.dtype, out.dtype))
        return out

    tiny_model.eval_size = (400, 200)  # bf16 is emulated on CPUs without it: keep the image small
    expected = tiny_model.predict(photo).labels
    monkeypatch.setattr(tiny_model, "forward_features", spy)
    got = tiny_model.predict(photo, precision="bf16").labels
    assert seen == [(torch.float32, torch.bfloat16)]  # fp32 image in, the network under bf16 autocast
    assert got.shape == expected.shape and (got == expected).mean() >= 0.99


def test_bf16_on_a_cpu_without_bf16_instructions_warns_that_it_is_slower(tiny_model, photo, monkeypatch, caplog):
    from fcn_zoo import protocol as predict_module

    monkeypatch.setattr(predict_module, "cpu_has_bf16", lambda: False)
    tiny_model.eval_size = (256, 128)
    with caplog.at_level("WARNING", logger="fcn_zoo.predict"):
        seg = tiny_model.predict(photo[::4, ::4], precision="bf16")
    assert seg.labels.shape == photo[::4, ::4].shape[:2]
    assert any("slower than fp32" in r.getMessage() for r in caplog.records)


def test_compile_gives_the_eager_labels_and_compiles_once_per_model(tiny_model, photo):
    from torch._dynamo.utils import counters

    small = photo[::4, ::4]
    tiny_model.eval_size = (256, 128)
    expected = tiny_model.predict(small).labels
    assert np.array_equal(tiny_model.predict(small, compile=True).labels, expected)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    assert np.array_equal(tiny_model.predict(small, compile=True).labels, expected)
    assert counters["stats"]["unique_graphs"] == graphs  # the second call reused the compiled code
    with pytest.raises(ValueError, match="compile"):
        tiny_model.predict(small, compile=True, engine="onnxruntime")


def test_class_shares_are_plain_python_floats(tiny_model):
    shares = tiny_model.predict(PHOTOS[0]).class_shares()
    assert shares and all(type(v) is float for v in shares.values())
    assert "np." not in repr(shares) and abs(sum(shares.values()) - 1) < 1e-9


def test_arrays_are_documented_as_rgb_where_users_look():
    """A cv2.imread array is BGR and silently gives worse masks: the docstring and the README say so."""
    from fcn_zoo.predict import predict

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for text in (predict.__doc__, fcn_zoo.FCN.predict.__doc__, readme):
        assert "RGB" in text and "BGR" in text and "cv2" in text


def _model_state(model) -> dict:
    """What a caller can see of a model: each submodule's mode, and each tensor's device, layout and values."""
    return {
        "modes": [(name, m.training) for name, m in model.named_modules()],
        "tensors": {k: (v.device, v.dtype, v.stride(), v.clone()) for k, v in model.state_dict().items()},
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "fused": getattr(model, "_fused", False),
    }


def _same_state(a: dict, b: dict) -> bool:
    return (a["modes"] == b["modes"] and a["requires_grad"] == b["requires_grad"] and a["fused"] == b["fused"]
            and a["tensors"].keys() == b["tensors"].keys()
            and all(x[:3] == y[:3] and torch.equal(x[3], y[3]) for x, y in zip(a["tensors"].values(), b["tensors"].values())))


@pytest.mark.parametrize("setup", ["training", "mc_dropout", "eval"])
def test_predict_and_predict_iter_leave_the_model_as_they_found_it(tiny_model, photo, setup):
    small = photo[::4, ::4]
    tiny_model.eval_size = (256, 128)
    with torch.inference_mode():
        expected = tiny_model.predict(small).labels  # eval mode, the model itself
    if setup == "training":
        tiny_model.train()
    elif setup == "mc_dropout":
        tiny_model.decode_head[-2].train()
    before = _model_state(tiny_model)
    got = [tiny_model.predict(small).labels, tiny_model.predict([small], fuse=True)[0].labels, tiny_model.predict(small, device="cpu").labels]
    got += [seg.labels for _, seg in tiny_model.predict_iter([small, small])]  # a fused copy per stream
    got += [seg.labels for _, seg in tiny_model.predict_iter([small], fuse=False)]
    assert _same_state(_model_state(tiny_model), before)
    # the protocol runs in eval mode whatever the caller left on (fused copies: float rounding only)
    assert all((g == expected).mean() > 0.999 for g in got)
    if setup == "training":  # and training goes on as it was: BatchNorm in training mode, the auxiliary output
        logits, aux = tiny_model(torch.randn(2, 3, 64, 64))
        assert aux is not None


def test_a_generator_that_raises_gives_every_result_before_its_error(tiny_model):
    def photos():
        yield PHOTOS[0]
        yield PHOTOS[0]
        raise RuntimeError("the camera went away")

    for workers, batch in ((0, 1), (2, 1), (0, 4)):
        got = []
        with pytest.raises(RuntimeError, match="the camera went away"):
            for item, seg in tiny_model.predict_iter(photos(), num_workers=workers, batch_size=batch, errors="yield"):
                got.append(seg.size)
        assert len(got) == 2, (workers, batch)


def test_bad_options_are_value_errors_before_anything_runs(tiny_model):
    image = np.zeros((32, 48, 3), np.uint8)
    for options, said in [
        ({"mode": "slide", "window": (16, 16), "stride": (40, 40)}, "larger than the window"),
        ({"mode": "slide", "stride": (0, 0)}, "stride must be"),
        ({"mode": "slide", "window": (0, 0)}, "window must be"),
        ({"mode": "slide", "stride": 5}, "stride must be"),
        ({"device": "gpu"}, "unknown device"),
        ({"tta": "yes"}, "tta must be"),
        ({"batch_size": 2.5}, "batch_size must be"),
        ({"batch_size": True}, "batch_size must be"),
    ]:
        with pytest.raises(ValueError, match=said):
            tiny_model.predict(image, **options)
    with pytest.raises(ValueError, match="TTA scales"):
        TTA(scales=())
    for stream_options, said in [({"num_workers": 1.5}, "num_workers"), ({"prefetch": 0}, "prefetch")]:
        with pytest.raises(ValueError, match=said):
            tiny_model.predict_iter([image], **stream_options)


def test_cpu_0_is_the_cpu_and_a_thin_strip_is_segmented(tiny_model):
    from fcn_zoo.engine import Predictor

    assert Predictor(tiny_model, device="cpu:0").model is tiny_model  # no copy for the CPU it is on
    strip = np.full((1, 300, 3), 128, np.uint8)
    tiny_model.eval_size = (96, 64)
    assert eval_resize_shape(1, 300, tiny_model.eval_size) == (1, 96)
    assert tiny_model.predict(strip).labels.shape == (1, 300)
    assert tiny_model.predict(strip, tta=True).labels.shape == (1, 300)


def test_each_result_of_a_batch_holds_its_own_logits_and_results_compare_as_objects(tiny_model):
    first, second = tiny_model.predict([PHOTOS[0], PHOTOS[0]], batch_size=2)
    for seg in (first, second):
        logits = seg.logits[0]
        assert logits.untyped_storage().nbytes() == logits.numel() * logits.element_size()  # not the batch's
    assert first == first and first != second


def test_tta_bands_equal_interpolation_of_the_summed_sets_and_widen_only_their_rows(monkeypatch):
    import torch.nn.functional as F

    from fcn_zoo.labels import upsample_argmax, upsample_softmax

    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(1, 7, h, w, generator=generator) for h, w in ((5, 9), (8, 13), (11, 19))]
    size = (37, 61)
    summed = sum(F.interpolate(lg, size=size, mode="bilinear", align_corners=False) for lg in logits)[0]
    widened, interpolate = [], F.interpolate
    monkeypatch.setattr(F, "interpolate", lambda x, **k: widened.append(x.shape[2]) or interpolate(x, **k))
    for budget in (7 * 61 * 4 * 5, 1 << 20):  # a band of one row, and one band
        widened.clear()
        assert torch.equal(upsample_argmax(logits, size, budget_bytes=budget, prune=False), summed.argmax(0))
        confidence = upsample_softmax(logits, size, budget_bytes=budget)
        assert torch.allclose(confidence, (summed / 3).softmax(0).amax(0), atol=1e-6)
        if budget < 1 << 20:  # a band of one output row widens the two input rows it blends, not a whole set
            assert max(widened) <= 2, max(widened)


def test_a_split_convolution_without_relu_runs_fused(monkeypatch):
    from fcn_zoo import _fusion

    torch.manual_seed(0)
    model = fcn_zoo.FCN(num_classes=5, backbone="resnet18", head_channels=128, aux_channels=None).eval()
    classifier = model.decode_head.classifier.weight
    monkeypatch.setattr(_fusion, "SPLIT_BYTES", classifier.numel() * 4 // 2)  # the classifier in two slices
    assert _fusion.input_splits(classifier) == 2
    fused = model.fuse(inplace=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        expected, got = model(x), fused(x)
    assert torch.allclose(got, expected, atol=1e-3)
    assert not any(m._failed for m in fused.modules() if isinstance(m, _fusion.ConvAct)) or not _fusion.onednn_available()


def test_a_label_or_prediction_outside_the_classes_is_an_error_not_a_wrong_count():
    from fcn_zoo.metrics import ConfusionMatrix

    matrix = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="a label value outside 0..2"):
        matrix.update(torch.tensor([0, 1]), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="a prediction value outside 0..2"):
        matrix.update(torch.tensor([0, 3]), torch.tensor([0, 0]))
    matrix.update(torch.tensor([0, 2, 1]), torch.tensor([0, 255, 1]))  # 255 is ignored
    assert matrix.matrix.sum() == 2


def test_a_live_source_gives_each_result_before_it_is_asked_for_the_next(tiny_model):
    """Without reader threads, each image is read when the network needs it: a source that makes item k only
    once result k-1 is out (a camera answered frame by frame, a request answered by its result) gets it.
    Before, the stream asked for item k before giving result k-1, and waited for ever."""
    image = np.zeros((40, 56, 3), np.uint8)
    results = []

    def source():
        for k in range(3):
            assert len(results) == k, f"item {k} asked for before result {k - 1} was given"
            yield image

    for _, seg in tiny_model.predict_iter(source(), num_workers=0, fuse=False):
        results.append(seg)
    assert len(results) == 3


def test_a_failed_batch_is_retried_image_by_image_with_its_memory_freed(tiny_model):
    """A batch that fails (out of memory, say) is retried one image at a time, after what the failed forward
    held is freed: before, the exception's traceback kept the batch's input and activations alive through
    every retry, which on a GPU would run out of memory again."""
    import weakref

    held, alive_in_retries = [], []
    features = tiny_model.forward_features

    def forward_features(x):
        if x.shape[0] > 1:
            activation = torch.ones(1 << 16)  # what a forward pass holds when it fails
            held.append(weakref.ref(activation))
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        alive_in_retries.append(any(ref() is not None for ref in held))
        return features(x)

    tiny_model.forward_features = forward_features
    try:
        segs = tiny_model.predict([np.zeros((40, 56, 3), np.uint8)] * 3, batch_size=3)
    finally:
        del tiny_model.forward_features
    assert len(segs) == 3 and len(held) == 1 and alive_in_retries == [False, False, False]
