"""Many inputs: folders, globs and lists named into --out without collisions, predict_iter's order and
laziness, confidence maps, the summary, resumption after kill -9, videos, and torchrun's ranks."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fcn_zoo
from conftest import PHOTOS, tiny_fcn
from fcn_zoo.ranks import shard
from fcn_zoo.runner import Outputs, segment_sources
from fcn_zoo.cli import main
from fcn_zoo.errors import FCNZooError, ImageError
from fcn_zoo.inputs import Source, expand_inputs


def small(photo: Path, size=(96, 72)) -> Image.Image:
    return Image.open(photo).convert("RGB").resize(size)


@pytest.fixture()
def small_model(small_folder) -> fcn_zoo.FCN:
    return fcn_zoo.from_pretrained(small_folder)


@pytest.fixture()
def photo_tree(tmp_path) -> Path:
    """Nested folders, JPEG/PNG/WebP, an image without a suffix, the same name in two folders, a truncated
    JPEG, a text file and a hidden file."""
    root = tmp_path / "photos"
    (root / "2023" / "june").mkdir(parents=True)
    (root / "2024").mkdir()
    (root / ".thumbs").mkdir()
    small(PHOTOS[0]).save(root / "2023" / "a.jpg")
    small(PHOTOS[1]).save(root / "2024" / "a.jpg")  # same name, another folder
    small(PHOTOS[2]).save(root / "2023" / "june" / "b.png")
    small(PHOTOS[0], (80, 64)).save(root / "2024" / "c.webp")
    small(PHOTOS[1]).save(root / "2024" / "IMG_0001", format="PNG")  # no suffix: taken by content
    (root / "2024" / "broken.jpg").write_bytes((root / "2023" / "a.jpg").read_bytes()[:150])
    (root / "notes.txt").write_text("not an image")
    small(PHOTOS[2]).save(root / ".hidden.jpg")
    small(PHOTOS[2]).save(root / ".thumbs" / "t.jpg")
    return root


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by its relative path; the journal's rows without their stamps (a run's time)."""
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    if ".fcn-zoo/journal.jsonl" in files:
        rows = [json.loads(line) for line in files[".fcn-zoo/journal.jsonl"].splitlines()]
        files[".fcn-zoo/journal.jsonl"] = [{k: v for k, v in row.items() if k != "stamp"} for row in rows]
    return files


def test_a_folder_is_walked_and_named_by_its_structure(photo_tree):
    found = expand_inputs([str(photo_tree)])
    assert [s.name for s in found.sources] == ["2023/a", "2023/june/b", "2024/IMG_0001", "2024/a", "2024/broken", "2024/c"]
    assert [p.name for p in found.skipped] == ["notes.txt"]


def test_an_output_folder_inside_the_input_folder_is_not_an_input(capsys, small_folder, photo_tree):
    out = photo_tree / "2023" / "masks"
    code, stdout, err = run(capsys, "predict", small_folder, photo_tree / "2023", "--out", out)
    assert code == 0 and "2 done, 0 failed, 0 skipped" in stdout, err
    # the second run walks past the first run's masks, under the input folder
    code, stdout, err = run(capsys, "predict", small_folder, photo_tree / "2023", "--out", out, "--resume")
    assert code == 0 and "0 done, 2 already done, 0 failed, 0 skipped" in stdout, err  # "skipped": not images
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["a.png", "june/b.png"]


def test_names_never_collide_across_folders_suffixes_globs_and_lists(tmp_path, photo_tree):
    small(PHOTOS[0]).save(photo_tree / "2024" / "c.jpg")  # beside c.webp
    names = [s.name for s in expand_inputs([str(photo_tree / "2024")]).sources]
    assert "c.jpg" in names and "c.webp" in names and len(set(names)) == len(names)
    # two folders: named within each, or, where names would clash, from the folder above both
    assert [s.name for s in expand_inputs([str(photo_tree / "2023" / "june"), str(photo_tree / "2024")]).sources][:2] == ["b", "IMG_0001"]
    assert [s.name for s in expand_inputs([str(photo_tree / "2023"), str(photo_tree / "2024")]).sources][:3] == ["2023/a", "2023/june/b", "2024/IMG_0001"]
    # files named directly keep their own names
    assert [s.name for s in expand_inputs([str(photo_tree / "2023" / "june" / "b.png"), str(PHOTOS[0])]).sources] == ["b", PHOTOS[0].stem]
    # a glob, relative to its fixed part; a file named twice counts once
    found = expand_inputs([str(photo_tree / "**" / "a.jpg"), str(photo_tree / "2023" / "a.jpg")])
    assert [s.name for s in found.sources] == ["2023/a", "2024/a"]
    # a list, relative to its own folder, with comments
    listing = photo_tree / "list.txt"
    listing.write_text("# mine\n2023/a.jpg\n\n2024/a.jpg\n")
    assert [s.name for s in expand_inputs([f"@{listing}"]).sources] == ["2023/a", "2024/a"]
    with pytest.raises(FCNZooError, match="no file matches"):
        expand_inputs([str(tmp_path / "*.nothing")])


