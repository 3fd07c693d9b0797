"""int8 models: made by fcn-zoo quantize / fcn_zoo.quantize from a trained model, agreeing with fp32, saved,
shared and run through every door; bf16 told apart from its emulation."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("openvino", reason="the int8 extra (pip install -e '.[int8]') is in the test extra")
pytest.importorskip("nncf", reason="the int8 extra (pip install -e '.[int8]') is in the test extra")

import fcn_zoo  # noqa: E402
from fcn_zoo.cli import main  # noqa: E402
from fcn_zoo.metrics import ConfusionMatrix  # noqa: E402
from sample_data import make_generic  # noqa: E402

QUICK = ["--device", "cpu", "--num-workers", "0", "--no-progress", "--log-interval", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A 3-class resnet10t FCN trained by `fcn-zoo train` on generated shapes (about 30 s), and its data."""
    from training import train as train_module

    root = tmp_path_factory.mktemp("trained")
    data = make_generic(root / "data", n_train=40, n_val=8, seed=3)
    torch.manual_seed(0)
    fcn_zoo.FCN(num_classes=3, backbone="resnet10t", head_channels=64, aux_channels=None).save_pretrained(root / "init")
    assert train_module.main([
        "--init", str(root / "init"), "--data-root", str(data), "--output-dir", str(root / "run"),
        "--max-iters", "60", "--batch-size", "8", "--lr", "0.05", *QUICK,
    ]) == 0
    return root / "run" / "best", data


@pytest.fixture(scope="module")
def int8_folder(trained, tmp_path_factory) -> Path:
    """The trained model quantized through the Python API and saved."""
    from fcn_zoo.quantization import quantize

    best, data = trained
    folder = tmp_path_factory.mktemp("int8") / "q"
    quantize(fcn_zoo.from_pretrained(best), data / "images" / "train", num_samples=10, progress=False,
             source=str(best)).save_pretrained(folder)
    return folder


def _val(data: Path) -> tuple[list[Path], list[np.ndarray]]:
    images = sorted((data / "images" / "val").glob("*.jpg"))
    return images, [np.asarray(Image.open(data / "masks" / "val" / f"{p.stem}.png")) for p in images]


def _miou(segmentations, masks, num_classes: int) -> float:
    matrix = ConfusionMatrix(num_classes)
    for seg, mask in zip(segmentations, masks):
        matrix.update(torch.from_numpy(seg.labels), torch.from_numpy(mask))
    return 100 * matrix.compute()["mIoU"]


def _agreement(a, b) -> float:
    return sum(int((x.labels == y.labels).sum()) for x, y in zip(a, b)) / sum(x.labels.size for x in a)


def test_int8_and_bf16_of_a_trained_model_agree_with_fp32_and_the_card_says_so(trained, tmp_path, capsys):
    best, data = trained
    out = tmp_path / "q"
    assert main([
        "quantize", str(best), "--calibration", str(data / "images" / "train"), "--out", str(out), "--quiet",
        "--validation", str(data / "images" / "val"), "--validation-masks", str(data / "masks" / "val"),
    ]) == 0
    assert str(out) in capsys.readouterr().out

    fp32, int8 = fcn_zoo.from_pretrained(best), fcn_zoo.from_pretrained(out)
    assert isinstance(int8, fcn_zoo.QuantizedFCN) and int8.class_names == fp32.class_names
    images, masks = _val(data)
    reference = fp32.predict(images)
    miou = _miou(reference, masks, 3)
    assert miou >= 70, miou  # a model that has learnt the shapes: agreement on a constant map would prove nothing
    quantized = int8.predict(images)
    in_bf16 = fp32.predict(images, precision="bf16")
    agreement = _agreement(reference, quantized)
    assert agreement >= 0.99, agreement
    assert _miou(quantized, masks, 3) >= miou - 1.0
    assert main(["evaluate", str(out), "--data-root", str(data), "--output-dir", str(tmp_path / "eval")]) == 0
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert abs(100 * evaluated["mIoU"] - _miou(quantized, masks, 3)) < 1e-3  # fcn-zoo evaluate runs the int8 model
    assert _agreement(reference, in_bf16) >= 0.995

    recorded = json.loads((out / "config.json").read_text())["quantization"]
    assert recorded["calibration"]["images"] == 40 and recorded["agreement"]["images"] == 8
    assert recorded["agreement"]["held_out"] is True
    assert abs(recorded["agreement"]["pixels"] - agreement) < 0.005
    assert abs(recorded["agreement"]["miou_fp32"] - miou) < 0.5
    card = (out / "README.md").read_text()
    assert f"{100 * recorded['agreement']['pixels']:.2f}% of pixels" in card
    assert f"fp32 {recorded['agreement']['miou_fp32']:.2f}, int8 {recorded['agreement']['miou_int8']:.2f}" in card
    assert "40 images from" in card


