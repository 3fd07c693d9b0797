"""``fcn-zoo predict`` over many inputs: outputs named after the inputs' folders, a progress bar, a summary,
resumption, and the inputs shared out over the processes ``torchrun`` starts.

Each source's outputs are written atomically, then a line is appended to this process's journal
(``--out/.fcn-zoo/journal-<rank>.jsonl``): its size, class shares, or the reason it failed. A source is
complete when its outputs exist and the journal says so; ``--resume`` skips complete sources, so a run cut
short (Ctrl-C, ``kill -9``, a lost node) and continued ends with the outputs of one uninterrupted run. What
made the outputs (the model, its weights' sha256 and every option that changes an output) is recorded in
``--out/.fcn-zoo/made_by.json``; ``--resume`` refuses a folder made otherwise, naming the difference. At the
end the first process writes ``--out/summary.csv`` in input order and compacts the journals into one.

Under ``torchrun`` (``WORLD_SIZE`` > 1) process ``r`` of ``n`` takes the sources ``r, r + n, ...`` (a video
is one source) on its own device (``cuda:<LOCAL_RANK>`` where there are GPUs), and the processes meet at
the end (a gloo barrier) so that one summary covers them all.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ._files import atomic_path
from .devices import distributed_rank
from .records import JOURNAL_DIR, MADE_BY, Journal, check_resumable, made_by
from .errors import first_line
from .images import save_image
from .sources import Source
from .stream import predict_iter

__all__ = ["Outputs", "Totals", "segment_sources", "made_by"]  # made_by: from fcn_zoo.records, where it lives

WRITERS = 2  # threads encoding and writing outputs behind the network
WRITERS_AHEAD = 2 * WRITERS  # results that may wait for them before the network waits in turn


@dataclass(frozen=True)
class Outputs:
    """What to write for each source, under ``folder``."""

    folder: Path
    overlay: bool = False
    alpha: float = 0.5
    confidence: bool = False
    masks: bool = False  # videos: one palette PNG per frame

    def paths(self, source: Source) -> list[Path]:
        base = self.folder / source.name
        if source.video:
            return [base.with_name(base.name + "_overlay.mp4")] + ([base] if self.masks else [])
        paths = [base.with_name(base.name + ".png")]
        if self.overlay:
            paths.append(base.with_name(base.name + "_overlay.jpg"))
        if self.confidence:
            paths.append(base.with_name(base.name + "_confidence.png"))
        return paths


@dataclass
class Totals:
    done: int = 0
    failed: int = 0
    skipped: int = 0
    elapsed: float = 0.0


def segment_sources(
    model, sources: list[Source], outputs: Outputs, *, resume: bool = False, not_inputs: int = 0,
    quiet: bool = False, echo=print, made: dict | None = None, **options,
) -> Totals:
    """Segment ``sources`` into ``outputs``; returns what this run did (over all processes).

    ``not_inputs``: files found in walked folders that are neither images nor videos (counted as skipped).
    ``echo``: called with one line per source done or failed (unless ``quiet``). ``made``: what makes the
    outputs (:func:`made_by`): recorded in the folder, and with ``resume`` checked against what it records.
    ``options``: as :func:`fcn_zoo.predict.predict`.
    """
    start = time.perf_counter()
    rank, world, _ = distributed_rank()
    journal_dir = outputs.folder / JOURNAL_DIR
    if made is not None or world > 1:
        if made is not None and resume:
            check_resumable(outputs.folder, made)  # every process, before any writes
        ours = _barrier(world)
        if rank == 0:
            if made is not None and not resume:  # every output is remade: no earlier row may count as done later
                for old in journal_dir.glob("journal*.jsonl"):
                    old.unlink()
            for old in journal_dir.glob("done-*.json"):  # an earlier run's completion marks
                old.unlink()
            journal_dir.mkdir(parents=True, exist_ok=True)
            if made is not None:
                with atomic_path(journal_dir / MADE_BY) as tmp:
                    tmp.write_text(json.dumps(made, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _barrier(world)
        if ours:  # from here on the processes meet through files: no collective can time out
            import torch.distributed as dist

            dist.destroy_process_group()
    journal = Journal(outputs.folder, rank)
    rows = journal.read() if resume else {}
    mine = [s for i, s in enumerate(sources) if i % world == rank]
    todo = [s for s in mine if not (rows.get(s.name, {}).get("status") == "ok" and all(p.exists() for p in outputs.paths(s)))]
    totals = Totals(skipped=len(mine) - len(todo) + (not_inputs if rank == 0 else 0))
    bar = _progress(len(mine), initial=len(mine) - len(todo), disable=quiet or rank != 0)

    def record(source: Source, row: dict, line: str) -> None:
        journal.append(row)
        if row["status"] == "ok":
            totals.done += 1
            if not quiet:
                (bar.write if bar is not None else echo)(line)
        else:
            totals.failed += 1
            line = f"fcn-zoo: error: {row['error']}"
            bar.write(line, file=sys.stderr) if bar is not None else print(line, file=sys.stderr)
        if bar is not None:
            bar.update()

    # encoding and writing run behind the network on threads of their own (PNG and JPEG encoders release the
    # GIL); at most WRITERS_AHEAD results wait, and they are recorded in input order
    writers = ThreadPoolExecutor(WRITERS, thread_name_prefix="fcn_zoo-write")
    behind: deque = deque()

    def settle(limit: int) -> None:
        while len(behind) > limit or (behind and behind[0][1].done()):
            source, future = behind.popleft()
            try:
                written, row = future.result()
            except Exception as e:  # a full disk, a folder where a file should go: this source fails alone
                record(source, _failure(source, e), "")
                continue
            record(source, row, f"{source.path} -> {', '.join(map(str, written))} ({_top(row['shares'])})")

    if resume:
        _clear_leftovers(outputs.folder, {p for s in todo for p in outputs.paths(s)})
    try:
        images = [s for s in todo if not s.video]
        by_path = iter(images)
        stream = predict_iter(model, [s.path for s in images], errors="yield", confidence=outputs.confidence, **options)
        for (_, result), source in zip(stream, by_path):
            if isinstance(result, Exception):
                settle(0)  # what came before it first, in order
                record(source, _failure(source, result), "")
                continue
            behind.append((source, writers.submit(_write_and_describe, result, source, outputs)))
            settle(WRITERS_AHEAD)
        settle(0)
        for source in (s for s in todo if s.video):
            try:
                result = _segment_video(model, source, outputs, options)
            except Exception as e:
                record(source, _failure(source, e), "")
                continue
            row = _row(source, (result.height, result.width), result.shares, frames=result.frames)
            paths = ", ".join(map(str, outputs.paths(source)))
            record(source, row, f"{source.path} -> {paths} ({result.frames} frames; {_top(row['shares'])})")
    finally:
        writers.shutdown(wait=True, cancel_futures=True)  # a write under way finishes (atomically)
        if bar is not None:
            bar.close()
        journal.close()
    totals = _meet_at_the_end(journal_dir, totals, rank, world)
    if rank == 0:
        _write_summary(outputs.folder, sources, journal.read(), model.class_names)
        journal.compact([s.name for s in sources])
    totals.elapsed = time.perf_counter() - start
    return totals


def _write_and_describe(seg, source: Source, outputs: Outputs) -> tuple[list[Path], dict]:
    written = _write_image_outputs(seg, source, outputs)
    return written, _row(source, seg.size, seg.class_shares())


def _clear_leftovers(folder: Path, targets: set[Path]) -> None:
    """Remove what a killed process left half-written for ``targets``: temporary files
    (``.<name>.<pid>.partial``) and folders (``.<name>-<random>``) beside them. One walk of ``folder``."""
    import re
    import shutil

    partial = re.compile(r"^\.(.+)\.\d+\.partial$")  # _files.atomic_path
    staging = re.compile(r"^\.(.+)-[a-z0-9_]{8}$")  # tempfile.mkdtemp(prefix=".<name>-")
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != JOURNAL_DIR]
        for name, pattern in [*((f, partial) for f in files), *((d, staging) for d in dirs)]:
            match = pattern.match(name)
            if match and Path(root, match.group(1)) in targets:
                stale = Path(root, name)
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def _write_image_outputs(seg, source: Source, outputs: Outputs) -> list[Path]:
    paths = outputs.paths(source)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        written.append(seg.save(paths[0]))
        if outputs.overlay:
            written.append(save_image(seg.overlay(alpha=outputs.alpha), paths[1], quality=90))
        if outputs.confidence:
            written.append(seg.save_confidence(paths[-1]))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)  # a source's outputs exist together or not at all
        raise
    return written


def _segment_video(model, source: Source, outputs: Outputs, options: dict):
    from .video import segment_video

    paths = outputs.paths(source)
    return segment_video(model, source.path, paths[0], masks_dir=paths[1] if outputs.masks else None,
                         alpha=outputs.alpha, **options)


def _row(source: Source, size: tuple[int, int], shares: dict[str, float], frames: int | None = None) -> dict:
    return {"name": source.name, "path": _relative_input(source), "kind": "video" if source.video else "image",
            "width": size[1], "height": size[0], "frames": frames, "status": "ok", "error": "", "shares": shares}


def _failure(source: Source, error: BaseException) -> dict:
    message = first_line(error)
    if str(source.path) not in message:
        message = f"{source.path}: {message}"
    return {"name": source.name, "path": _relative_input(source), "kind": "video" if source.video else "image",
            "width": None, "height": None, "frames": None, "status": "failed", "error": message, "shares": {}}


def _relative_input(source: Source) -> str:
    suffix = source.path.suffix
    return source.name if source.name.endswith(suffix) else source.name + suffix


def _top(shares: dict[str, float]) -> str:
    # "; " because ADE20K's class names hold commas ("building, edifice")
    return "; ".join(f"{k} {v:.0%}" for k, v in list(shares.items())[:3])


def _write_summary(folder: Path, sources: list[Source], rows: dict, class_names: list[str]) -> None:
    """``summary.csv``: one row per source in input order: its path relative to the inputs' common folder,
    kind, size, frames (videos), status, error, then the share of each class (0 where absent)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "kind", "width", "height", "frames", "status", "error", *class_names])
    for source in sources:
        row = rows.get(source.name)
        if row is None:  # not reached in this run (another process failed before it)
            continue
        cells = [row["path"], row["kind"], row["width"], row["height"], row["frames"], row["status"], row["error"]]
        writer.writerow(["" if c is None else c for c in cells] + [f"{row['shares'].get(n, 0.0):.6f}" for n in class_names])
    with atomic_path(folder / "summary.csv") as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")


