"""Videos: every frame segmented in order and written back as an overlay video (same frame count, size and
frame rate), and optionally one palette PNG per frame. Decoding and encoding are PyAV's (the ``video``
extra: ``pip install "fcn-zoo[video]"``); frames stream through :func:`fcn_zoo.predict.predict_iter`, so a
long clip needs the memory of a few frames, not of the clip. Frames are seen as a player shows them, as
photos are after their EXIF orientation: a phone's portrait clip, stored landscape with a display matrix,
is segmented and written upright.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._files import atomic_path
from .errors import FCNZooError, ImageError
from .predict import predict_iter

__all__ = ["segment_video", "VideoResult"]

#: Codecs tried in order for the overlay video: H.264 where FFmpeg has an encoder for it, else MPEG-4 part 2.
CODECS = ("libx264", "h264", "mpeg4")
#: the container for an overlay path's suffix (the temporary file it is written to has none)
_FORMATS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm", ".avi": "avi"}
_FRAME = re.compile(r"\d{6}\.png")  # a frame mask's name


@dataclass
class VideoResult:
    """What :func:`segment_video` wrote: the frame size as displayed and the frame count, and each class's
    share of all pixels."""

    width: int
    height: int
    frames: int
    shares: dict[str, float] = field(default_factory=dict)


def segment_video(
    model, path: str | Path, overlay_path: str | Path | None, *, masks_dir: str | Path | None = None,
    alpha: float = 0.5, **options,
) -> VideoResult:
    """Segment every frame of the video at ``path``; write the class colours blended over the frames to
    ``overlay_path`` (an ``.mp4``) and, with ``masks_dir``, ``<masks_dir>/<frame>.png`` palette masks
    numbered from ``000000``. Both appear whole or not at all. Frames are segmented, masked and overlaid as
    displayed (the clip's display matrix applied; the overlay is written upright, without one). ``options`` as
    :func:`fcn_zoo.predict.predict_iter` (the clip runs on a fused copy of the model unless ``fuse=False``)."""
    if "errors" in options:  # a frame that fails ends the clip: its outputs are whole or absent
        raise ValueError("segment_video takes no errors=: a frame that cannot be segmented ends the video with its error")
    try:
        import av
    except ImportError as e:
        raise FCNZooError('videos need PyAV: pip install "fcn-zoo[video]" (or pip install av)') from e
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such video file")
    if overlay_path is None and masks_dir is None:
        raise ValueError("nothing to write: pass overlay_path, masks_dir or both")
    if overlay_path is not None:
        overlay_path = Path(overlay_path)
        if overlay_path.suffix.lower() not in _FORMATS:
            raise FCNZooError(f"{overlay_path}: an overlay video is written as {', '.join(_FORMATS)}; name it so")
        if overlay_path.resolve() == path.resolve():
            raise FCNZooError(f"{overlay_path}: is the video being segmented; write the overlay to another file")
    if masks_dir is not None:
        masks_dir = Path(masks_dir)
        _check_masks_dir(masks_dir)
        if overlay_path is not None and overlay_path.resolve().is_relative_to(masks_dir.resolve()):
            raise FCNZooError(f"{overlay_path}: lies in the frame masks' folder {masks_dir}; write it elsewhere")
    try:
        source = av.open(str(path))
    except (av.FFmpegError, OSError) as e:
        raise ImageError(f"{path}: cannot read this video ({e})") from e
    with source:
        if not source.streams.video:
            raise ImageError(f"{path}: has no video stream")
        stream = source.streams.video[0]
        stream.thread_type = "AUTO"
        counts = np.zeros(model.num_classes, dtype=np.int64)
        staging = None  # the frame masks, until they are all there
        if masks_dir is not None:
            masks_dir.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=masks_dir.parent, prefix=f".{masks_dir.name}-"))
        frames = width = height = 0
        try:
            writer = contextlib.nullcontext() if overlay_path is None else _overlay_writer(av, overlay_path, stream)
            frames_in = _frames(av, source, stream, path)
            with writer as write, contextlib.closing(predict_iter(model, frames_in, **options)) as segments:
                for frames, (_, seg) in enumerate(segments, start=1):
                    height, width = seg.size
                    counts += np.bincount(seg.labels.ravel(), minlength=model.num_classes)[: model.num_classes]
                    if staging is not None:
                        seg.save(staging / f"{frames - 1:06d}.png")
                    if write is not None:
                        write(np.asarray(seg.overlay(alpha=alpha)))
                if frames == 0:
                    raise ImageError(f"{path}: has no frames")
            if staging is not None:
                if masks_dir.exists():
                    _check_masks_dir(masks_dir)  # still frame masks alone
                    shutil.rmtree(masks_dir)
                staging.rename(masks_dir)
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
    total = counts.sum()
    order = np.argsort(-counts, kind="stable")
    shares = {model.class_names[i]: float(counts[i] / total) for i in order if counts[i]}
    return VideoResult(width, height, frames, shares)


def _frames(av, source, stream, path: Path) -> Iterator[np.ndarray]:
    try:
        for frame in source.decode(stream):
            yield _displayed(frame.to_ndarray(format="rgb24"), _display_matrix(frame))
    except av.FFmpegError as e:
        raise ImageError(f"{path}: cannot decode this video ({e})") from e


def _display_matrix(frame) -> np.ndarray | None:
    """The frame's display matrix (FFmpeg's 9 int32 values), ``None`` where it has none."""
    for side_data in frame.side_data:
        if getattr(side_data.type, "name", None) == "DISPLAYMATRIX":
            return np.frombuffer(bytes(side_data), dtype=np.int32)[:9]
    return None


def _displayed(rgb: np.ndarray, matrix: np.ndarray | None) -> np.ndarray:
    """A decoded ``(H, W, 3)`` frame as a player shows it: FFmpeg's display ``matrix`` applied (if any)."""
    if matrix is None:
        return rgb
    # the matrix maps a stored pixel (x, y) to (a x + c y, b x + d y) plus an offset (libavutil/display.h), turned
    # here to the nearest quarter turn, as FFmpeg's autorotation does; PyAV's frame.rotation alone would read a
    # mirroring as a half turn
    a, b, c, d = (int(v) for v in (matrix[0], matrix[1], matrix[3], matrix[4]))
    if abs(b) + abs(c) > abs(a) + abs(d):  # a quarter turn: stored rows are displayed columns
        rgb, flip_rows, flip_cols = rgb.transpose(1, 0, 2), b < 0, c < 0
    else:
        flip_rows, flip_cols = d < 0, a < 0
    if flip_rows:
        rgb = rgb[::-1]
    if flip_cols:
        rgb = rgb[:, ::-1]
    return np.ascontiguousarray(rgb)


