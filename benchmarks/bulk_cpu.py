"""Bulk inference on the CPU: ``fcn-zoo predict DIR`` against a plain loop of ``model.predict(path)``, its
memory at 30 and 300 images, and a video.

    python benchmarks/bulk_cpu.py [--name fcn_resnet50os16_voc] [--images 300] [--rounds 5] [--video-seconds 10] [--video-fps 10]

- Photos: ``--images`` 500x375 JPEGs made from the repo's three test photos by crops and flips.
- Throughput, in one process, interleaved: in each of ``--rounds`` rounds the same share of the photos goes
  through (a) a loop ``seg = model.predict(path); seg.save(...)`` on a model as ``from_pretrained`` gives
  it, (b) ``fcn_zoo.runner.segment_sources``, what ``fcn-zoo predict DIR --out`` runs (a ``fuse()``d
  model, ``predict_iter`` with its default readers: none on a CPU whose cores torch uses), into another
  folder, and (c) the same with two reader threads (``--workers 2``). images/s of each, median
  over the rounds with the range; the masks of (b) and (c) are compared with (a)'s pixel for pixel.
- Where the time goes: the network's forward alone against ``predict`` + ``save`` of one photo.
- Memory: ``fcn-zoo predict`` on the first 30 and on all the photos, each in a fresh process; peak RSS.
- Video: a ``--video-seconds`` 640x360 clip at ``--video-fps`` (panning crops of a photo, MPEG-4), through
  ``fcn-zoo predict clip.mp4`` in a fresh process: frames/s (the run's own elapsed time, without the
  process start) and peak RSS.

Needs the test and video extras (``pip install -e ".[test,video]"``).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]

from _common import cached_row, peak_rss_command  # noqa: E402

PHOTOS = sorted((ROOT / "tests" / "data").glob("*.jpg"))


def make_photos(folder: Path, count: int, size=(500, 375)) -> list[Path]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        img = Image.open(PHOTOS[i % len(PHOTOS)]).convert("RGB")
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = img.crop((x, y, x + cw, y + ch)).resize(size)
        if i % 2:
            img = ImageOps.mirror(img)
        paths.append(folder / f"{i:04d}.jpg")
        img.save(paths[-1], quality=90)
    return paths


def make_clip(path: Path, seconds: float, rate: int, size=(640, 360)) -> int:
    import av

    base = Image.open(PHOTOS[0]).convert("RGB").resize((size[0] * 2, size[1] * 2))
    frames = int(seconds * rate)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            x = int(i * (base.width - size[0]) / max(1, frames - 1))
            rgb = np.asarray(base.crop((x, 100, x + size[0], 100 + size[1])))
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return frames


def cli(args: list[str], env: dict) -> tuple[float, float]:
    """(seconds the run reports, peak RSS MiB) of ``fcn-zoo predict`` in a fresh process."""
    result = subprocess.run(peak_rss_command(["predict", *args]), env=env, capture_output=True,
                            text=True, check=True)
    elapsed = float(re.search(r"in ([\d.]+) s;", result.stdout).group(1))
    return elapsed, float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", default="fcn_resnet50os16_voc")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--video-seconds", type=float, default=10)
    parser.add_argument("--video-fps", type=int, default=10)
    args = parser.parse_args()

    import torch

    import fcn_zoo
    from fcn_zoo.runner import Outputs, segment_sources
    from fcn_zoo.inputs import expand_inputs

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.name}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cached_row(work / "cache", args.name)
        env = {**os.environ, "FCN_ZOO_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1"}
        os.environ.update(env)
        photos = make_photos(work / "photos", args.images)

        fused = fcn_zoo.from_pretrained(args.name).fuse()  # the loop and the bulk paths run the same network
        sources = expand_inputs([str(work / "photos")]).sources
        share = -(-len(photos) // args.rounds)
        loop_rates, bulk_rates, reader_rates = [], [], []
        fused.predict(photos[0])  # warm-up: oneDNN's primitives
        (work / "loop").mkdir()
        for r in range(args.rounds):
            part = slice(r * share, (r + 1) * share)
            t = time.perf_counter()
            for path in photos[part]:
                fused.predict(path).save(work / "loop" / f"{path.stem}.png")
            loop_rates.append(len(photos[part]) / (time.perf_counter() - t))
            t = time.perf_counter()
            segment_sources(fused, sources[part], Outputs(work / "bulk"), quiet=True, echo=lambda _: None)
            bulk_rates.append(len(sources[part]) / (time.perf_counter() - t))
            t = time.perf_counter()
            segment_sources(fused, sources[part], Outputs(work / "readers"), quiet=True, echo=lambda _: None,
                            num_workers=2)
            reader_rates.append(len(sources[part]) / (time.perf_counter() - t))
        # where the time of one photo goes: the network alone against the whole predict (read, resize,
        # network, labels, Segmentation), so that what overlapping can win is bounded
        with torch.inference_mode():
            batch = fcn_zoo.preprocess(fused, photos[0])
            network, whole = [], []
            for _ in range(5):
                t = time.perf_counter()
                fused.forward_features(batch)
                network.append(time.perf_counter() - t)
                t = time.perf_counter()
                fused.predict(photos[0]).save(work / "probe.png")
                whole.append(time.perf_counter() - t)
        equal = sum(
            np.array_equal(np.asarray(Image.open(work / "loop" / f"{p.stem}.png")), np.asarray(Image.open(work / d / f"{p.stem}.png")))
            for p in photos for d in ("bulk", "readers")
        )
        print(f"\n{len(photos)} photos 500x375, {args.rounds} interleaved rounds; images/s median (range)")
        print(f"  loop of model.predict(path) + save   {_fmt(loop_rates)}")
        print(f"  fcn-zoo predict DIR (segment_sources) {_fmt(bulk_rates)}")
        print(f"  the same with --workers 2             {_fmt(reader_rates)}")
        ratios = [b / a for a, b in zip(loop_rates, bulk_rates)]
        print(f"  ratio per round, default / loop       {_fmt(ratios, 'x')}")
        ratios = [b / a for a, b in zip(loop_rates, reader_rates)]
        print(f"  ratio per round, --workers 2 / loop   {_fmt(ratios, 'x')}")
        print(f"  masks equal to the loop's: {equal} of {2 * len(photos)}")
        net, total = statistics.median(network), statistics.median(whole)
        print(f"  one photo: network {net:.3f} s of {total:.3f} s for predict + save ({net / total:.0%}); "
              f"overlapping the rest can win at most {total / net:.2f}x")
        del fused

        small = work / "first30"
        small.mkdir()
        for p in photos[:30]:
            os.link(p, small / p.name)
        _, rss30 = cli([args.name, str(small), "--out", str(work / "m30")], env)
        seconds, rss_all = cli([args.name, str(work / "photos"), "--out", str(work / "mall")], env)
        print(f"\nfcn-zoo predict, fresh process: peak RSS {rss30:.0f} MiB at 30 photos, {rss_all:.0f} MiB at "
              f"{len(photos)} ({rss_all - rss30:+.0f} MiB); {len(photos) / seconds:.2f} images/s over {len(photos)}")

        if args.video_seconds:
            clip = work / "clip.mp4"
            frames = make_clip(clip, args.video_seconds, args.video_fps)
            seconds, rss = cli([args.name, str(clip), "--out", str(work / "video")], env)
            print(f"\nvideo 640x360, {frames} frames ({args.video_seconds:g} s at {args.video_fps} fps): {frames / seconds:.2f} frames/s, "
                  f"peak RSS {rss:.0f} MiB")


def _fmt(values: list[float], unit: str = "") -> str:
    return f"{statistics.median(values):6.3f}{unit} ({min(values):.3f}-{max(values):.3f})"


if __name__ == "__main__":
    main()
