"""The demo page: its API through gradio_client, bad uploads, the model cache, and a real browser."""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fcn_zoo
from conftest import PHOTOS, png_header_only, serve_folder
from fcn_zoo import demo as demo_module
from fcn_zoo.demo import ModelCache, build_app, model_choices
from reference import build_reference_fcn, save_reference_checkpoint

NAME = "fcn_resnet50os16_voc"
ARTIFACTS = Path(__file__).resolve().parents[1] / ".artifacts"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The demo serving NAME on 127.0.0.1; the model comes from the reference file on a loopback mirror."""
    mirror = tmp_path_factory.mktemp("mirror")
    save_reference_checkpoint(build_reference_fcn(50, 16, num_classes=21, seed=2), mirror / f"{NAME}.pth")
    cache = tmp_path_factory.mktemp("cache")
    saved = {k: os.environ.get(k) for k in ("FCN_ZOO_CACHE", "FCN_ZOO_REFERENCE_URL")}
    models = ModelCache("cpu", capacity=2)
    try:
        with serve_folder(mirror) as url:
            os.environ.update(FCN_ZOO_CACHE=str(cache), FCN_ZOO_REFERENCE_URL=url)
            model = models.get(NAME)  # downloaded and converted once; the page keeps it loaded
            model.eval_size = (400, 200)  # smaller than VOC's 512: the page is tested, not the network
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    app = build_app([NAME, "fcn_resnet101os8_ade20k"], models=models)  # the second is not cached
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", model
    app.close()


def _segment(client, photo, *, name=NAME, tta=False, slide=False, precision="fp32", opacity=0.5):
    from gradio_client import handle_file

    return client.predict(handle_file(str(photo)) if photo else None, name, tta, slide, precision, opacity, api_name="/segment")


def test_the_api_gives_the_mask_of_model_predict_and_queues_concurrent_requests(page):
    from gradio_client import Client, handle_file

    url, model = page
    client = Client(url, verbose=False)
    overlay, mask, legend, confidence, timing = _segment(client, PHOTOS[0], opacity=0.3)
    seg = model.predict(PHOTOS[0])
    assert np.array_equal(np.asarray(Image.open(mask).convert("RGB")), np.asarray(seg.colorize().convert("RGB")))
    assert np.array_equal(np.asarray(Image.open(overlay).convert("RGB")), np.asarray(seg.overlay(alpha=0.3)))
    assert np.array_equal(np.asarray(Image.open(confidence)), np.round(seg.confidence * 255).astype(np.uint8))
    top = max(seg.class_shares().items(), key=lambda kv: kv[1])
    assert f"{top[0]}: {100 * top[1]:.1f}%" in legend and " s on cpu" in timing

    # three users at once: queued, each gets its own photo's mask
    jobs = [client.submit(handle_file(str(p)), NAME, False, False, "fp32", 0.5, api_name="/segment") for p in PHOTOS]
    for photo, job in zip(PHOTOS, jobs):
        got = np.asarray(Image.open(job.result(timeout=120)[1]).convert("RGB"))
        assert np.array_equal(got, np.asarray(model.predict(photo).colorize().convert("RGB"))), photo.name


def test_bad_uploads_are_a_message_and_the_page_keeps_serving(page, tmp_path, monkeypatch):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    url, _ = page
    client = Client(url, verbose=False)
    (tmp_path / "notes.jpg").write_text("this is a text file, not a photograph\n")
    (tmp_path / "bomb.png").write_bytes(png_header_only(40000, 40000))
    (tmp_path / "huge.png").write_bytes(png_header_only(9000, 7000))
    cases = {
        "notes.jpg": "notes.jpg is not an image the demo can read",
        "bomb.png": "bomb.png is not an image the demo can read",
        "huge.png": "The photo is 9000x7000 (63 MP); the demo takes up to 50 MP: resize it first.",
        None: "Upload a photo first",
    }
    for name, message in cases.items():
        with pytest.raises(AppError) as raised:
            _segment(client, tmp_path / name if name else None)
        assert message in str(raised.value) and "Traceback" not in str(raised.value), name
    with pytest.raises(AppError, match="could not be loaded"):
        _segment(client, PHOTOS[0], name="fcn_resnet101os8_ade20k")  # not cached, and no network here
    assert _segment(client, PHOTOS[1])[4].endswith("x".join(map(str, Image.open(PHOTOS[1]).size)))  # still serving


def test_a_phone_photo_is_reported_at_its_displayed_size(tmp_path, tiny_model):
    """A JPEG stored 112x72 whose EXIF turns it upright (orientation 6) is shown, and segmented, 72x112."""
    from PIL import ImageOps

    from fcn_zoo.demo import segment
    from fcn_zoo.images import displayed_size

    stored = Image.open(PHOTOS[0]).convert("RGB").resize((112, 72))
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        for suffix in (".jpg", ".png", ".webp"):
            path = tmp_path / f"phone{orientation}{suffix}"
            stored.save(path, exif=exif)
            with Image.open(path) as probe:
                assert displayed_size(probe) == ImageOps.exif_transpose(Image.open(path)).size, path.name
    tiny_model.eval_size = (128, 96)
    timing, seg = segment(ModelCache(loader=lambda name: tiny_model), str(tmp_path / "phone6.jpg"), "tiny",
                          False, False, "fp32", 0.5)[4:]
    assert seg.labels.shape == (112, 72) and timing.endswith(", 72x112")


def test_the_model_cache_keeps_the_most_recently_used():
    loads = []
    cache = ModelCache(capacity=2, loader=lambda name: loads.append(name) or object())
    a = cache.get("a")
    cache.get("b")
    assert cache.get("a") is a and loads == ["a", "b"]
    cache.get("c")  # b is the least recently used
    assert "b" not in cache and "a" in cache and "c" in cache
    cache.get("b")
    assert loads == ["a", "b", "c", "b"]


def test_the_picker_lists_cached_models_first_with_dataset_classes_and_miou(monkeypatch):
    monkeypatch.setattr("fcn_zoo.hub.is_cached", lambda name, cache_dir=None: name == "fcn_resnet101os8_ade20k")
    choices = model_choices()
    assert [name for _, name in choices][0] == "fcn_resnet101os8_ade20k" and len(choices) == 12
    label = dict((n, lab) for lab, n in choices)["fcn_resnet50os16_cityscapes"]
    row = fcn_zoo.CHECKPOINTS["fcn_resnet50os16_cityscapes"]
    assert "Cityscapes" in label and "19 classes" in label and f"mIoU {row.miou:.1f}" in label and "downloads on first use" in label


def test_precision_choices_are_what_the_device_runs_fast(monkeypatch):
    from fcn_zoo.demo import precisions

    monkeypatch.setattr("fcn_zoo._fusion.cpu_has_bf16", lambda: False)
    assert precisions("cpu") == ["fp32"] and precisions("cuda:1") == ["fp32", "bf16", "fp16"]
    monkeypatch.setattr("fcn_zoo._fusion.cpu_has_bf16", lambda: True)
    assert precisions(None) == ["fp32", "bf16"]


def test_the_cli_refuses_an_unknown_model_in_one_line(capsys):
    from fcn_zoo.cli import main

    assert main(["demo", "fcn_resnet50os8_vocc"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fcn-zoo: error: ") and "fcn_resnet50os8_vocc" in err and len(err.splitlines()) == 1


@pytest.mark.skipif(not shutil.which("chromium"), reason="no chromium installed (apt-get install chromium); the browser test needs it")
def test_a_browser_uploads_a_photo_and_sees_the_overlay(page):
    from playwright.sync_api import sync_playwright

    url, _ = page
    photo = PHOTOS[0]
    width, height = Image.open(photo).size
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        try:
            tab = browser.new_page(viewport={"width": 1280, "height": 1000})
            tab.goto(url)
            tab.locator("input[type=file]").first.set_input_files(str(photo))
            tab.wait_for_timeout(500)  # the upload lands
            start = time.perf_counter()
            tab.locator("#segment").click()
            overlay = tab.locator("#overlay img")
            overlay.wait_for(state="visible", timeout=60_000)
            tab.wait_for_function("() => { const i = document.querySelector('#overlay img'); return i && i.complete && i.naturalWidth > 0 }")
            seconds = time.perf_counter() - start
            natural = overlay.evaluate("i => [i.naturalWidth, i.naturalHeight]")
            tab.screenshot(path=str(ARTIFACTS / "demo_page.png"), full_page=True)
        finally:
            browser.close()
    assert abs(natural[0] / natural[1] - width / height) < 0.01, natural
    print(f"upload to overlay: {seconds:.2f} s; screenshot {ARTIFACTS / 'demo_page.png'}")
    assert demo_module.MAX_PIXELS >= width * height


def test_an_upload_that_does_not_decode_is_named_once_by_its_own_name(tmp_path, tiny_model):
    import gradio as gr

    from fcn_zoo.demo import segment

    Image.open(PHOTOS[0]).save(tmp_path / "full.png")
    whole = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(gr.Error) as raised:
        segment(ModelCache(loader=lambda name: tiny_model), str(tmp_path / "cut.png"), "tiny", False, False, "fp32", 0.5)
    assert raised.value.message.startswith("cut.png: cannot read this image") and str(tmp_path) not in raised.value.message


def test_the_model_cache_refuses_no_room_and_a_device_that_is_not_here(monkeypatch):
    from fcn_zoo import devices

    with pytest.raises(fcn_zoo.FCNZooError, match="--max-models 0: must be at least 1"):
        ModelCache(capacity=0)
    monkeypatch.setattr(devices, "no_cuda_device", lambda: "this machine has no NVIDIA driver")
    with pytest.raises(fcn_zoo.FCNZooError, match="--device cuda: this machine has no NVIDIA driver"):
        ModelCache(device="cuda")


def test_a_huge_upload_is_refused_from_its_header_and_messages_name_the_upload_not_the_servers_path(tmp_path, monkeypatch):
    """A TIFF's size was only checked after decoding it whole (hundreds of MB for a 4 MB upload); a file that is
    no image was said with the server's temporary path."""
    import gradio as gr

    from fcn_zoo.demo import segment

    def decoded(*args):
        raise AssertionError("decoded before its size was checked")

    monkeypatch.setattr(demo_module, "displayed_size", decoded)
    Image.new("1", (8000, 8000)).save(tmp_path / "huge.tif", compression="group4")
    models = ModelCache(loader=lambda name: pytest.fail("no model is needed to refuse an upload"))
    with pytest.raises(gr.Error, match=r"The photo is 8000x8000 \(64 MP\)"):
        segment(models, str(tmp_path / "huge.tif"), "tiny", False, False, "fp32", 0.5)
    (tmp_path / "notes.jpg").write_text("not a photo")
    with pytest.raises(gr.Error) as raised:
        segment(models, str(tmp_path / "notes.jpg"), "tiny", False, False, "fp32", 0.5)
    assert "notes.jpg is not an image" in str(raised.value) and str(tmp_path) not in str(raised.value)


def test_demo_arguments_are_checked_before_the_page_is_built(tmp_path, monkeypatch, capsys):
    from fcn_zoo.cli import main

    monkeypatch.setattr(demo_module, "launch", lambda *a, **k: pytest.fail("the page was built"))
    (tmp_path / "photos").mkdir()
    for argv, said in ((["--port", "99999", "fcn_resnet50os8_voc"], "--port 99999: must be 0-65535"),
                       ([str(tmp_path / "missing")], "no such file or folder"),
                       ([str(tmp_path / "photos")], "not a save_pretrained folder")):
        assert main(["demo", *argv]) == 1
        err = capsys.readouterr().err.strip()
        assert said in err and len(err.splitlines()) == 1, err