@contextlib.contextmanager
def _overlay_writer(av, path, source_stream):
    """``write(rgb_frame)`` encoding into a temporary file that becomes ``path`` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, av.open(str(tmp), "w", format=_FORMATS[path.suffix.lower()]) as container:
        out = None

        def write(rgb: np.ndarray) -> None:
            nonlocal out
            if out is None:
                out = _add_stream(av, container, source_stream, rgb.shape[1], rgb.shape[0])
            if rgb.shape[:2] != (out.height, out.width):  # 4:2:0 needs even sizes: repeat the last row/column
                padding = ((0, out.height - rgb.shape[0]), (0, out.width - rgb.shape[1]), (0, 0))
                rgb = np.pad(rgb, padding, mode="edge")
            container.mux(out.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))

        yield write
        if out is not None:
            container.mux(out.encode())


def _add_stream(av, container, source_stream, width: int, height: int):
    rate = source_stream.average_rate or source_stream.guessed_rate or 25
    for codec in CODECS:
        if codec in av.codecs_available:
            try:
                out = container.add_stream(codec, rate=rate)
                break
            except (av.FFmpegError, ValueError):
                continue
    else:
        raise FCNZooError("this FFmpeg build has no H.264 or MPEG-4 encoder; install PyAV from its wheels")
    out.width, out.height = width + width % 2, height + height % 2
    out.pix_fmt = "yuv420p"
    if codec == "libx264":
        out.options = {"crf": "20", "preset": "veryfast"}
    return out


def _check_masks_dir(folder: Path) -> None:
    """A masks folder is new, or holds frame masks alone (an earlier run's, replaced): nothing else is deleted."""
    if folder.exists() and not folder.is_dir():
        raise FCNZooError(f"{folder}: is a file; pass masks_dir a folder for the frame masks")
    others = sorted(p.name for p in folder.iterdir() if not _FRAME.fullmatch(p.name)) if folder.is_dir() else []
    if others:
        raise FCNZooError(f"{folder}: holds {others[0]}{' and more' if len(others) > 1 else ''} besides frame masks; "
                          "pass masks_dir a new or empty folder")
