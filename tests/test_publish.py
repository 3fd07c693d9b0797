"""fcn-zoo publish: reference .pth over loopback -> verified folder, card, provenance, Hub commit."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from huggingface_hub import ModelCard

import fcn_zoo
from conftest import serve_folder
from fcn_zoo import downloads, zoo
from fcn_zoo.cli import main
from reference import build_reference_fcn, reference_logits, save_reference_checkpoint

NAME = "fcn_resnet50os16_cityscapes"


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mirror")
    reference = build_reference_fcn(50, 16, num_classes=19, seed=5)
    reference.decoder[-1].weight.data.mul_(20)
    save_reference_checkpoint(reference, folder / f"{NAME}.pth")
    return folder, reference


def test_publish_dry_run_writes_a_verified_folder_with_its_card(mirror, tmp_path, monkeypatch, capsys):
    folder, reference = mirror
    with serve_folder(folder) as url:
        monkeypatch.setenv("FCN_ZOO_REFERENCE_URL", url)
        code = main(["publish", NAME, "--repo-id", "me/fcn", "--out", str(tmp_path), "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "would upload to me/fcn" in out and "model.safetensors" in out

    built = tmp_path / NAME
    assert sorted(p.name for p in built.iterdir()) == ["README.md", "config.json", "model.safetensors", "provenance.json"]
    model = fcn_zoo.from_pretrained(built)
    x = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        assert (model(x) - reference_logits(reference, x)).abs().max() < 1e-4

    provenance = json.loads((built / "provenance.json").read_text())
    assert provenance["parity"]["implementation"].startswith("sssegmentation")
    assert provenance["parity"]["max_abs_diff"] < 1e-4 and provenance["parity"]["label_agreement"] == 1.0
    assert provenance["source_url"] == f"{url}/{NAME}.pth"

    card = ModelCard.load(built / "README.md")
    (result,) = card.data.eval_results
    assert (result.dataset_type, result.metric_type, result.metric_value) == ("cityscapes", "mean_iou", 73.94)
    assert provenance["source_sha256"] in card.text and provenance["weights_sha256"] in card.text
    assert f"{provenance['parity']['max_abs_diff']:.2e}" in card.text
    assert not (tmp_path / ".downloads" / f"{NAME}.pth").exists()

    # a rerun resumes: nothing is downloaded again (the mirror is gone)
    code = main(["publish", NAME, "--repo-id", "me/fcn", "--out", str(tmp_path), "--dry-run"])
    assert code == 0, capsys.readouterr().err


def test_publish_uploads_in_one_commit_and_prints_the_hash_to_pin(mirror, tmp_path, monkeypatch, capsys):
    folder, _ = mirror
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, exist_ok, repo_type):
            calls.append(("create_repo", repo_id))

        def upload_folder(self, folder_path, repo_id, allow_patterns, commit_message):
            calls.append(("upload_folder", repo_id, sorted(allow_patterns)))
            return type("CommitInfo", (), {"oid": "c0ffee" * 6 + "abcd"})()

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    with serve_folder(folder) as url:
        monkeypatch.setenv("FCN_ZOO_REFERENCE_URL", url)
        code = main(["publish", NAME, "--out", str(tmp_path), "--token", "hf_test"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert calls == [
        ("token", "hf_test"),
        ("create_repo", f"fcn-zoo/{NAME}"),
        ("upload_folder", f"fcn-zoo/{NAME}", ["README.md", "config.json", "model.safetensors", "provenance.json"]),
    ]
    assert f'hub_revision="{"c0ffee" * 6 + "abcd"}"' in out
    state = json.loads((tmp_path / "published.json").read_text())
    assert state[NAME]["commit"] == "c0ffee" * 6 + "abcd"

    calls.clear()
    assert main(["publish", NAME, "--out", str(tmp_path)]) == 0
    assert calls == [] and "already published" in capsys.readouterr().out


def test_a_tampered_reference_file_is_refused_naming_both_hashes(mirror, tmp_path, monkeypatch):
    folder, _ = mirror
    served = tmp_path / "served"
    served.mkdir()
    (served / f"{NAME}.pth").write_bytes((folder / f"{NAME}.pth").read_bytes())
    row = zoo.CHECKPOINTS[NAME]
    with serve_folder(served) as url:
        monkeypatch.setenv("FCN_ZOO_REFERENCE_URL", url)
        _, _, first = downloads.download_reference(row, tmp_path / "a")
        downloads.record_hash(row, first)  # as the first download's conversion does
        with open(served / f"{NAME}.pth", "r+b") as f:
            f.seek(1000)
            f.write(b"tampered")
        with pytest.raises(fcn_zoo.WeightsError) as e:
            downloads.download_reference(row, tmp_path / "b")
    assert first in str(e.value) and "first download" in str(e.value)
    assert "known_hashes.json" in str(e.value) and "to accept it" in str(e.value)  # how to take a changed mirror file
    assert not (tmp_path / "b" / f"{NAME}.pth").exists()

    # a hash published in the table wins over what was recorded
    monkeypatch.setitem(zoo.CHECKPOINTS, NAME, dataclasses.replace(row, sha256="f" * 64))
    with serve_folder(folder) as url:
        monkeypatch.setenv("FCN_ZOO_REFERENCE_URL", url)
        with pytest.raises(fcn_zoo.WeightsError, match="published in the table"):
            downloads.download_reference(zoo.CHECKPOINTS[NAME], tmp_path / "c")


def test_publish_all_needs_a_namespace_not_a_repo_id(capsys, tmp_path):
    assert main(["publish", "all", "--repo-id", "me/x", "--out", str(tmp_path)]) == 1
    assert "--namespace" in capsys.readouterr().err


def test_publish_with_no_network_is_one_line_and_keeps_the_verified_folder(mirror, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as constants

    folder, _ = mirror
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: no Hub
    with serve_folder(folder) as url:
        monkeypatch.setenv("FCN_ZOO_REFERENCE_URL", url)
        code = main(["publish", NAME, "--repo-id", "me/fcn", "--out", str(tmp_path), "--token", "hf_test"])
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("fcn-zoo:")]  # after the download's progress
    assert len(lines) == 2 and "me/fcn: the Hugging Face Hub cannot be reached" in lines[0] and "rerun" in lines[1]
    assert err.strip().splitlines()[-2:] == lines
    assert (tmp_path / NAME / "model.safetensors").is_file()  # built and verified: a rerun only uploads


def test_rows_recorded_at_once_from_two_processes_are_both_kept(tmp_path, monkeypatch):
    """Two rows converting at once (other processes, other row locks) each record their hash: the read and the
    write of known_hashes.json are one step. Before, the later write dropped the earlier row's hash."""
    import threading
    import time

    monkeypatch.setenv("FCN_ZOO_CACHE", str(tmp_path))
    read = downloads.known_hashes

    def slow_read(cache_dir=None):  # both writers read before either writes, as two processes may
        known = read(cache_dir)
        time.sleep(0.3)
        return known

    monkeypatch.setattr(downloads, "known_hashes", slow_read)
    names = list(zoo.CHECKPOINTS)[:2]
    threads = [threading.Thread(target=downloads.record_hash, args=(zoo.CHECKPOINTS[n], f"{i}" * 64))
               for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert json.loads((tmp_path / "known_hashes.json").read_text()) == {names[0]: "0" * 64, names[1]: "1" * 64}


def test_only_a_verified_folder_is_ever_at_its_place_and_a_killed_runs_files_are_removed(tmp_path, monkeypatch):
    """A run killed while verifying left out/<name> that the rerun trusted, and the downloaded .pth for good."""
    from fcn_zoo import convert, publish

    out, served = tmp_path / "publish", tmp_path / "served"
    served.mkdir()
    (served / f"{NAME}.pth").write_bytes(b"the reference file")
    staging = out / f".{NAME}.staging"
    staging.mkdir(parents=True)
    (staging / f"{NAME}.pth").write_bytes(b"\0" * 1000)  # what a run killed (SIGKILL) mid-verification leaves
    seen = []

    def converted(pth, folder, *args, **kwargs):  # the folder as conversion writes it, card last
        folder.mkdir()
        (folder / "README.md").write_text("card")
        return {}

    def interrupted(checkpoint, folder, pth, provenance):  # stands for the kill: no cleanup of its own can help
        seen.append((folder.exists(), (out / NAME).exists(), pth.read_bytes()))
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "convert_checkpoint", converted)
    monkeypatch.setattr(publish, "_verify", interrupted)
    with serve_folder(served) as url:
        monkeypatch.setenv("FCN_ZOO_REFERENCE_URL", url)
        with pytest.raises(KeyboardInterrupt):
            publish.publish(NAME, out, repo_id="me/fcn", dry_run=True, log=lambda *a: None)
    assert seen == [(True, False, b"the reference file")], "an unverified folder was at out/<name>"
    assert list(out.iterdir()) == []  # neither the unverified folder nor the .pth is left