def test_cli_predicts_a_tree_with_a_summary_and_one_line_per_failure(capsys, small_folder, photo_tree, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "predict", small_folder, photo_tree, "--out", out, "--overlay", "--confidence")
    assert code == 1
    assert err.count("\n") == 2 and "broken.jpg" in err and "1 of 6 inputs failed" in err and "Traceback" not in err
    assert "5 done, 1 failed, 1 skipped" in err
    for name in ["2023/a", "2024/a", "2023/june/b", "2024/c", "2024/IMG_0001"]:
        mask = Image.open(out / f"{name}.png")
        confidence = np.asarray(Image.open(out / f"{name}_confidence.png"))
        assert mask.mode == "P" and confidence.dtype == np.uint16 and confidence.shape == mask.size[::-1]
        assert (out / f"{name}_overlay.jpg").is_file()
    assert not list(out.rglob("broken*")) and not list(out.rglob("*.partial"))
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == ["2023/a.jpg", "2023/june/b.png", "2024/IMG_0001", "2024/a.jpg", "2024/broken.jpg", "2024/c.webp"]
    by_path = {r["path"]: r for r in rows}
    assert by_path["2024/c.webp"]["width"] == "80" and by_path["2024/c.webp"]["height"] == "64"
    assert by_path["2024/broken.jpg"]["status"] == "failed" and "broken.jpg" in by_path["2024/broken.jpg"]["error"]
    labels = np.asarray(Image.open(out / "2023/a.png"))
    classes = fcn_zoo.DATASETS["voc"].classes
    shares = [float(by_path["2023/a.jpg"][c]) for c in classes]
    expected = np.bincount(labels.ravel(), minlength=len(classes)) / labels.size
    assert np.allclose(shares, expected, atol=1e-6)


def test_labels_are_made_beside_the_next_forward_by_default_on_cuda_only():
    """On the CPU they would share its cores; on MPS two threads would issue kernels at once."""
    from fcn_zoo.engine import overlaps

    assert overlaps(torch.device("cuda")) and overlaps(torch.device("cuda:1"))
    assert not overlaps(torch.device("cpu")) and not overlaps(torch.device("mps"))


@pytest.mark.parametrize("overlap", [False, True], ids=["labels-in-turn", "labels-beside-the-next-forward"])
def test_predict_iter_is_ordered_lazy_and_reports_failures_in_place(small_model, tmp_path, overlap):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    taken = []

    def images():
        for i in range(24):
            taken.append(i)
            yield bad if i == 3 else small(PHOTOS[i % 3], (64 + 8 * (i % 2), 48))

    stream = small_model.predict_iter(images(), num_workers=2, prefetch=4, errors="yield", overlap=overlap)
    first_image, first = next(stream)
    assert len(taken) <= 4 + 1 + overlap  # read ahead by at most `prefetch` (and one batch in flight), not the whole input
    results = [(first_image, first), *stream]
    assert len(results) == 24 and len(taken) == 24
    assert isinstance(results[3][1], ImageError) and "bad.jpg" in str(results[3][1])
    for i, (image, seg) in enumerate(results):
        if i != 3:
            assert seg.size == (48, 64 + 8 * (i % 2))
            assert np.array_equal(seg.labels, small_model.predict(image).labels)
    with pytest.raises(ImageError, match="bad.jpg"):
        list(small_model.predict_iter([PHOTOS[0], bad, PHOTOS[1]], overlap=overlap))


def test_batched_predict_iter_gives_the_masks_of_one_image_at_a_time(small_model):
    images = [small(p, s) for p in PHOTOS for s in ((64, 48), (64, 48), (72, 40))]
    one = [seg.labels for _, seg in small_model.predict_iter(images, batch_size=1, num_workers=0)]
    batched = [seg.labels for _, seg in small_model.predict_iter(images, batch_size=4)]
    assert all(np.array_equal(a, b) for a, b in zip(one, batched))


def test_confidence_and_probabilities_are_the_softmax_of_the_full_logits(small_model):
    seg = small_model.predict(PHOTOS[1])

    with torch.inference_mode():
        low = small_model.forward_features(fcn_zoo.preprocess(small_model, PHOTOS[1]))
        full = F.interpolate(low, size=seg.size, mode="bilinear", align_corners=False).softmax(1)[0].numpy()
    assert seg.confidence.shape == seg.size and seg.confidence.dtype == np.float32
    assert 0 < seg.confidence.min() and seg.confidence.max() <= 1
    assert np.abs(seg.confidence - full.max(0)).max() < 1e-5
    assert np.abs(seg.probabilities("cat") - full[8]).max() < 1e-5
    assert np.abs(seg.probabilities(0) - full[0]).max() < 1e-5
    with pytest.raises(ValueError, match="unknown class"):
        seg.probabilities("unicorn")
    tta = small_model.predict(PHOTOS[1], tta=fcn_zoo.TTA(scales=(0.75, 1.0), flip=True))
    assert len(tta.logits) == 4  # two scales, each flipped
    every = np.stack([tta.probabilities(c) for c in range(small_model.num_classes)])
    assert np.allclose(every.sum(0), 1, atol=1e-5) and np.allclose(every.max(0), tta.confidence, atol=1e-6)
    assert (every.argmax(0) == tta.labels).mean() > 0.999  # the labels are the most probable class