def test_int8_is_called_like_the_model(int8_folder, trained):
    int8, fp32 = fcn_zoo.from_pretrained(int8_folder), fcn_zoo.from_pretrained(trained[0])
    x = fcn_zoo.preprocess(fp32, np.asarray(Image.open(sorted((trained[1] / "images" / "val").glob("*.jpg"))[0])))
    with torch.inference_mode():
        logits, expected = int8(x), fp32(x)
    assert logits.shape == expected.shape and logits.dtype == torch.float32
    assert (logits.argmax(1) == expected.argmax(1)).float().mean() >= 0.98
    with pytest.raises(RuntimeError, match="for inference"):
        int8.train()


def test_an_int8_folder_runs_through_fcn_zoo_predict_predict_iter_and_the_demo(int8_folder, trained, tmp_path, capsys):
    from fcn_zoo.demo import ModelCache, segment

    images, _ = _val(trained[1])
    int8 = fcn_zoo.from_pretrained(int8_folder)
    expected = {p.stem: s.labels for p, s in zip(images, int8.predict(images))}

    assert main(["predict", str(int8_folder), str(trained[1] / "images" / "val"), "--out", str(tmp_path / "m"), "--quiet"]) == 0
    for stem, labels in expected.items():
        assert np.array_equal(np.asarray(Image.open(tmp_path / "m" / f"{stem}.png")), labels)

    streamed = {Path(item).stem: seg.labels for item, seg in int8.predict_iter(images)}
    assert all(np.array_equal(streamed[k], v) for k, v in expected.items())

    *_, timing, seg = segment(ModelCache(), str(images[0]), str(int8_folder), False, False, "auto", 0.5)
    assert np.array_equal(seg.labels, expected[images[0].stem]) and "on cpu" in timing

    assert main(["info", str(int8_folder)]) == 0
    assert "int8 (OpenVINO" in capsys.readouterr().out


def test_an_empty_or_unreadable_calibration_is_one_line_fast_and_creates_nothing(trained, tmp_path):
    empty, broken = tmp_path / "empty", tmp_path / "broken"
    empty.mkdir()
    broken.mkdir()
    for i in range(3):
        (broken / f"{i}.jpg").write_bytes(b"not a jpeg")
    for folder, said in ((empty, "no images"), (broken, "none of the 3 images could be read")):
        out = tmp_path / f"q-{folder.name}"
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "fcn_zoo.cli", "quantize", str(trained[0]), "--calibration", str(folder),
                               "--out", str(out)], capture_output=True, text=True)
        elapsed = time.perf_counter() - started
        assert done.returncode == 1 and done.stdout == ""
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and str(folder) in lines[0] and said in lines[0], done.stderr
        assert elapsed < 3.0, elapsed
        assert not out.exists()


