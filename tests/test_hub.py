"""Each route from a name to weights, offline: Hub cache, reference URL, local folder, local .pth."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fcn_zoo
from conftest import QuietHandler, serve_folder, tiny_fcn
from fcn_zoo import hub, zoo
from reference import build_reference_fcn, reference_logits, save_reference_checkpoint

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def build_hub_cache(cache: Path, repo_id: str, commit: str, folder: Path) -> None:
    """Lay out a Hugging Face cache entry by hand: blobs, a snapshot of symlinks, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in folder.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, repo / "blobs" / digest)
        (repo / "snapshots" / commit / f.name).symlink_to(Path("../..") / "blobs" / digest)


@pytest.fixture(scope="session")
def reference_mirror(tmp_path_factory):
    """A folder laid out like the reference's release page, holding fcn_resnet50os16_voc.pth."""
    folder = tmp_path_factory.mktemp("mirror")
    model = build_reference_fcn(50, 16, num_classes=21, seed=11)
    save_reference_checkpoint(model, folder / "fcn_resnet50os16_voc.pth")
    return folder, model


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_zoo_name_resolves_from_the_pinned_hub_revision_offline(isolated_caches, tiny_folder, monkeypatch):
    row = dataclasses.replace(zoo.CHECKPOINTS["fcn_resnet50os8_voc"], hub_revision=COMMIT)
    monkeypatch.setitem(zoo.CHECKPOINTS, row.name, row)
    build_hub_cache(isolated_caches / "hf_cache", row.hub_repo_id, COMMIT, tiny_folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    model = fcn_zoo.from_pretrained("fcn_resnet50os8_voc")

    assert _same_weights(model, fcn_zoo.from_pretrained(tiny_folder))
    assert not model.training
    assert hub.is_cached("fcn_resnet50os8_voc")


def test_hub_repo_id_with_revision_resolves_from_the_cache(isolated_caches, tiny_folder):
    build_hub_cache(isolated_caches / "hf_cache", "someone/tiny-fcn", COMMIT, tiny_folder)

    by_suffix = fcn_zoo.from_pretrained(f"someone/tiny-fcn@{COMMIT}", local_files_only=True)
    by_argument = fcn_zoo.from_pretrained("someone/tiny-fcn", revision=COMMIT, local_files_only=True)

    assert _same_weights(by_suffix, by_argument)
    assert by_suffix.class_names[15] == "person"


def test_zoo_name_downloads_converts_and_caches_the_reference_pth(reference_mirror, monkeypatch):
    folder, reference = reference_mirror
    QuietHandler.requests.clear()
    with serve_folder(folder) as url:
        monkeypatch.setenv("FCN_ZOO_REFERENCE_URL", url)
        model = fcn_zoo.from_pretrained("fcn_resnet50os16_voc")
    assert QuietHandler.requests == ["/fcn_resnet50os16_voc.pth"]

    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        assert (model(x) - reference_logits(reference, x)).abs().max() < 1e-4
    assert model.class_names == list(fcn_zoo.DATASETS["voc"].classes)

    cached = hub.cache_root() / "reference" / "fcn_resnet50os16_voc"
    provenance = json.loads((cached / "provenance.json").read_text())
    assert provenance["source_sha256"] == hashlib.sha256((folder / "fcn_resnet50os16_voc.pth").read_bytes()).hexdigest()
    assert not list(cached.parent.glob(".*")), "temporary files were left in the cache"

    # the server is gone and downloads are off: the second load comes from the cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = fcn_zoo.from_pretrained("fcn_resnet50os16_voc")
    assert _same_weights(model, again)


def test_a_download_with_the_wrong_sha256_is_refused(reference_mirror, monkeypatch):
    folder, _ = reference_mirror
    row = dataclasses.replace(zoo.CHECKPOINTS["fcn_resnet50os16_voc"], sha256="0" * 64)
    monkeypatch.setitem(zoo.CHECKPOINTS, row.name, row)
    with serve_folder(folder) as url:
        monkeypatch.setenv("FCN_ZOO_REFERENCE_URL", url)
        with pytest.raises(fcn_zoo.WeightsError, match="sha256"):
            fcn_zoo.from_pretrained("fcn_resnet50os16_voc")
    assert not hub.is_cached("fcn_resnet50os16_voc")


class TruncatingHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000000")
        self.end_headers()
        self.wfile.write(b"PK" + b"\0" * 1000)  # then hang up

    def log_message(self, *args):
        pass


def test_a_truncated_download_is_refused_and_leaves_nothing(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), TruncatingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("FCN_ZOO_REFERENCE_URL", f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(fcn_zoo.FCNZooError, match="downloading"):
            fcn_zoo.from_pretrained("fcn_resnet50os8_voc")
    finally:
        server.shutdown()
        server.server_close()
    leftovers = [p for p in hub.cache_root().rglob("*") if p.is_file() and ".locks" not in p.parts]  # lock files aside
    assert leftovers == []


@pytest.mark.parametrize("how", ["env", "argument"])
def test_offline_with_an_empty_cache_fails_fast_and_says_what_to_do(monkeypatch, how):
    kwargs = {}
    if how == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        kwargs["local_files_only"] = True
    start = time.perf_counter()
    with pytest.raises(fcn_zoo.NotCachedError) as e:
        fcn_zoo.from_pretrained("fcn_resnet101os8_cityscapes", **kwargs)
    assert time.perf_counter() - start < 1.0
    assert "fcn-zoo download fcn_resnet101os8_cityscapes" in str(e.value)
    assert ("HF_HUB_OFFLINE" if how == "env" else "local_files_only") in str(e.value)


def test_unknown_name_suggests_the_closest(tiny_folder):
    with pytest.raises(fcn_zoo.UnknownModelError) as e:
        fcn_zoo.from_pretrained("fcn_resnet50os8_vco")
    assert "fcn_resnet50os8_voc" in str(e.value)
    with pytest.raises(FileNotFoundError):
        fcn_zoo.from_pretrained("missing/folder/weights.pth")


def test_num_classes_reinitialises_only_the_classifiers(tiny_folder, caplog):
    original = fcn_zoo.from_pretrained(tiny_folder)
    with caplog.at_level(logging.WARNING, logger="fcn_zoo"):
        model = fcn_zoo.from_pretrained(tiny_folder, num_classes=5)
    assert "freshly initialised" in caplog.text and "21 classes" in caplog.text
    assert model.num_classes == 5 and model.class_names == [f"class_{i}" for i in range(5)]
    assert model.decode_head.classifier.weight.shape == (5, 32, 1, 1)
    assert model.auxiliary_head.classifier.weight.shape == (5, 16, 1, 1)
    ours, theirs = model.state_dict(), original.state_dict()
    kept = [k for k in ours if ours[k].shape == theirs[k].shape]
    assert len(kept) == len(ours) - 4
    assert all(torch.equal(ours[k], theirs[k]) for k in kept)
    with pytest.raises(ValueError, match="num_classes"):
        fcn_zoo.from_pretrained(tiny_folder, num_classes=0)


def test_loading_is_strict_and_names_the_keys(tiny_folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    state = load_file(broken / "model.safetensors")
    state["decode_head.99.weight"] = torch.zeros(1)
    del state["backbone.layer1.0.conv1.weight"]
    save_file(state, broken / "model.safetensors")
    with pytest.raises(fcn_zoo.WeightsError) as e:
        fcn_zoo.from_pretrained(broken)
    assert "backbone.layer1.0.conv1.weight" in str(e.value) and "decode_head.99.weight" in str(e.value)

    (broken / "model.safetensors").unlink()
    with pytest.raises(fcn_zoo.WeightsError, match="model.safetensors"):
        fcn_zoo.from_pretrained(broken)


def test_loading_without_strict_fills_only_the_tensors_the_file_lacks(tmp_path, caplog):
    """A file without backbone.bn1.bias: with strict=False that one tensor is freshly initialised (0) and
    named in a warning; bn1's weight and running statistics, and every other tensor, are the file's."""
    model = tiny_fcn()
    with torch.no_grad():
        model.backbone.bn1.weight.fill_(3.0)
    model.save_pretrained(tmp_path / "partial")
    state = load_file(tmp_path / "partial" / "model.safetensors")
    del state["backbone.bn1.bias"]
    save_file(state, tmp_path / "partial" / "model.safetensors")

    with caplog.at_level(logging.WARNING, logger="fcn_zoo.weights"):
        loaded = fcn_zoo.FCN.from_pretrained(tmp_path / "partial", strict=False)
    assert torch.all(loaded.backbone.bn1.weight == 3.0)
    assert torch.all(loaded.backbone.bn1.bias == 0)
    ours = loaded.state_dict()
    assert all(torch.equal(ours[k], state[k]) for k in state)
    assert "lacks 1 tensor(s) of the model, freshly initialised: backbone.bn1.bias" in caplog.text


def test_save_pretrained_round_trip_keeps_config_and_logits(tmp_path):
    model = tiny_fcn(num_classes=19, dataset="cityscapes")
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["num_classes"] == 19 and config["backbone"] == "resnet18d" and config["dataset"] == "cityscapes"
    loaded = fcn_zoo.from_pretrained(tmp_path / "saved")
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.eval_size == (2048, 1024)


def test_a_mirror_with_only_the_older_train_name_is_used_and_recorded(reference_mirror, tmp_path, monkeypatch):
    """The reference named its files <name>_train.pth until late 2023: tried after <name>.pth gives 404."""
    folder, reference = reference_mirror
    old = tmp_path / "old-mirror"
    old.mkdir()
    shutil.copy(folder / "fcn_resnet50os16_voc.pth", old / "fcn_resnet50os16_voc_train.pth")
    QuietHandler.requests.clear()
    with serve_folder(old) as url:
        monkeypatch.setenv("FCN_ZOO_REFERENCE_URL", url)
        model = fcn_zoo.from_pretrained("fcn_resnet50os16_voc")
    assert QuietHandler.requests == ["/fcn_resnet50os16_voc.pth", "/fcn_resnet50os16_voc_train.pth"]
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        assert (model(x) - reference_logits(reference, x)).abs().max() < 1e-4
    cached = hub.cache_root() / "reference" / "fcn_resnet50os16_voc"
    provenance = json.loads((cached / "provenance.json").read_text())
    assert provenance["source_url"] == f"{url}/fcn_resnet50os16_voc_train.pth"
    assert f"{url}/fcn_resnet50os16_voc_train.pth" in (cached / "README.md").read_text()

    with serve_folder(tmp_path) as url:  # neither name there: both named in the error
        monkeypatch.setenv("FCN_ZOO_REFERENCE_URL", url)
        with pytest.raises(fcn_zoo.FCNZooError, match="fcn_resnet101os8_voc.pth and .*fcn_resnet101os8_voc_train.pth"):
            fcn_zoo.from_pretrained("fcn_resnet101os8_voc")


def test_a_local_file_with_the_older_train_name_is_recognised_as_its_row(tmp_path):
    reference = build_reference_fcn(50, 16, num_classes=19, seed=3)
    path = save_reference_checkpoint(reference, tmp_path / "fcn_resnet50os16_cityscapes_train.pth")
    model = fcn_zoo.from_pretrained(path)
    assert model.dataset == "cityscapes" and model.class_names[:2] == ["road", "sidewalk"]
    assert model.eval_size == (2048, 1024)  # evaluated at Cityscapes' own size, not the default 2048x512


def test_every_folder_describes_itself_and_old_folders_still_load(tmp_path, tiny_folder):
    """A fine-tuned model on the Hub loads with its own class names, colours and protocol, with no zoo table."""
    model = tiny_fcn(num_classes=3, dataset=None)
    model.class_names, model.palette = ["sky", "road", "tree"], [(0, 0, 255), (128, 128, 128), (0, 255, 0)]
    model.mean, model.std, model.eval_size, model.crop_size = (0.0, 0.0, 0.0), (255.0, 255.0, 255.0), (1024, 256), (256, 256)
    model.save_pretrained(tmp_path / "mine")
    config = json.loads((tmp_path / "mine" / "config.json").read_text())
    assert config["class_names"] == ["sky", "road", "tree"] and config["palette"][0] == [0, 0, 255]
    assert config["mean"] == [0.0, 0.0, 0.0] and config["eval_size"] == [1024, 256] and config["crop_size"] == [256, 256]

    build_hub_cache(tmp_path / "hf", "me/my-fcn", COMMIT, tmp_path / "mine")
    loaded = fcn_zoo.from_pretrained(f"me/my-fcn@{COMMIT}", cache_dir=tmp_path / "hf", local_files_only=True)
    assert (loaded.class_names, loaded.palette) == (model.class_names, model.palette)
    assert (loaded.mean, loaded.std, loaded.eval_size, loaded.crop_size) == (model.mean, model.std, (1024, 256), (256, 256))
    from conftest import PHOTOS

    seg = loaded.predict(PHOTOS[0])
    assert seg.class_names == ["sky", "road", "tree"] and seg.palette[1] == (128, 128, 128)

    old = tmp_path / "old"  # written before config.json carried the metadata: the dataset key alone
    shutil.copytree(tiny_folder, old)
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in ("class_names", "palette", "mean", "std", "eval_size", "crop_size")}))
    assert fcn_zoo.from_pretrained(old).class_names == list(fcn_zoo.DATASETS["voc"].classes)


