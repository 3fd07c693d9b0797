"""The network and the cache failing in every way: clear errors, fallbacks, nothing half-written loaded."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fcn_zoo
from conftest import QuietHandler, answering, serve_folder
from fcn_zoo import hub, zoo
from reference import build_reference_fcn, save_reference_checkpoint

NAME = "fcn_resnet50os16_voc"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mirror")
    save_reference_checkpoint(build_reference_fcn(50, 16, num_classes=21, seed=2), folder / f"{NAME}.pth")
    return folder


@pytest.fixture()
def hub_endpoint(monkeypatch):
    """Point huggingface_hub at a loopback server; returns a function that starts one with a status."""
    import huggingface_hub.constants as constants

    servers = []

    def start(status):
        server, url = answering(status)
        servers.append(server)
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
        return url

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_pinned_row_falls_back_to_the_reference_when_the_hub_says_404(hub_endpoint, mirror, monkeypatch):
    hub_endpoint(404)
    monkeypatch.setitem(zoo.CHECKPOINTS, NAME, dataclasses.replace(zoo.CHECKPOINTS[NAME], hub_revision=COMMIT))
    QuietHandler.requests.clear()
    with serve_folder(mirror) as url:
        monkeypatch.setenv("FCN_ZOO_REFERENCE_URL", url)
        model = fcn_zoo.from_pretrained(NAME)
    assert model.num_classes == 21 and QuietHandler.requests == [f"/{NAME}.pth"]


def test_an_explicit_revision_that_the_hub_cannot_serve_is_an_error_not_a_fallback(hub_endpoint):
    hub_endpoint(404)
    with pytest.raises(fcn_zoo.FCNZooError, match=f"fcn-zoo/{NAME}@{COMMIT}"):
        fcn_zoo.from_pretrained(NAME, revision=COMMIT)


def test_a_hub_answering_500_is_a_clear_error(hub_endpoint):
    hub_endpoint(500)
    with pytest.raises(fcn_zoo.FCNZooError, match=f"someone/fcn@{COMMIT}"):
        fcn_zoo.from_pretrained(f"someone/fcn@{COMMIT}")


@pytest.mark.parametrize("status,message", [(404, "has no such file"), (500, "HTTP Error 500"), (None, "timed out")])
def test_reference_download_failures_are_clear_and_leave_nothing(monkeypatch, status, message):
    server, url = answering(status)
    monkeypatch.setenv("FCN_ZOO_REFERENCE_URL", url)
    monkeypatch.setenv("FCN_ZOO_DOWNLOAD_TIMEOUT", "1")
    try:
        start = time.perf_counter()
        with pytest.raises(fcn_zoo.FCNZooError, match=message) as e:
            fcn_zoo.from_pretrained(NAME)
        assert time.perf_counter() - start < 5
    finally:
        server.shutdown()
        server.server_close()
    assert f"FCN_ZOO_REFERENCE_URL={url}" in str(e.value)  # the mirror that was used, named
    if status == 404:  # both names were asked for, and the advice is about the mirror, not the network
        assert f"{url}/{NAME}.pth and {url}/{NAME}_train.pth" in str(e.value) and "network" not in str(e.value)
        assert f"put {NAME}.pth there" in str(e.value)
    assert not hub.is_cached(NAME)
    # no part of a download left (.locks holds the empty lock files processes take turns with, as huggingface_hub's)
    assert [p for p in hub.cache_root().rglob("*") if p.is_file() and ".locks" not in p.parts] == []


def test_two_processes_downloading_the_same_checkpoint_both_succeed(mirror, tmp_path):
    with serve_folder(mirror) as url:
        env = {**os.environ, "FCN_ZOO_REFERENCE_URL": url, "FCN_ZOO_CACHE": str(tmp_path / "cache")}
        code = f"import fcn_zoo; m = fcn_zoo.from_pretrained({NAME!r}); print(m.num_classes)"
        QuietHandler.requests.clear()
        procs = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-500:] for _, err in results]
    # one download and one conversion (as torchrun's processes on a cold cache): the other process waited for them
    assert [r for r in QuietHandler.requests if r.endswith(".pth")] == [f"/{NAME}.pth"]
    assert [out.strip() for out, _ in results] == ["21", "21"]
    reference = tmp_path / "cache" / "reference"
    assert sorted(p.name for p in reference.iterdir()) == [NAME]  # one folder, no temporary leftovers
    assert sorted(p.name for p in (reference / NAME).iterdir()) == ["README.md", "config.json", "model.safetensors", "provenance.json"]


def test_an_unwritable_cache_is_a_clear_error(tmp_path, monkeypatch, mirror):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache should be")
    monkeypatch.setenv("FCN_ZOO_CACHE", str(blocker))
    with serve_folder(mirror) as url:
        monkeypatch.setenv("FCN_ZOO_REFERENCE_URL", url)
        with pytest.raises(fcn_zoo.FCNZooError, match="cache cannot be written.*FCN_ZOO_CACHE"):
            fcn_zoo.from_pretrained(NAME)
    assert blocker.read_text() == "a file where the cache should be"


def test_with_an_unwritable_home_cache_dir_holds_everything_the_first_download_writes(tmp_path, monkeypatch, mirror):
    home = tmp_path / "home-is-a-file"
    home.write_text("HOME cannot hold a .cache folder")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("FCN_ZOO_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    cache = tmp_path / "mine"
    with serve_folder(mirror) as url:
        monkeypatch.setenv("FCN_ZOO_REFERENCE_URL", url)
        model = fcn_zoo.from_pretrained(NAME, cache_dir=cache)
    assert model.num_classes == 21
    assert NAME in json.loads((cache / "known_hashes.json").read_text())  # recorded where it was asked to be
    assert (cache / "reference" / NAME / "model.safetensors").is_file()
    assert home.read_text() == "HOME cannot hold a .cache folder"


def test_a_repo_revision_that_is_not_cached_offline(tiny_folder, isolated_caches):
    from test_hub import build_hub_cache

    build_hub_cache(isolated_caches / "hf_cache", "someone/tiny", COMMIT, tiny_folder)
    with pytest.raises(fcn_zoo.NotCachedError, match="someone/tiny@v9.9 is not in the Hugging Face cache.*--revision v9.9"):
        fcn_zoo.from_pretrained("someone/tiny@v9.9", local_files_only=True)


def test_a_cached_conversion_is_used_without_asking_an_unreachable_hub(hub_endpoint, tiny_folder, monkeypatch):
    import shutil

    hub_endpoint(None)  # a Hub that never answers: asking it would cost huggingface_hub's retries
    monkeypatch.setitem(zoo.CHECKPOINTS, NAME, dataclasses.replace(zoo.CHECKPOINTS[NAME], hub_revision=COMMIT))
    shutil.copytree(tiny_folder, hub.cache_root() / "reference" / NAME)
    start = time.perf_counter()
    model = fcn_zoo.from_pretrained(NAME)
    assert time.perf_counter() - start < 3 and model.num_classes == 21