def test_unreadable_calibration_images_are_named_and_skipped(trained, int8_folder, tmp_path, caplog):
    from fcn_zoo.quantization import quantize

    best, data = trained
    calibration = sorted((data / "images" / "train").glob("*.jpg"))[:3] + [tmp_path / "bad.jpg"]
    calibration[-1].write_bytes(b"\xff\xd8 cut short")
    with caplog.at_level("WARNING", logger="fcn_zoo.quantization"):
        q = quantize(fcn_zoo.from_pretrained(best), calibration, progress=False)
    assert any("bad.jpg" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    assert q.quantization["calibration"] == {**q.quantization["calibration"], "images": 3, "skipped": 1}
    assert q.quantization["agreement"]["held_out"] is False  # too few to hold any out: the card says so

    from fcn_zoo.weights import state_dict_sha256

    saved = fcn_zoo.from_pretrained(int8_folder)  # calibrated on 10 of the training images
    assert state_dict_sha256(saved) == state_dict_sha256(fcn_zoo.from_pretrained(int8_folder))  # --resume: the same
    assert state_dict_sha256(saved) != state_dict_sha256(q)  # another calibration, other int8 weights: told apart


def test_an_int8_folder_made_by_a_newer_openvino_says_what_to_do(int8_folder, tmp_path):
    import shutil

    from fcn_zoo.errors import WeightsError

    folder = tmp_path / "newer"
    shutil.copytree(int8_folder, folder)
    xml = (folder / "openvino_model.xml").read_text()
    (folder / "openvino_model.xml").write_text(xml.replace('version="11"', 'version="99"', 1))
    config = json.loads((folder / "config.json").read_text())
    config["quantization"]["openvino"] = "2099.1.0"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"made with OpenVINO 2099\.1\.0.*install openvino>=2099\.1\.0, or quantize"):
        fcn_zoo.from_pretrained(folder)