def test_an_interrupted_run_resumed_ends_with_the_outputs_of_an_uninterrupted_one(small_folder, photo_tree, tmp_path):
    for i in range(80):
        small(PHOTOS[i % 3], (48 + i % 7, 36)).save(photo_tree / "2023" / f"extra{i:02d}.jpg")
    command = [sys.executable, "-m", "fcn_zoo.cli", "predict", str(small_folder), str(photo_tree), "--overlay",
               "--quiet", "--out"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    whole = tmp_path / "whole"
    from fcn_zoo.cli import main

    main([*command[3:], str(whole)])  # the uninterrupted run, in this process
    cut = tmp_path / "cut"
    process = subprocess.Popen([*command, str(cut)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(cut.rglob("*_overlay.jpg")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (cut / "summary.csv").exists(), "the run finished before it could be interrupted"
    pending = next(p for p in sorted((photo_tree / "2023").glob("extra*.jpg")) if not (cut / "2023" / f"{p.stem}.png").exists())
    (cut / "2023" / f".{pending.stem}.png.99999.partial").write_bytes(b"half a PNG")  # as a kill mid-write leaves it
    main([*command[3:], str(cut), "--resume"])
    assert tree(cut) == tree(whole)
    assert (whole / "summary.csv").is_file() and len(list(whole.rglob("*_overlay.jpg"))) == 85


def test_resume_refuses_a_folder_made_by_another_model_or_with_other_options(capsys, small_folder, photo_tree, tmp_path):
    out = tmp_path / "out"
    code, _, err = run(capsys, "predict", small_folder, photo_tree / "2023", "--out", out, "--quiet")
    assert code == 0, err
    made = tree(out)
    other = tmp_path / "other-fcn"
    retrained = tiny_fcn(seed=1)
    retrained.eval_size = (128, 96)
    retrained.save_pretrained(other)
    for argv, difference in [
        ((other,), "another model"),
        ((small_folder, "--tta"), "tta=None, this run asks for tta="),
        ((small_folder, "--slide"), "mode='whole', this run asks for mode='slide'"),
        ((small_folder, "--overlay"), "overlay=False, this run asks for overlay=True"),
        ((small_folder, "--precision", "bf16"), "precision='fp32', this run asks for precision='bf16'"),
    ]:
        code, _, err = run(capsys, "predict", argv[0], photo_tree / "2023", "--out", out, "--quiet", "--resume", *argv[1:])
        assert code == 1 and difference in err and "without --resume" in err, err
        assert len(err.strip().splitlines()) == 1
        assert tree(out) == made  # nothing written, nothing removed
    code, _, err = run(capsys, "predict", small_folder, photo_tree / "2023", "--out", out, "--quiet", "--resume")
    assert code == 0 and tree(out) == made  # the same model and options resume (here: nothing left to do)
    # a run without --resume remakes everything: nothing the first model made counts as done afterwards
    clean = tmp_path / "clean"
    run(capsys, "predict", other, photo_tree / "2023", "--out", clean, "--quiet")
    code, _, err = run(capsys, "predict", other, photo_tree / "2023" / "a.jpg", "--out", out, "--quiet")
    assert code == 0, err
    code, _, err = run(capsys, "predict", other, photo_tree / "2023", "--out", out, "--quiet", "--resume")
    assert code == 0, err
    masks = lambda folder: {k: v for k, v in tree(folder).items() if k.endswith(".png")}  # noqa: E731
    assert masks(out) == masks(clean) != masks_of_first(made)
    (out / ".fcn-zoo" / "made_by.json").unlink()  # as a folder from before the record was kept
    code, _, err = run(capsys, "predict", small_folder, photo_tree / "2023", "--out", out, "--quiet", "--resume")
    assert code == 1 and "does not record" in err


def masks_of_first(made: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in made.items() if k.endswith(".png")}


def _video(path: Path, frames: int = 10, size=(64, 48), rate: int = 5) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            rgb = np.asarray(small(PHOTOS[i % 3], size))
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _decoded(path: Path) -> tuple[list[np.ndarray], object]:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [f.to_ndarray(format="rgb24") for f in container.decode(stream)], stream.average_rate


def test_a_video_becomes_an_overlay_video_and_one_mask_per_frame(capsys, small_folder, small_model, tmp_path):
    pytest.importorskip("av")
    clip = tmp_path / "clips" / "walk.mp4"
    clip.parent.mkdir()
    _video(clip)
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "predict", small_folder, clip, "--out", out, "--masks")
    assert code == 0, err
    frames, rate = _decoded(clip)
    overlay, overlay_rate = _decoded(out / "walk_overlay.mp4")
    assert len(overlay) == len(frames) == 10 and overlay_rate == rate == 5
    assert overlay[0].shape == frames[0].shape
    masks = sorted((out / "walk").glob("*.png"))
    assert [m.name for m in masks] == [f"{i:06d}.png" for i in range(10)]
    for frame, mask in zip(frames, masks):
        assert np.array_equal(np.asarray(Image.open(mask)), small_model.predict(frame).labels)
    with open(out / "summary.csv", newline="") as f:
        (row,) = csv.DictReader(f)
    assert (row["path"], row["kind"], row["frames"], row["width"], row["height"]) == ("walk.mp4", "video", "10", "64", "48")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # several processes: run after the suite (python -m pytest -q -m slow)
def test_two_torchrun_processes_write_what_one_process_writes(small_folder, photo_tree, tmp_path):
    args = ["predict", str(small_folder), str(photo_tree), "--quiet", "--out"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "fcn_zoo.cli", *args, str(tmp_path / "one")],
                         env=env, capture_output=True, text=True)
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(_free_port()), "-m", "fcn_zoo.cli", *args, str(tmp_path / "two")],
        env=env, capture_output=True, text=True,
    )
    assert one.returncode == 1 and two.returncode != 0, two.stderr[-2000:]  # the truncated JPEG fails in both
    assert tree(tmp_path / "two") == tree(tmp_path / "one")
    assert two.stderr.count("1 of 6 inputs failed") == 1  # one summary, from the first process


