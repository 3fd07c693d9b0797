"""Does the host keep a device busy? ``fcn-zoo predict DIR``'s path with the network replaced by a stand-in
that takes a fixed time per image and uses no CPU, as a GPU would (a sleep, which releases the GIL).

    python benchmarks/bulk_pipeline.py [--images 300] [--ms 2 5 20] [--labels host device] [--rounds 3] [--profile 5]

300 photos of 500x375 (tests/data photos, cropped and resized) go through ``segment_sources`` exactly as
the command runs them: read and resized ahead by reader threads, the stand-in "network", labels, and the
mask PNGs encoded and written behind on writer threads. For each stand-in time per image, images/s of the
whole path against the stand-in's own rate (measured alone: about 1000 / ms), for 0, 1 and 2 reader threads; rounds interleaved,
median and range. ``--profile MS`` prints where the main thread's time goes at that stand-in time.

``--labels``: where the labels (upsampling the logits to the image and the argmax) are made. ``host``: on
the CPU, as for a model on the CPU (the stand-in's logits are CPU tensors). ``device``: as on a GPU, where
``Predictor.finish`` runs ``upsample_argmax`` on the device the logits are on and only the uint8 labels come
back: the stand-in answers them (computed once per image size), in its own time, using no host CPU.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fcn_zoo  # noqa: E402
import fcn_zoo.engine  # noqa: E402
from bulk_cpu import make_photos  # noqa: E402
from fcn_zoo.runner import Outputs, segment_sources  # noqa: E402
from fcn_zoo.inputs import expand_inputs  # noqa: E402


class StandIn(fcn_zoo.FCN):
    """An FCN whose network is a fixed time per image without using the CPU, answering low-resolution logits
    of the right shape that look like a trained model's: background, and a few objects of other classes
    with noisy borders (fixed per shape), so that upsampling, argmax and PNG encoding do their real work."""

    ms = 20.0

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.ms / 1000 * x.shape[0])
        shape = (x.shape[0], self.num_classes, math.ceil(x.shape[2] / 8), math.ceil(x.shape[3] / 8))
        cache = self.__dict__.setdefault("_logits", {})
        if shape not in cache:
            cache[shape] = _scene_logits(shape)
        return cache[shape]


def _scene_logits(shape: tuple[int, int, int, int]) -> torch.Tensor:
    n, classes, h, w = shape
    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(n, h, w, dtype=torch.long)
    for i in range(n):
        for _ in range(3):  # three objects of random classes in random boxes
            y, x = int(torch.randint(0, h // 2, (1,), generator=g)), int(torch.randint(0, w // 2, (1,), generator=g))
            labels[i, y:y + h // 3, x:x + w // 3] = int(torch.randint(1, classes, (1,), generator=g))
    logits = torch.nn.functional.one_hot(labels, classes).permute(0, 3, 1, 2).float() * 6
    return logits + torch.randn(shape, generator=g)


class DeviceLabels:
    """``fcn_zoo.engine.upsample_argmax`` answered by the stand-in device: the labels of each logits shape,
    computed once, so the host's share of the labels is what it is with a GPU (copying uint8 labels back)."""

    def __init__(self, real):
        self.real, self.cache = real, {}

    def __call__(self, logits, size):
        key = (tuple(logits[0].shape), tuple(size))
        if key not in self.cache:
            self.cache[key] = self.real(logits, size)
        return self.cache[key]


def bare_rate(model: StandIn, ms: float, n: int = 100) -> float:
    """Images/s of the stand-in alone (its sleep oversleeps a little): the rate the path is measured against."""
    model.ms = ms
    x = torch.zeros(1, 3, 512, 683)
    start = time.perf_counter()
    for _ in range(n):
        model.forward_features(x)
    return n / (time.perf_counter() - start)


