"""Videos as a player shows them: the display matrix of a phone's portrait clip applied before segmenting,
so that the masks, the overlay and summary.csv are upright."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fcn_zoo
from conftest import PHOTOS
from fcn_zoo.cli import main
from fcn_zoo.video import _display_matrix, _displayed

av = pytest.importorskip("av", reason="the video extra (pip install 'fcn-zoo[video]')")


def _clip(path: Path, frames: list[np.ndarray], rotation: int = 0, hflip: bool = False, vflip: bool = False) -> None:
    """``frames`` stored as they are, with a display matrix: ``rotation`` degrees counter-clockwise (PyAV's
    convention; a phone held upright records -90), then the mirrorings."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        if rotation or hflip or vflip:
            stream.set_display_rotation(rotation, hflip=hflip, vflip=vflip)
        for rgb in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _decoded(path: Path) -> list[av.VideoFrame]:
    with av.open(str(path)) as container:
        return list(container.decode(container.streams.video[0]))


def test_a_portrait_phone_clip_is_segmented_masked_and_overlaid_upright(capsys, small_folder, tmp_path):
    stored = [np.asarray(Image.open(PHOTOS[i]).convert("RGB").resize((64, 36))) for i in range(3)]
    clip = tmp_path / "clips" / "phone.mp4"
    clip.parent.mkdir()
    _clip(clip, stored, rotation=-90)  # stored 64x36 (landscape), shown 36x64 (portrait)
    out = tmp_path / "out"
    assert main(["predict", str(small_folder), str(clip), "--out", str(out), "--masks"]) == 0, capsys.readouterr().err

    model = fcn_zoo.from_pretrained(small_folder)
    upright = [np.rot90(f.to_ndarray(format="rgb24"), k=-1) for f in _decoded(clip)]  # a quarter turn clockwise
    masks = sorted((out / "phone").glob("*.png"))
    assert len(masks) == 3
    for frame, mask in zip(upright, masks):
        labels = np.asarray(Image.open(mask))
        assert labels.shape == (64, 36)  # portrait, as the phone showed it
        assert np.array_equal(labels, model.predict(np.ascontiguousarray(frame)).labels)  # turned the right way

    overlay = _decoded(out / "phone_overlay.mp4")
    assert len(overlay) == 3
    for frame, shown in zip(overlay, upright):
        assert (frame.height, frame.width) == (64, 36) and _display_matrix(frame) is None  # upright, nothing to turn
        expected = np.asarray(model.predict(np.ascontiguousarray(shown)).overlay(alpha=0.5), dtype=float)
        got = frame.to_ndarray(format="rgb24").astype(float)
        assert np.abs(got - expected).mean() < np.abs(got - expected[::-1, ::-1]).mean() / 2  # not upside down

    with open(out / "summary.csv", newline="") as f:
        (row,) = csv.DictReader(f)
    assert (row["path"], row["width"], row["height"], row["frames"]) == ("phone.mp4", "36", "64", "3")


@pytest.mark.parametrize("rotation, hflip, vflip", [
    (0, False, False), (-90, False, False), (90, False, False), (180, False, False),
    (0, True, False), (0, False, True), (90, True, False), (-90, False, True),
])
def test_every_display_matrix_gives_the_frame_a_player_shows(tmp_path, rotation, hflip, vflip):
    """PyAV's documented meaning (turn counter-clockwise, then mirror) computed with NumPy, against the matrix
    read back from the file. PyAV's frame.rotation alone reads a mirrored clip as a half turn."""
    stored = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3) * 5
    _clip(tmp_path / "c.mp4", [np.zeros((6, 8, 3), np.uint8)], rotation, hflip, vflip)
    (frame,) = _decoded(tmp_path / "c.mp4")
    expected = np.rot90(stored, k=rotation // 90)
    expected = expected[:, ::-1] if hflip else expected
    expected = expected[::-1] if vflip else expected
    assert np.array_equal(_displayed(stored, _display_matrix(frame)), expected)


def test_a_masks_folder_holding_other_files_is_refused_and_kept(small_folder, tmp_path):
    """segment_video replaces an earlier run's frame masks, never a folder holding anything else."""
    from fcn_zoo.video import segment_video

    frame = np.asarray(Image.open(PHOTOS[0]).convert("RGB").resize((64, 48)))
    _clip(tmp_path / "clip.mp4", [frame, frame])
    model = fcn_zoo.from_pretrained(small_folder)
    masks = tmp_path / "masks"
    segment_video(model, tmp_path / "clip.mp4", None, masks_dir=masks)
    segment_video(model, tmp_path / "clip.mp4", None, masks_dir=masks)  # frame masks alone: replaced
    assert sorted(p.name for p in masks.iterdir()) == ["000000.png", "000001.png"]
    (masks / "notes.txt").write_text("mine")
    with pytest.raises(fcn_zoo.FCNZooError, match=r"masks: holds notes.txt besides frame masks; pass masks_dir a new"):
        segment_video(model, tmp_path / "clip.mp4", None, masks_dir=masks)
    assert (masks / "notes.txt").read_text() == "mine"


def test_an_overlay_over_the_clip_of_another_kind_or_among_its_masks_is_refused(small_folder, tmp_path):
    """Nothing is written, and the clip is left as it was."""
    from fcn_zoo.video import segment_video

    frame = np.asarray(Image.open(PHOTOS[0]).convert("RGB").resize((64, 48)))
    clip = tmp_path / "clip.mp4"
    _clip(clip, [frame])
    before = clip.read_bytes()
    model = fcn_zoo.from_pretrained(small_folder)
    for overlay, masks, said in [(clip, None, "is the video being segmented; write the overlay to another file"),
                                 (tmp_path / "o.gif", None, r"an overlay video is written as \.mp4, \.mov"),
                                 (tmp_path / "m" / "o.mp4", tmp_path / "m", "lies in the frame masks' folder")]:
        with pytest.raises(fcn_zoo.FCNZooError, match=said):
            segment_video(model, clip, overlay, masks_dir=masks)
    assert clip.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_a_clip_that_fails_midway_leaves_no_stream_running_and_refuses_errors(small_folder, tmp_path, monkeypatch):
    """A failure while writing frame 2 ends segment_video with its error, and its stream is shut down then, not
    when the caller drops the exception: no reader thread or fused copy lives on beside a kept error. A stream
    that yields errors has no place in a video whose outputs are whole or absent: errors= is refused."""
    import threading

    from fcn_zoo.segmentation import Segmentation
    from fcn_zoo.video import segment_video

    frames = [np.asarray(Image.open(PHOTOS[i % 2]).convert("RGB").resize((64, 48))) for i in range(6)]
    clip = tmp_path / "clip.mp4"
    _clip(clip, frames)
    model = fcn_zoo.from_pretrained(small_folder)
    with pytest.raises(ValueError, match="takes no errors="):
        segment_video(model, clip, tmp_path / "o.mp4", errors="yield")
    save = Segmentation.save

    def full_disk(self, path, *args, **kwargs):
        if Path(path).name == "000002.png":
            raise OSError(28, "No space left on device")
        return save(self, path, *args, **kwargs)

    monkeypatch.setattr(Segmentation, "save", full_disk)
    with pytest.raises(OSError) as kept:  # the caller keeps the error (a batch job listing failures)
        segment_video(model, clip, None, masks_dir=tmp_path / "masks", num_workers=2)
    assert [t.name for t in threading.enumerate() if t.name.startswith("fcn_zoo-")] == [], kept
    assert not (tmp_path / "masks").exists()