def test_the_cached_weights_have_the_same_permissions_as_the_other_cached_files(reference_mirror, monkeypatch):
    folder, _ = reference_mirror
    with serve_folder(folder) as url:
        monkeypatch.setenv("FCN_ZOO_REFERENCE_URL", url)
        fcn_zoo.from_pretrained("fcn_resnet50os16_voc")
    cached = hub.cache_root() / "reference" / "fcn_resnet50os16_voc"
    modes = {p.name: p.stat().st_mode & 0o777 for p in cached.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == modes["README.md"], modes


def test_a_page_served_for_the_file_is_not_recorded_and_a_damaged_cache_entry_is_remade(reference_mirror, tmp_path, monkeypatch):
    folder, reference = reference_mirror
    served = tmp_path / "served"
    served.mkdir()
    (served / "fcn_resnet50os16_voc.pth").write_text("<html>down for maintenance</html>")
    with serve_folder(served) as url:
        monkeypatch.setenv("FCN_ZOO_REFERENCE_URL", url)
        with pytest.raises(fcn_zoo.WeightsError) as refused:
            fcn_zoo.from_pretrained("fcn_resnet50os16_voc")
        assert str(refused.value).startswith(f"{url}/fcn_resnet50os16_voc.pth: not a checkpoint of plain tensors")
        assert not (hub.cache_root() / "known_hashes.json").exists()  # the page's hash is not the row's
        shutil.copy(folder / "fcn_resnet50os16_voc.pth", served)  # the mirror mended: its file is taken
        model = fcn_zoo.from_pretrained("fcn_resnet50os16_voc")
        cached = hub.cache_root() / "reference" / "fcn_resnet50os16_voc"
        (cached / "model.safetensors").unlink()  # a cache entry that lost its weights is converted again
        again = fcn_zoo.from_pretrained("fcn_resnet50os16_voc")
    assert _same_weights(model, again) and (cached / "model.safetensors").is_file()
    assert not list(cached.parent.glob(".*")), "temporary files were left in the cache"


def test_a_hub_repo_cached_without_its_weights_is_told_at_once(isolated_caches, tiny_folder, monkeypatch):
    import time

    partial = isolated_caches / "config-only"
    partial.mkdir()
    shutil.copy(tiny_folder / "config.json", partial)
    build_hub_cache(Path(os.environ["HF_HUB_CACHE"]), "me/half", COMMIT, partial)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: no Hub
    started = time.perf_counter()
    with pytest.raises(fcn_zoo.FCNZooError, match="me/half: the Hugging Face Hub cannot be reached"):
        fcn_zoo.from_pretrained("me/half")
    assert time.perf_counter() - started < 10  # not huggingface_hub's ~24 s of retries


def test_a_local_pth_whose_name_gives_no_output_stride_says_how_to_load_it(reference_mirror, tmp_path):
    folder, _ = reference_mirror
    shutil.copy(folder / "fcn_resnet50os16_voc.pth", tmp_path / "weights.pth")
    with pytest.raises(fcn_zoo.WeightsError, match="the output stride is not stored") as refused:
        fcn_zoo.from_pretrained(tmp_path / "weights.pth")
    assert f"`fcn-zoo convert {tmp_path / 'weights.pth'} --from reference --output-stride 8 --out DIR`" in str(refused.value)
    assert "pass --output-stride" not in str(refused.value)  # loading has no such option


def test_a_zoo_name_is_the_row_even_beside_a_folder_of_that_name(tiny_folder, tmp_path, monkeypatch, caplog):
    """`fcn-zoo predict NAME img --out NAME` leaves a folder NAME here; the next run must still load the row."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_folder, tmp_path / "fcn_resnet50os8_voc")
    cached = hub.cache_root() / "reference" / "fcn_resnet50os8_voc"
    shutil.copytree(tiny_folder, cached)
    assert hub.source_kind("fcn_resnet50os8_voc") == "zoo" and hub.source_kind("./fcn_resnet50os8_voc") == "folder"
    with caplog.at_level(logging.WARNING, logger="fcn_zoo"):
        assert hub.resolve("fcn_resnet50os8_voc", local_files_only=True) == cached
    assert "./fcn_resnet50os8_voc" in caplog.text and len(caplog.records) == 1
    assert hub.resolve("./fcn_resnet50os8_voc") == Path("fcn_resnet50os8_voc")


def test_a_killed_loads_temporary_folders_are_removed_by_the_next_load(monkeypatch):
    stale = hub.cache_root() / "reference" / ".fcn_resnet50os8_voc-k1ll3d"
    stale.mkdir(parents=True)
    (stale / "fcn_resnet50os8_voc.pth").write_bytes(b"\0" * 1000)  # a download cut by SIGKILL
    other = hub.cache_root() / "reference" / ".fcn_resnet50os16_voc-k1ll3d"  # another row's: maybe in use
    other.mkdir()
    with pytest.raises(fcn_zoo.FCNZooError, match="downloading"):  # nothing listens at the mirror
        fcn_zoo.from_pretrained("fcn_resnet50os8_voc")
    assert not stale.exists() and other.exists()


def test_a_stray_int8_file_beside_fp32_weights_does_not_make_the_folder_int8(tiny_folder, tmp_path):
    folder = tmp_path / "stray"
    shutil.copytree(tiny_folder, folder)
    (folder / "openvino_model.xml").write_text("<net/>")
    assert _same_weights(fcn_zoo.from_pretrained(folder), fcn_zoo.from_pretrained(tiny_folder))


def test_hf_hub_offline_says_that_it_is_what_blocks_the_download(monkeypatch, tiny_folder):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("fcn_resnet50os8_voc", "me/some-fcn"):  # `fcn-zoo download NAME` itself gets this message
        with pytest.raises(fcn_zoo.NotCachedError) as e:
            hub.resolve(name)
        assert "HF_HUB_OFFLINE=1 disables downloads: unset HF_HUB_OFFLINE to download it" in str(e.value)
        assert "on a machine with network" not in str(e.value).lower()


class RedirectLoopHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(302)
        self.send_header("Location", self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_download_failures_and_bad_settings_are_one_line_naming_the_cause(tmp_path, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RedirectLoopHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:  # urllib's redirect-loop error runs over three lines
        monkeypatch.setenv("FCN_ZOO_REFERENCE_URL", f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(fcn_zoo.FCNZooError) as e:
            fcn_zoo.from_pretrained("fcn_resnet50os8_voc")
    finally:
        server.shutdown()
        server.server_close()
    assert "\n" not in str(e.value) and "infinite loop" in str(e.value)

    served = tmp_path / "served"
    served.mkdir()
    (served / "fcn_resnet50os8_voc.pth").write_bytes(b"PK")
    QuietHandler.requests.clear()
    with serve_folder(served) as url:
        monkeypatch.setenv("FCN_ZOO_REFERENCE_URL", url)
        monkeypatch.setenv("FCN_ZOO_DOWNLOAD_TIMEOUT", "abc")
        with pytest.raises(fcn_zoo.FCNZooError, match=r"FCN_ZOO_DOWNLOAD_TIMEOUT='abc': expected a positive number"):
            fcn_zoo.from_pretrained("fcn_resnet50os8_voc")
        monkeypatch.delenv("FCN_ZOO_DOWNLOAD_TIMEOUT")
        (hub.cache_root() / "known_hashes.json").write_text("[1, 2]")  # JSON, not an object: refused before the transfer
        with pytest.raises(fcn_zoo.WeightsError, match="known_hashes.json: expected a JSON object, got list"):
            fcn_zoo.from_pretrained("fcn_resnet50os8_voc")
    assert QuietHandler.requests == []