def run(model: StandIn, sources, out: Path, workers: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    # overlap: labels beside the next forward, as on a GPU (the stand-in is one: its network uses no CPU)
    totals = segment_sources(model, sources, Outputs(out), quiet=True, echo=lambda _: None, num_workers=workers,
                             overlap=True)
    assert totals.done == len(sources), totals
    return len(sources) / (time.perf_counter() - start)


def stages(model: StandIn, sources) -> None:
    """What the host does per image, each stage alone on one thread (torch's threads as configured): what
    the readers, the labels thread and the writers each cost, so that the bound is named."""
    from fcn_zoo.images import read_image
    from fcn_zoo.engine import Predictor
    from fcn_zoo.protocol import prepare

    predictor = Predictor(model.fuse(inplace=False))
    model.ms = 0.0
    times = {"read + resize + normalise": [], "labels (upsample + argmax)": [], "mask PNG written": []}
    for source in sources:
        t = time.perf_counter()
        loaded = read_image(source.path)
        with torch.inference_mode():
            prepared = prepare(predictor.model, loaded)
        times["read + resize + normalise"].append(time.perf_counter() - t)
        logits = predictor.forward([loaded], [source.name], [prepared])
        t = time.perf_counter()
        (seg,) = predictor.finish([loaded], [source.name], logits)
        times["labels (upsample + argmax)"].append(time.perf_counter() - t)
        t = time.perf_counter()
        seg.save(Path(tempfile.gettempdir()) / "fcn_zoo_stage.png")
        times["mask PNG written"].append(time.perf_counter() - t)
    print(f"\nper image, each stage alone ({len(sources)} images, medians):")
    for name, ts in times.items():
        print(f"  {name:28s} {1000 * statistics.median(ts):6.1f} ms")
    print(f"  {'total host work':28s} {1000 * sum(statistics.median(ts) for ts in times.values()):6.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--ms", type=float, nargs="+", default=[2, 5, 20])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--labels", nargs="+", choices=["host", "device"], default=["host", "device"],
                        help="where the labels are made: on the host (a CPU model) or by the stand-in device (a GPU's)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", type=float, help="profile the main thread at this stand-in time per image")
    parser.add_argument("--threads", type=int, help="torch's intra-op threads (default: torch's, one per core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = StandIn(num_classes=21, backbone="resnet10t", head_channels=8, aux_channels=None, dataset="voc").eval()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.images} photos 500x375, "
          f"evaluated at {model.eval_size[0]}x{model.eval_size[1]} (VOC), 21 classes, mask PNGs written")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_photos(work / "photos", args.images)
        sources = expand_inputs([str(work / "photos")]).sources
        model.ms = 1.0
        run(model, sources[:10], work / "warm", 0)
        host_labels = fcn_zoo.engine.upsample_argmax
        device_labels = DeviceLabels(host_labels)
        rates = {(ms, where, w): [] for ms in args.ms for where in args.labels for w in args.workers}
        for _ in range(args.rounds):
            for ms, where, w in rates:
                model.ms = ms
                fcn_zoo.engine.upsample_argmax = device_labels if where == "device" else host_labels
                try:
                    rates[ms, where, w].append(run(model, sources, work / "out", w))
                finally:
                    fcn_zoo.engine.upsample_argmax = host_labels
        print(f"\n{'stand-in':>10} {'its rate':>9} {'labels':>7} {'readers':>8} {'images/s':>9} {'of its rate':>12} "
              f"{'(range)':>14}")
        own_rates = {ms: bare_rate(model, ms) for ms in args.ms}
        for (ms, where, w), r in rates.items():
            own = own_rates[ms]
            print(f"{ms:8.0f} ms {own:7.1f}/s {where:>7} {w:8d} {statistics.median(r):9.1f} "
                  f"{statistics.median(r) / own:12.0%} ({min(r) / own:.0%}-{max(r) / own:.0%})")
        stages(model, sources[:30])
        if args.profile:
            model.ms = args.profile
            profiler = cProfile.Profile()
            profiler.enable()
            rate = run(model, sources, work / "out", max(args.workers))
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(12)
            print(f"\nmain thread at {args.profile:.0f} ms per image, {max(args.workers)} readers: {rate:.1f} images/s "
                  f"(the profiler slows it); where its time goes, by own time:")
            print("\n".join(line for line in text.getvalue().splitlines()[6:] if line.strip()))


if __name__ == "__main__":
    main()