HELD_BACK = r"""
import os, sys, time
import fcn_zoo.runner as runner
if os.environ["RANK"] == "2":  # this process starts its share late: longer than the process group's timeout
    real = runner.predict_iter
    def late(*args, **kwargs):
        time.sleep(float(os.environ["HOLD"]))
        yield from real(*args, **kwargs)
    runner.predict_iter = late
from fcn_zoo.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # several processes: run after the suite (python -m pytest -q -m slow)
def test_three_processes_with_one_held_back_past_the_timeout_end_with_one_summary(small_folder, photo_tree, tmp_path):
    """The processes meet through files at the end, so a slow shard (a long video) cannot make the others time out."""
    args = ["predict", str(small_folder), str(photo_tree), "--quiet", "--out"]
    assert main([*args, str(tmp_path / "one")]) == 1  # the truncated JPEG fails
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "FCN_ZOO_DIST_TIMEOUT": "8", "HOLD": "14"}
    processes = [
        subprocess.Popen([sys.executable, "-c", HELD_BACK, *args, str(tmp_path / "three")], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(3)
    ]
    start = time.perf_counter()
    errs = [p.communicate(timeout=300)[1] for p in processes]
    assert time.perf_counter() - start > 14  # the held-back process really was behind, past the timeout
    assert tree(tmp_path / "three") == tree(tmp_path / "one")  # every output, and one summary.csv of them all
    assert errs[0].count("1 of 6 inputs failed") == 1 and not any("1 of 6" in e for e in errs[1:])
    assert not any("Traceback" in e or "timed out" in e.lower() for e in errs), errs


def test_an_input_failed_by_another_process_and_redone_by_one_is_done_in_the_summary(capsys, small_folder, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    small(PHOTOS[0]).save(photos / "a.jpg")
    (photos / "b.jpg").write_bytes((photos / "a.jpg").read_bytes()[:150])  # truncated
    out = tmp_path / "out"
    code, _, err = run(capsys, "predict", small_folder, photos, "--out", out, "--quiet")
    assert code == 1 and "b.jpg" in err
    # as process 1 of a two-process run leaves its journal when the run stops before its end
    (out / ".fcn-zoo" / "journal.jsonl").rename(out / ".fcn-zoo" / "journal-1.jsonl")
    small(PHOTOS[1]).save(photos / "b.jpg")  # fixed, then redone by one process, which writes journal-0.jsonl
    code, stdout, err = run(capsys, "predict", small_folder, photos, "--out", out, "--resume")
    assert code == 0 and "1 done, 1 already done, 0 failed, 0 skipped" in stdout, err
    with open(out / "summary.csv", newline="") as f:
        assert [(r["path"], r["status"]) for r in csv.DictReader(f)] == [("a.jpg", "ok"), ("b.jpg", "ok")]
    code, stdout, err = run(capsys, "predict", small_folder, photos, "--out", out, "--resume")
    assert code == 0 and "0 done, 2 already done" in stdout, err


def test_resume_reads_the_journal_once(capsys, small_folder, photo_tree, tmp_path, monkeypatch):
    import builtins
    import io

    out = tmp_path / "out"
    code, _, err = run(capsys, "predict", small_folder, photo_tree / "2023", "--out", out, "--quiet")
    assert code == 0, err
    (out / "a.png").unlink()  # one input to redo
    reads = []
    real = io.open

    def spying(file, mode="r", *args, **kwargs):
        if Path(os.fspath(file)).name.startswith("journal") and not set(mode) & set("wax+"):
            reads.append(Path(file).name)
        return real(file, mode, *args, **kwargs)

    monkeypatch.setattr(io, "open", spying)
    monkeypatch.setattr(builtins, "open", spying)
    code, stdout, err = run(capsys, "predict", small_folder, photo_tree / "2023", "--out", out, "--resume")
    assert code == 0 and "1 done, 1 already done" in stdout, err
    assert reads == ["journal.jsonl"]


def test_the_summary_is_written_row_by_row(tmp_path):
    """A million rows must not be held twice over as one string: the peak is a row's, not the file's."""
    import tracemalloc

    from fcn_zoo.runner import _write_summary

    classes = [f"class {i}" for i in range(50)]
    sources = [Source(Path(f"p{i}.jpg"), f"p{i}", False) for i in range(4000)]
    rows = {s.name: {"path": f"{s.name}.jpg", "kind": "image", "width": 640, "height": 480, "frames": None,
                     "status": "ok", "error": "", "shares": {c: 1 / 50 for c in classes}} for s in sources}
    tracemalloc.start()
    try:
        _write_summary(tmp_path, sources, rows, classes)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    size = (tmp_path / "summary.csv").stat().st_size
    assert size > 1_000_000 and peak < size / 4
    with open(tmp_path / "summary.csv", newline="") as f:
        assert sum(1 for _ in csv.DictReader(f)) == 4000


def test_inputs_whose_outputs_would_meet_are_named_apart_before_anything_is_written(capsys, small_folder, small_model, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    small(PHOTOS[0]).save(photos / "x.jpg")
    small(PHOTOS[1]).save(photos / "x_confidence.jpg")  # with --confidence, x.jpg's map would be x_confidence.png
    out = tmp_path / "out"
    code, _, err = run(capsys, "predict", small_folder, photos, "--out", out, "--confidence", "--quiet")
    assert code == 0, err
    assert sorted(p.name for p in out.glob("*.png")) == [
        "x.jpg.png", "x.jpg_confidence.png", "x_confidence.jpg.png", "x_confidence.jpg_confidence.png"]
    for photo in photos.iterdir():
        assert np.array_equal(np.asarray(Image.open(out / f"{photo.name}.png")), small_model.predict(photo).labels)
    # where keeping the suffix is not enough (a caller naming two sources alike): refused, naming both
    alike = [Source(photos / "x.jpg", "x", False), Source(tmp_path / "x.jpg", "x", False)]
    with pytest.raises(FCNZooError) as refused:
        segment_sources(small_model, alike, Outputs(tmp_path / "refused"), quiet=True)
    assert str(photos / "x.jpg") in str(refused.value) and str(tmp_path / "x.jpg") in str(refused.value)
    assert "\n" not in str(refused.value) and not (tmp_path / "refused").exists()


def test_a_video_beside_a_folder_of_its_name_removes_nothing(capsys, small_folder, small_model, tmp_path):
    pytest.importorskip("av")
    clips = tmp_path / "clips"
    (clips / "drive").mkdir(parents=True)
    _video(clips / "drive.mp4", frames=3)
    small(PHOTOS[0]).save(clips / "drive" / "000000.jpg")  # a photo with a frame mask's name
    out = tmp_path / "out"
    code, _, err = run(capsys, "predict", small_folder, clips, "--out", out, "--masks", "--quiet")
    assert code == 0, err
    photo_mask = np.asarray(Image.open(out / "drive" / "000000.png"))
    assert np.array_equal(photo_mask, small_model.predict(clips / "drive" / "000000.jpg").labels)
    assert sorted(p.name for p in (out / "drive.mp4").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert (out / "drive.mp4_overlay.mp4").is_file()
    # the video alone, into a folder of its name that holds a file of someone else's: the masks go beside it
    (out / "drive" / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "predict", small_folder, clips / "drive.mp4", "--out", out, "--masks", "--quiet")
    assert code == 0, err
    assert (out / "drive" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "drive").iterdir()) == ["000000.png", "000001.png", "000002.png", "notes.txt"]
    assert not list((out / ".fcn-zoo").glob("frames-*"))


def test_a_glob_climbing_above_its_fixed_part_writes_inside_out(capsys, small_folder, small_model, tmp_path):
    (tmp_path / "photos" / "2023").mkdir(parents=True)
    small(PHOTOS[0]).save(tmp_path / "x1.jpg")
    out = tmp_path / "out"
    code, _, err = run(capsys, "predict", small_folder, f"{tmp_path}/photos/*/../../x*.jpg", "--out", out, "--quiet")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "fcn_zoo_cache") == ["out", "photos", "x1.jpg"]  # nothing beside the input
    assert (out / "x1.png").is_file()
    # a caller's name that climbs out of --out: refused in one line, nothing written
    with pytest.raises(FCNZooError, match="outside --out") as refused:
        segment_sources(small_model, [Source(tmp_path / "x1.jpg", "../../x1", False)], Outputs(tmp_path / "o2"), quiet=True)
    assert "\n" not in str(refused.value) and str(tmp_path / "x1.jpg") in str(refused.value)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "fcn_zoo_cache") == ["out", "photos", "x1.jpg"]


def test_adding_inputs_moves_no_other_to_another_process():
    names = [f"2024/IMG_{i:04d}" for i in range(400)]
    before = {n: shard(n, 4) for n in names}
    after = {n: shard(n, 4) for n in ["2023/first", *names, "2025/last"]}
    assert all(after[n] == before[n] for n in names)
    assert min(list(before.values()).count(r) for r in range(4)) > 60  # each process has a fair share


ONE_DIES = r"""
import os, sys
import fcn_zoo.runner as runner
if os.environ["RANK"] == os.environ["DIES"]:  # this process stops dead once the run has started
    def dead(*args, **kwargs):
        os._exit(3)
        yield
    runner.predict_iter = dead