def _barrier(world: int) -> bool:
    """Wait for every process (under torchrun), through a gloo group made for the start of the run if the
    caller has none; returns whether it was made here (and so is to be ended here)."""
    if world == 1:
        return False
    import datetime

    import torch.distributed as dist

    made = not dist.is_initialized()
    if made:
        timeout = float(os.environ.get("FCN_ZOO_DIST_TIMEOUT", 1800))  # seconds; the processes start together
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
    dist.barrier()
    return made


def _meet_at_the_end(journal_dir: Path, totals: Totals, rank: int, world: int, poll: float = 0.5) -> Totals:
    """Every process's totals summed, the first process waiting until all have finished (their journals
    complete), however long the others take: each writes ``done-<rank>.json`` when it is through, and the
    first reads them all. No collective, so no timeout can fire while a process is still working."""
    if world == 1:
        return totals
    journal_dir.mkdir(parents=True, exist_ok=True)
    counts = {"done": totals.done, "failed": totals.failed, "skipped": totals.skipped}
    with atomic_path(journal_dir / f"done-{rank}.json") as tmp:
        tmp.write_text(json.dumps(counts), encoding="utf-8")
    if rank != 0:
        return totals
    marks = [journal_dir / f"done-{r}.json" for r in range(world)]
    while not all(m.is_file() for m in marks):
        time.sleep(poll)
    summed = Totals()
    for mark in marks:
        counts = json.loads(mark.read_text(encoding="utf-8"))
        summed.done, summed.failed, summed.skipped = summed.done + counts["done"], summed.failed + counts["failed"], summed.skipped + counts["skipped"]
        mark.unlink()
    return summed


def _progress(total: int, initial: int, disable: bool):
    if disable or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="img", dynamic_ncols=True, file=sys.stderr)