def test_push_to_hub_uploads_the_int8_folder_in_one_commit(int8_folder, monkeypatch):
    calls = []

    class FakeApi:
        def __init__(self, *args, **kwargs):
            pass

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id))
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def upload_folder(self, *, repo_id, folder_path, **kwargs):
            calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
            card = (Path(folder_path) / "README.md").read_text()
            assert 'from_pretrained("me/q")' in card and "int8" in card
            return type("CommitInfo", (), {"oid": "0" * 40})()

    monkeypatch.setattr("huggingface_hub.hub_mixin.HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    fcn_zoo.from_pretrained(int8_folder).push_to_hub("me/q")
    assert calls == [("create_repo", "me/q"),
                     ("upload_folder", "me/q", ["README.md", "config.json", "openvino_model.bin", "openvino_model.xml"])]


def test_bf16_is_native_only_with_avx512_bf16_or_amx(monkeypatch):
    from fcn_zoo import _fusion

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    for avx512_bf16, amx, native in ((False, False, False), (True, False, True), (False, True, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        _fusion.cpu_has_bf16.cache_clear()
        assert _fusion.cpu_has_bf16() is native
    _fusion.cpu_has_bf16.cache_clear()


def test_int8_dot_products_are_found_in_every_instruction_set_that_has_them(monkeypatch):
    """AVX-VNNI (Alder Lake, Sierra Forest) has them too, though torch.cpu._is_vnni_supported() sees AVX512-VNNI only."""
    from fcn_zoo.int8 import cpu_has_int8_dot

    for flags, found in (({}, False), ({"avx512_vnni": True}, True), ({"avx_vnni": True}, True), ({"amx_int8": True}, True)):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda f=flags: f)
        assert cpu_has_int8_dot() is found, flags
    monkeypatch.delattr(torch.cpu, "get_capabilities")  # an older torch: its own queries
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert cpu_has_int8_dot() is False


def test_an_int8_model_on_a_cpu_without_int8_dot_products_says_to_compare_with_fp32(int8_folder, monkeypatch, caplog):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_vnni": False, "avx_vnni": False})
    with caplog.at_level("WARNING", logger="fcn_zoo.int8"):
        fcn_zoo.from_pretrained(int8_folder)
    assert any("no int8 dot-product instructions" in r.getMessage() and "fp32 model" in r.getMessage() for r in caplog.records)


def test_native_bf16_on_a_gpu_is_told_by_its_compute_capability_not_by_emulation(monkeypatch):
    """A V100 or T4 (compute capability 7.x) emulates bf16, though torch.cuda.is_bf16_supported() says yes:
    training runs fp16 with a gradient scaler there, and precision='auto' fp32."""
    from fcn_zoo.protocol import autocast_dtype, native_bf16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    for capability, native in (((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert native_bf16(torch.device("cuda")) is native
        assert autocast_dtype("auto", torch.device("cuda")) == (torch.bfloat16 if native else None)


def test_int8_mistakes_are_one_line_each_and_nothing_is_overwritten(int8_folder, trained, tmp_path):
    import shutil

    from fcn_zoo.errors import WeightsError
    from fcn_zoo.export import export
    from fcn_zoo.quantization import quantize, save_new_folder
    from fcn_zoo.ray import Segmenter

    int8 = fcn_zoo.from_pretrained(int8_folder)
    assert int8.inference_precision in ("f32", "bf16", "f16")  # the short name the card and config.json record
    recorded = json.loads((int8_folder / "config.json").read_text())["quantization"]["agreement"]
    assert recorded["inference_precision"] == int8.inference_precision

    damaged = tmp_path / "damaged"
    shutil.copytree(int8_folder, damaged)
    weights = damaged / "openvino_model.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(WeightsError, match=r"OpenVINO cannot read its int8 network \(.+\); the files may be damaged") as caught:
        fcn_zoo.from_pretrained(damaged)
    assert "install openvino" not in str(caught.value) and "core.cpp" not in str(caught.value)
    wrong = tmp_path / "wrong"
    shutil.copytree(int8_folder, wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "backbone": "resnet999"}))
    with pytest.raises(WeightsError, match="config.json does not describe a valid FCN: unknown timm backbone"):
        fcn_zoo.from_pretrained(wrong)

    with pytest.raises(ValueError, match="int8 already; quantize the fp32 model"):
        quantize(int8, trained[1] / "images" / "train")
    with pytest.raises(fcn_zoo.FCNZooError, match="an int8 model is an OpenVINO network already"):
        export(int8, tmp_path / "q.onnx")
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(fcn_zoo.FCNZooError, match="already exists; pass a new folder"):
        save_new_folder(int8, existing)
    assert list(existing.iterdir()) == [] and not (tmp_path / "q.onnx").exists()

    images = _val(trained[1])[0][:2]  # the Ray Segmenter takes an int8 model as it takes an FCN
    out = Segmenter(int8)({"path": [str(p) for p in images]})
    assert list(out["error"]) == ["", ""]
    assert all(np.array_equal(a, s.labels) for a, s in zip(out["labels"], int8.predict(images)))


def test_validation_images_are_read_before_calibrating_and_an_unreadable_one_is_skipped(trained, tmp_path, caplog):
    import shutil

    from fcn_zoo.quantization import quantize

    best, data = trained
    validation = tmp_path / "val"
    validation.mkdir()
    for image in sorted((data / "images" / "val").glob("*.jpg"))[:2]:
        shutil.copy(image, validation / image.name)
    (validation / "bad.jpg").write_bytes(b"\xff\xd8 cut short")
    model = fcn_zoo.from_pretrained(best)
    calibration = sorted((data / "images" / "train").glob("*.jpg"))[:3]
    with pytest.raises(fcn_zoo.FCNZooError, match="no readable images to measure the agreement on"):
        quantize(model, calibration, validation=[], progress=False)
    with caplog.at_level("WARNING", logger="fcn_zoo.quantization"):
        q = quantize(model, calibration, validation=str(validation), progress=False)  # a folder, as calibration
    assert q.quantization["agreement"]["images"] == 2 and q.quantization["agreement"]["held_out"] is True
    assert any("bad.jpg" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)


def test_an_int8_model_copies(int8_folder, trained):
    import copy

    int8 = fcn_zoo.from_pretrained(int8_folder)
    copied = copy.deepcopy(int8)
    images = _val(trained[1])[0][:2]
    assert copied is not int8 and copied.weights_sha256 == int8.weights_sha256 and not copied.training
    assert all(np.array_equal(a.labels, b.labels) for a, b in zip(copied.predict(images), int8.predict(images)))



def test_an_int8_model_pickles_for_ray_and_a_gpu_machine_runs_it_on_the_cpu(int8_folder, trained, monkeypatch):
    """Ray pickles a Segmenter's arguments: the int8 network travels as its IR. On a machine with a GPU, the
    Segmenter and evaluate run an int8 model on the CPU by default, rather than refusing the default device."""
    import pickle

    from fcn_zoo.ray import Segmenter
    from training.evaluate import _int8_folder

    int8 = fcn_zoo.from_pretrained(int8_folder)
    again = pickle.loads(pickle.dumps(int8))
    images = _val(trained[1])[0][:2]
    assert again.weights_sha256 == int8.weights_sha256 and again.config == int8.config
    assert all(np.array_equal(a.labels, b.labels) for a, b in zip(again.predict(images), int8.predict(images)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for model in (int8_folder, int8):
        assert Segmenter(model).predictor.device.type == "cpu"
    assert _int8_folder(str(int8_folder)) and not _int8_folder(str(trained[0])) and not _int8_folder("fcn_resnet50os8_voc")


def test_saving_over_another_model_leaves_only_the_new_ones_card_and_weights(int8_folder, trained, tmp_path, monkeypatch):
    """huggingface_hub keeps a README.md it finds: saving into a folder that held another model kept that model's
    card (and the other kind's weights, which could then be loaded in place of the new ones)."""
    folder = tmp_path / "m"
    fcn = fcn_zoo.from_pretrained(trained[0])
    int8 = fcn_zoo.from_pretrained(int8_folder)
    fcn.save_pretrained(folder)
    int8.save_pretrained(folder)
    assert not (folder / "model.safetensors").exists() and "OpenVINO" in (folder / "README.md").read_text()
    assert fcn_zoo.from_pretrained(folder).weights_sha256 == int8.weights_sha256
    fcn.save_pretrained(folder)
    assert not (folder / "openvino_model.xml").exists() and "OpenVINO" not in (folder / "README.md").read_text()
    assert isinstance(fcn_zoo.from_pretrained(folder), fcn_zoo.FCN)

    calls = []

    class FakeApi:  # save_pretrained(push_to_hub=True) passes config= itself
        def __init__(self, *args, **kwargs):
            pass

        def create_repo(self, repo_id, **kwargs):
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def upload_folder(self, *, repo_id, folder_path, **kwargs):
            calls.append(sorted(p.name for p in Path(folder_path).iterdir()))
            return type("CommitInfo", (), {"oid": "0" * 40})()

    monkeypatch.setattr("huggingface_hub.hub_mixin.HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    int8.save_pretrained(tmp_path / "pushed", push_to_hub=True, repo_id="me/q")
    assert calls == [["README.md", "config.json", "openvino_model.bin", "openvino_model.xml"]]


def test_validation_masks_that_do_not_fit_are_skipped_before_calibrating_and_tensor_pairs_are_read(trained, tmp_path, caplog):
    """A validation mask of another size, or with values outside the classes, is named and skipped before the
    calibration (before, the whole calibration ran first, then a torch IndexError); a torch dataset's (image,
    mask) tensor pairs are read (before, each was skipped and the agreement fell back on calibration images)."""
    from fcn_zoo.quantization import quantize

    best, data = trained
    images, masks = _val(data)
    wrong_size = Image.fromarray(masks[1][:-4])
    stray = masks[2].copy()
    stray[0, 0] = 7
    pairs = [(images[0], masks[0]), (images[1], wrong_size), (images[2], stray),
             (torch.from_numpy(np.array(Image.open(images[3]).convert("RGB"))).permute(2, 0, 1),
              torch.from_numpy(masks[3].astype(np.int64))[None])]
    model = fcn_zoo.from_pretrained(best)
    calibration = sorted((data / "images" / "train").glob("*.jpg"))[:3]
    with caplog.at_level("WARNING", logger="fcn_zoo.quantization"):
        q = quantize(model, calibration, validation=pairs, progress=False)
    said = [r.getMessage() for r in caplog.records]
    assert any(images[1].name in m and "its mask" in m and "the image" in m and "skipped" in m for m in said), said
    assert any(images[2].name in m and "holds [7]" in m for m in said), said
    assert q.quantization["agreement"]["images"] == 2 and q.quantization["agreement"]["held_out"] is True