from fcn_zoo.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _start(command: list[str], world: int, env: dict, argv=lambda rank: [], cwd=lambda rank: None) -> list[tuple[int, str]]:
    """Run ``command`` as ``world`` processes of one run, as torchrun would; their exit codes and stderr."""
    env = {**os.environ, **env, "OMP_NUM_THREADS": "1", "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    processes = [subprocess.Popen([*command, *argv(r)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=cwd(r),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(world)]
    try:
        return [(p.communicate(timeout=120)[1], p.returncode)[::-1] for p in processes]
    finally:
        for p in processes:
            p.kill()


@pytest.mark.slow  # several processes: run after the suite (python -m pytest -q -m slow)
def test_a_process_that_dies_is_named_and_every_process_works_from_the_first_ones_list(small_folder, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    names = [f"p{i}" for i in range(8)]
    for i, name in enumerate(names):
        small(PHOTOS[i % 3], (48 + 8 * (i % 4), 36)).save(photos / f"{name}.jpg")
    assert {shard(n, 3) for n in names} == {0, 1, 2}
    elsewhere = tmp_path / "elsewhere"  # what process 1 alone is told: it takes process 0's list instead
    elsewhere.mkdir()
    small(PHOTOS[0]).save(elsewhere / "q.jpg")
    out = tmp_path / "out"
    args = ["predict", str(small_folder), "--quiet", "--out", str(out)]
    ends = _start([sys.executable, "-c", ONE_DIES, *args], 3, {"FCN_ZOO_DIST_TIMEOUT": "5", "DIES": "2"},
                  argv=lambda r: [str(elsewhere if r == 1 else photos)])
    (code0, err0), (code1, err1), (code2, _) = ends
    assert code0 == 1 and code1 == 0 and code2 == 3, ends
    assert err0.count("\n") == 1 and "process 2 of 3 stopped before finishing" in err0 and "--resume" in err0, err0
    assert sorted(p.stem for p in out.glob("*.png")) == [n for n in names if shard(n, 3) != 2]
    with open(out / "summary.csv", newline="") as f:
        assert [r["path"] for r in csv.DictReader(f)] == [f"{n}.jpg" for n in names if shard(n, 3) != 2]
    assert main([*args, str(photos), "--resume"]) == 0  # one process finishes what the dead one left
    assert sorted(p.stem for p in out.glob("*.png")) == names


def test_an_out_that_the_processes_do_not_share_is_said_at_the_start(small_folder, photo_tree, tmp_path):
    nodes = [tmp_path / "node0", tmp_path / "node1"]  # each process's own disk: "--out masks" is another folder
    for node in nodes:
        node.mkdir()
    ends = _start([sys.executable, "-m", "fcn_zoo.cli", "predict", str(small_folder), str(photo_tree / "2023"), "--out",
                   "masks"], 2, {"FCN_ZOO_DIST_TIMEOUT": "30"}, cwd=lambda r: nodes[r])
    for code, err in ends:
        assert code == 1 and err.count("\n") == 1, ends
        assert "is not shared by every process: process 1 of 2 cannot see" in err
    assert not [p for node in nodes for p in node.rglob("*.png")]


def test_a_second_run_into_the_same_out_meanwhile_is_refused_and_writes_nothing(capsys, small_folder, photo_tree, tmp_path):
    from fcn_zoo.runner import only_writer

    out = tmp_path / "out"
    code, _, err = run(capsys, "predict", small_folder, photo_tree / "2023", "--out", out, "--quiet")
    assert code == 0, err
    made = tree(out)
    with only_writer(out):  # as a run under way in another process holds it
        code, _, err = run(capsys, "predict", small_folder, photo_tree / "2023", "--out", out, "--quiet")
    assert code == 1 and err.strip() == (f"fcn-zoo: error: --out {out}: another fcn-zoo predict on this "
                                         "machine is writing into it; wait for it to end, or pass another --out")
    assert tree(out) == made
    code, _, err = run(capsys, "predict", small_folder, photo_tree / "2023", "--out", out, "--quiet", "--resume")
    assert code == 0, err  # the lock is given back with the run


def test_a_glob_names_and_filters_as_a_folder_input_does_and_a_list_may_start_with_a_bom(tmp_path, photo_tree):
    whole = expand_inputs([str(photo_tree)])
    for pattern in ("*", "**"):
        found = expand_inputs([str(photo_tree / pattern)])
        assert [(s.name, s.path.name) for s in found.sources] == [(s.name, s.path.name) for s in whole.sources], pattern
        assert [p.name for p in found.skipped] == [p.name for p in whole.skipped] == ["notes.txt"], pattern
    listing = tmp_path / "list.txt"
    listing.write_text("photos/2023/a.jpg\n", encoding="utf-8-sig")  # as Notepad saves it
    assert [s.path for s in expand_inputs([f"@{listing}"]).sources] == [photo_tree / "2023" / "a.jpg"]


def test_inputs_that_all_lie_inside_out_are_said_to_be_there(capsys, small_folder, photo_tree):
    code, _, err = run(capsys, "predict", small_folder, photo_tree / "2023" / "a.jpg", "--out", photo_tree)
    assert code == 1 and err.strip() == (f"fcn-zoo: error: {photo_tree / '2023' / 'a.jpg'}: every input lies inside --out "
                                         f"{photo_tree}, whose files are outputs, not inputs; pass an --out outside the inputs")


def test_resume_remakes_what_another_file_of_the_same_name_made_and_keeps_other_inputs_done(capsys, small_folder, tmp_path):
    first, second, out = tmp_path / "first", tmp_path / "second", tmp_path / "out"
    for folder in (first, second):
        folder.mkdir()
    small(PHOTOS[0]).save(first / "a.jpg")
    small(PHOTOS[1]).save(first / "b.jpg")
    small(PHOTOS[2], (50, 40)).save(second / "a.jpg")  # the same name, another photo
    assert run(capsys, "predict", small_folder, first, "--out", out, "--quiet")[0] == 0
    code, printed, _ = run(capsys, "predict", small_folder, second, "--out", out, "--resume")
    assert code == 0 and printed.strip().splitlines()[-1].startswith("1 done, 0 failed")
    assert Image.open(out / "a.png").size == (50, 40)  # second/a.jpg's mask, not first/a.jpg's
    with open(out / "summary.csv", newline="") as f:
        assert [(r["path"], r["width"]) for r in csv.DictReader(f)] == [("a.jpg", "50")]
    code, printed, _ = run(capsys, "predict", small_folder, first, "--out", out, "--resume")
    assert code == 0 and printed.strip().splitlines()[-1].startswith("1 done, 1 already done")  # b.jpg's kept


def test_a_rerun_without_resume_clears_what_a_killed_run_was_writing(capsys, small_folder, photo_tree):
    out = photo_tree.parent / "out"
    assert run(capsys, "predict", small_folder, photo_tree / "2023", "--out", out, "--quiet")[0] == 0
    leftover = out / ".a.png.99999-1.partial"  # as a kill mid-write leaves it
    leftover.write_bytes(b"half a PNG")
    assert run(capsys, "predict", small_folder, photo_tree / "2023", "--out", out, "--quiet")[0] == 0
    assert not leftover.exists() and (out / "a.png").is_file()
    # what a kill while the summary or the journal was being written leaves, with or without --resume
    for resume in ([], ["--resume"]):
        halves = [out / ".summary.csv.99999-1.partial", out / ".fcn-zoo" / ".journal.jsonl.99999-1.partial"]
        for half in halves:
            half.write_text("half")
        assert run(capsys, "predict", small_folder, photo_tree / "2023", "--out", out, "--quiet", *resume)[0] == 0
        assert not any(half.exists() for half in halves), resume


def test_names_at_the_length_limit_double_suffixes_and_newlines_are_written_and_said_right(capsys, small_folder, tmp_path):
    """A 230-character name (its temporary name would pass the 255 a file system allows) is written; b.png and
    b.png.png keep their own names in summary.csv; a name holding a newline is said on one line."""
    folder = tmp_path / "in"
    folder.mkdir()
    long = "p" * 226 + ".png"
    for name in (long, "b.png", "b.png.png", "new\nline.png"):
        small(PHOTOS[0]).save(folder / name)
    out = tmp_path / "out"
    (out / ".fcn-zoo").mkdir(parents=True)
    from fcn_zoo._files import partial_stem

    leftover = out / f".{partial_stem(long[:-4] + '.png')}.99999-1.partial"  # a killed run's, of the long name
    leftover.write_bytes(b"half")
    code, said, err = run(capsys, "predict", small_folder, folder, "--out", out)
    assert code == 0, err
    assert (out / (long[:-4] + ".png")).is_file() and not leftover.exists()
    with open(out / "summary.csv", newline="") as f:
        assert sorted(row["path"] for row in csv.DictReader(f)) == sorted(["b.png", "b.png.png", long, "new\nline.png"])
    lines = said.strip().splitlines()
    assert len(lines) == 5 and any(line.startswith(f"{folder}/new\\nline.png -> ") for line in lines), said


def test_a_video_that_fails_leaves_neither_its_overlay_nor_some_of_its_frames(capsys, small_folder, tmp_path):
    pytest.importorskip("av")
    clips = tmp_path / "clips"
    clips.mkdir()
    _video(clips / "good.mp4", frames=4)
    out = tmp_path / "out"
    (out / "good" / "000002.png").mkdir(parents=True)  # a folder where a frame mask must go
    code, _, err = run(capsys, "predict", small_folder, clips / "good.mp4", "--out", out, "--masks")
    assert code == 1 and "000002.png" in err, err
    assert not (out / "good_overlay.mp4").exists()
    assert sorted(p.name for p in (out / "good").iterdir()) == ["000002.png"]  # what was there, alone


def test_a_named_pipe_in_a_folder_is_skipped_and_an_empty_input_is_refused(photo_tree):
    import threading

    fifo = photo_tree / "2023" / "pipe.dat"
    os.mkfifo(fifo)
    found = {}
    walker = threading.Thread(target=lambda: found.update(expansion=expand_inputs([str(photo_tree / "2023")])), daemon=True)
    walker.start()
    walker.join(30)
    assert "expansion" in found, "walking a folder with a named pipe hung"
    assert fifo in found["expansion"].skipped and fifo not in [s.path for s in found["expansion"].sources]
    from fcn_zoo.errors import MissingFileError
    from fcn_zoo.hub import source_kind

    with pytest.raises(MissingFileError, match="an empty INPUT"):
        expand_inputs([str(photo_tree / "2023"), ""])
    with pytest.raises(MissingFileError, match="an empty model name"):
        source_kind("")


def test_a_file_name_with_a_newline_fails_in_one_line_that_says_why(capsys, small_folder, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    small(PHOTOS[0]).save(folder / "good.jpg")
    (folder / "bad\nname.jpg").write_bytes(b"not a JPEG")
    code, _, err = run(capsys, "predict", small_folder, folder, "--out", tmp_path / "out", "--quiet")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 2, err  # the input's error and the end line
    assert "bad\\nname.jpg: not an image" in lines[0]


@pytest.mark.slow
def test_sigterm_is_an_interruption_that_leaves_each_inputs_outputs_whole(small_folder, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(60):
        small(PHOTOS[i % 3], (48 + i % 5, 36)).save(folder / f"{i:02d}.jpg")
    out = tmp_path / "out"
    process = subprocess.Popen([str(Path(sys.executable).with_name("fcn-zoo")), "predict", str(small_folder), str(folder),
                                "--out", str(out), "--overlay", "--confidence", "--quiet"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(out.glob("*_confidence.png")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    err = process.communicate(timeout=60)[1]
    assert process.returncode == 130 and err.strip().splitlines()[-1] == "fcn-zoo: interrupted", err
    masks = {p.stem for p in out.glob("[0-9][0-9].png")}
    assert masks and masks == {p.stem.removesuffix("_overlay") for p in out.glob("*_overlay.jpg")}
    assert masks == {p.stem.removesuffix("_confidence") for p in out.glob("*_confidence.png")}
    assert not list(out.rglob("*.partial"))


def test_a_linked_sub_folder_is_walked_and_a_link_to_a_folder_above_is_no_loop(tmp_path, photo_tree):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    small(PHOTOS[1]).save(elsewhere / "x.jpg")
    (photo_tree / "2024" / "linked").symlink_to(elsewhere)
    (photo_tree / "2023" / "up").symlink_to(photo_tree)  # a loop, for a walk that follows links
    names = [s.name for s in expand_inputs([str(photo_tree)]).sources]
    assert "2024/linked/x" in names and len(names) == len(set(names))
    assert len(names) == len(expand_inputs([str(photo_tree)]).sources)


def test_leftovers_are_cleared_in_sub_folders_of_an_out_given_as_dot(tmp_path, monkeypatch):
    from fcn_zoo.runner import _clear_leftovers

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    halves = [tmp_path / "a" / ".x.png.123-456.partial", tmp_path / ".y.png.1-2.partial"]
    for half in halves:
        half.write_bytes(b"half")
    _clear_leftovers(Path("."), {Path("./a/x.png"), Path("./y.png")})
    assert not any(half.exists() for half in halves)
