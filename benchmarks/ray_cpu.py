"""Ray Data against ``fcn-zoo predict DIR`` on one machine's CPUs: the same photos, the same model, images/s.

    python benchmarks/ray_cpu.py [--name fcn_resnet50os16_voc] [--images 40] [--rounds 2] [--actors 1 2]

- The model: ``--name``'s architecture with random weights in the fcn_zoo cache (as its download would
  leave it); ``--images`` 500x375 photos (``bulk_cpu.make_photos``).
- ``fcn-zoo predict NAME photos --out masks`` in a fresh process: images/s from the time it reports.
- Ray: a fresh process runs docs/python.md's recipe (``read_binary_files`` -> ``map_batches(Segmenter)`` over an
  actor pool -> a function writing the masks -> ``write_parquet`` of the shares) on ``ray.init(num_cpus=N + 1)``
  with N the cores (the actors take N, the reading and writing tasks the one left); ``--actors`` pools of 1
  actor (torch on every core) and of one actor per core (torch on one thread each). images/s from the pipeline's start to its end (``ray.init`` and the model loads
  excluded, reported apart).
- Rounds interleaved; medians with ranges. The masks of each Ray run are compared with ``fcn-zoo predict``'s.

Needs the test and ray extras (``pip install -e ".[test,ray]"``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cached_row  # noqa: E402
from bulk_cpu import cli, make_photos  # noqa: E402

RAY_RUN = r'''
import json, os, sys, time
from pathlib import Path
t0 = time.perf_counter()
import ray
from PIL import Image
import fcn_zoo
from fcn_zoo.ray import Segmenter

class Ready(Segmenter):
    """Segmenter, saying when its model is loaded (what the pipeline's steady rate is counted from)."""

    def __init__(self, out, **kwargs):
        super().__init__(**kwargs)
        Path(out, f"ready-{os.getpid()}").write_text(str(time.time()))


def save_masks(batch, out):
    for path, labels in zip(batch["path"], batch["labels"]):
        Image.fromarray(labels).save(Path(out) / f"{Path(path).stem}.png")
    return {"path": batch["path"], "shares": batch["shares"]}

name, photos, out, actors = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cores = os.cpu_count()
# one logical CPU more than the cores: the actors take the cores, and the reading and writing tasks need one
# of their own, or they wait for a CPU the actors never give back
ray.init(num_cpus=cores + 1, include_dashboard=False, log_to_driver=False, configure_logging=False)
ray.data.DataContext.get_current().enable_progress_bars = False
started = time.perf_counter()
ds = ray.data.read_binary_files(photos, include_paths=True)
ds = ds.map_batches(Ready, fn_constructor_kwargs={"out": out, "model": name, "device": "cpu"}, batch_size=4,
                    num_cpus=cores // actors, compute=ray.data.ActorPoolStrategy(size=actors))
ds.map_batches(save_masks, fn_kwargs={"out": out}).write_parquet(str(Path(out) / "shares"))
done, done_wall = time.perf_counter(), time.time()
ready = max(float(p.read_text()) for p in Path(out).glob("ready-*"))  # the last actor's model loaded
ray.shutdown()
print(json.dumps({"pipeline_s": done - started, "steady_s": done_wall - ready, "init_s": started - t0}))
'''


def ray_run(name: str, photos: Path, out: Path, actors: int, env: dict) -> dict:
    out.mkdir(parents=True)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", RAY_RUN, name, str(photos), str(out), str(actors)], env=env,
                            capture_output=True, text=True, check=True)
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - start}


def cli_run(args: list[str], env: dict) -> tuple[float, float]:
    """(seconds ``fcn-zoo predict`` reports, the process's wall time)."""
    start = time.perf_counter()
    elapsed, _ = cli(args, env)
    return elapsed, time.perf_counter() - start


def same_masks(a: Path, b: Path, paths: list[Path]) -> bool:
    return all(np.array_equal(np.asarray(Image.open(a / f"{p.stem}.png")), np.asarray(Image.open(b / f"{p.stem}.png")))
               for p in paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", default="fcn_resnet50os16_voc")
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cached_row(work / "cache", args.name)
        env = {**os.environ, "FCN_ZOO_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1", "RAY_DEDUP_LOGS": "0"}
        paths = make_photos(work / "photos", args.images)
        labels = ["fcn-zoo predict DIR", *(f"Ray, {a} actor(s)" for a in args.actors)]
        steady: dict[str, list[float]] = {k: [] for k in labels}  # from the model loaded to the last mask written
        whole: dict[str, list[float]] = {k: [] for k in labels}  # the process, start to end
        inits, equal = [], True
        for r in range(args.rounds):
            elapsed, wall = cli_run([args.name, str(work / "photos"), "--out", str(work / f"cli{r}")], env)
            steady[labels[0]].append(args.images / elapsed)
            whole[labels[0]].append(args.images / wall)
            for a, label in zip(args.actors, labels[1:]):
                out = work / f"ray{r}-{a}"
                timing = ray_run(args.name, work / "photos", out, a, env)
                steady[label].append(args.images / timing["steady_s"])
                whole[label].append(args.images / timing["wall_s"])
                inits.append(timing["init_s"])
                equal &= same_masks(work / f"cli{r}", out, paths)
        print(f"{args.images} photos 500x375, {args.name} (random weights), {os.cpu_count()} cores, {args.rounds} rounds")
        print(f"  {'':24s} {'images/s, model loaded':>24s} {'images/s, whole process':>26s}")
        for label in labels:
            a, b = steady[label], whole[label]
            print(f"  {label:24s} {statistics.median(a):9.2f} ({min(a):.2f}-{max(a):.2f}) "
                  f"{statistics.median(b):13.2f} ({min(b):.2f}-{max(b):.2f})")
        print(f"  Ray start (import + ray.init): {statistics.median(inits):.1f} s; masks equal to fcn-zoo predict's: {equal}")


if __name__ == "__main__":
    main()
