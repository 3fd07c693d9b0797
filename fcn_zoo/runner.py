"""``fcn-zoo predict`` over many inputs: outputs named after the inputs' folders, a progress bar, a summary,
resumption, and the inputs shared out over the processes ``torchrun`` starts.

Before anything is written, every source's outputs are checked to lie inside ``--out`` and apart from every
other source's (:func:`fcn_zoo.records.apart`). Nothing is removed that the run did not make: frame masks
are made in a folder of fcn-zoo's own, then moved into place beside whatever an existing folder holds. Each
source's outputs are written atomically, then a row is appended to this process's journal, so that
``--resume`` after Ctrl-C, ``kill -9`` or a lost node ends with the outputs of one uninterrupted run. Under
``torchrun`` the first process alone names the inputs, each source goes to process
:func:`fcn_zoo.ranks.shard`, and the processes meet at the end through files
(:func:`fcn_zoo.ranks.meet_at_the_end`): a slow one is waited for, a dead one named. At the end the first
process writes ``--out/summary.csv`` in input order, row by row.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from ._files import PARTIAL_NAME, atomic_path, cache_root, partial_stem
from .devices import distributed_rank
from .errors import FCNZooError, first_line
from .images import save_image
from .inputs import Source
from .predict import predict_iter
from .ranks import Heartbeat, join, meet_at_the_end, shard, timeout, together
from .records import (
    INPUTS, JOURNAL_DIR, MADE_BY, Journal, Outputs, Rows, apart, check_resumable, next_run, read_inputs, write_inputs,
)

__all__ = ["Outputs", "Totals", "segment_sources", "only_writer"]  # Outputs: from fcn_zoo.records, where it lives

WRITERS = 2  # threads encoding and writing outputs behind the network
WRITERS_AHEAD = 2 * WRITERS  # results that may wait for them before the network waits in turn


@dataclass
class Totals:
    """What a run did, over all its processes: sources segmented (``done``) and failed, sources an earlier
    run had completed (``already``, with ``--resume``), and files of walked folders that are neither images
    nor videos (``skipped``)."""

    done: int = 0
    failed: int = 0
    skipped: int = 0
    already: int = 0
    elapsed: float = 0.0


def segment_sources(
    model, sources: list[Source], outputs: Outputs, *, resume: bool = False, not_inputs: int = 0,
    quiet: bool = False, echo=print, made: dict | None = None, **options,
) -> Totals:
    """Segment ``sources`` into ``outputs``; returns what this run did (over all processes).

    Under ``torchrun`` the first process's ``sources`` are every process's (the others may pass ``[]``).
    ``not_inputs``: files found in walked folders that are neither images nor videos (counted as skipped).
    ``echo``: called with one line per source done (unless ``quiet``). ``made``: what makes the outputs
    (:func:`fcn_zoo.records.made_by`): recorded in the folder, and with ``resume`` checked against what it
    records. ``options``: as :func:`fcn_zoo.predict.predict`. Raises :class:`FCNZooError`, before anything is
    written, where an output would lie outside ``outputs.folder`` or two sources' outputs cannot be kept
    apart, and at the end where another process stopped without finishing its share.
    """
    start = time.perf_counter()
    rank, world, _ = distributed_rank()
    journal = Journal(outputs.folder, rank)
    plan = _begin(sources, outputs, journal, rank, world, resume, made)
    journal.run = plan.run
    mine = [s for s in plan.sources if shard(s.name, world) == rank]
    todo = [s for s in mine if not (s.name in plan.done and all(p.exists() for p in outputs.paths(s)))]
    totals = Totals(skipped=not_inputs if rank == 0 else 0, already=len(mine) - len(todo))
    bar = tqdm(total=len(mine), initial=totals.already, unit="img", dynamic_ncols=True, file=sys.stderr,
               disable=quiet or rank != 0 or not sys.stderr.isatty())
    alive = Heartbeat(outputs.folder / JOURNAL_DIR, rank, plan.run) if world > 1 and rank != 0 else None

    def record(source: Source, row: dict, line: str = "") -> None:
        row = journal.append(row)
        if rank == 0:
            plan.rows[source.name] = row
        if row["status"] == "ok":
            totals.done += 1
            if not quiet:
                (echo if bar.disable else bar.write)(line)
        else:
            totals.failed += 1
            bar.write(f"fcn-zoo: error: {row['error']}", file=sys.stderr)
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
                record(source, _failure(source, e))
                continue
            record(source, row, f"{_shown(source.path)} -> {', '.join(map(_shown, written))} ({_top(row['shares'])})")

    try:
        _clear_leftovers(outputs.folder, {p for s in todo for p in outputs.paths(s)})  # a killed run's, beside them
        images = [s for s in todo if not s.video]
        stream = predict_iter(model, [s.path for s in images], errors="yield", confidence=outputs.confidence, **options)
        for (_, result), source in zip(stream, images):
            if isinstance(result, Exception):
                settle(0)  # what came before it first, in order
                record(source, _failure(source, result))
            else:
                behind.append((source, writers.submit(_write_image, result, source, outputs)))
                settle(WRITERS_AHEAD)
        settle(0)
        for source in (s for s in todo if s.video):
            try:
                result = _segment_video(model, source, outputs, options)
            except Exception as e:
                record(source, _failure(source, e))
                continue
            row = _row(source, (result.height, result.width), result.shares, frames=result.frames)
            paths = ", ".join(map(_shown, outputs.paths(source)))
            record(source, row, f"{_shown(source.path)} -> {paths} ({result.frames} frames; {_top(row['shares'])})")
    finally:
        writers.shutdown(wait=True, cancel_futures=True)  # a write under way finishes (atomically)
        bar.close()
        journal.close()
        if alive is not None:
            alive.stop()
    counts, missing = meet_at_the_end(outputs.folder / JOURNAL_DIR, asdict(totals), rank, world, plan.run)
    totals = Totals(**counts)
    if rank == 0:
        if world > 1:
            journal.read_new(plan.rows)  # the other processes' rows of this run, read once
            (outputs.folder / JOURNAL_DIR / INPUTS).unlink(missing_ok=True)
        _write_summary(outputs.folder, plan.sources, plan.rows, model.class_names)
        if not missing:  # a process still writing (a slow disk, not a dead one) keeps its journal
            journal.compact([s.name for s in plan.sources], plan.rows)
    if missing:
        many = len(missing) > 1
        raise FCNZooError(
            f"process{'es' if many else ''} {', '.join(map(str, missing))} of {world} stopped before finishing "
            f"(no sign of {'them' if many else 'it'} for {timeout():g} s, FCN_ZOO_DIST_TIMEOUT): "
            f"{outputs.folder / 'summary.csv'} lacks what {'they' if many else 'it'} had left; "
            "rerun with --resume to finish"
        )
    totals.elapsed = time.perf_counter() - start
    return totals


@contextlib.contextmanager
def only_writer(folder: Path, cache_dir=None):
    """This machine's one ``fcn-zoo predict`` into ``folder`` while the block runs: another one started meanwhile
    is refused in one line, since their outputs, journals and summaries would interleave. Held through a file
    lock in the fcn_zoo cache (not in ``folder``); where the cache cannot be written the run goes unguarded."""
    from filelock import FileLock, Timeout

    key = hashlib.sha256(os.path.realpath(folder).encode("utf-8")).hexdigest()[:16]
    locks = cache_root(cache_dir) / ".locks"
    lock = FileLock(str(locks / f"predict-{key}.lock"), timeout=0)
    try:
        locks.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except Timeout:
        raise FCNZooError(f"--out {folder}: another fcn-zoo predict on this machine is writing into it; wait for it "
                          "to end, or pass another --out") from None
    except OSError:
        lock = None
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


@dataclass
class _Plan:
    """A run's start, as every process sees it."""

    sources: list[Source]  # named apart and inside --out, in input order
    done: set[str]  # names an earlier run's journal records as done (--resume)
    rows: Rows  # the first process: each source's newest row so far (others: empty)
    run: int  # this run's stamp (records.next_run)


def _begin(sources: list[Source], outputs: Outputs, journal: Journal, rank: int, world: int, resume: bool,
           made: dict | None) -> _Plan:
    """The run as every process sees it: under torchrun the first process tells the others its stamp or error."""
    if world == 1:
        return _prepare(sources, outputs, journal, resume, made, world)
    import torch.distributed as dist

    ours = join(rank, world)
    try:
        plan, error, told = None, None, [None, None]  # [the run's stamp, the first process's error]
        if rank == 0:
            try:
                plan = _prepare(sources, outputs, journal, resume, made, world)
                told = [plan.run, None]
            except Exception as e:  # told to the others, then raised here
                error, told = e, [None, first_line(e)]
        together(rank, world, dist.broadcast_object_list, told, src=0)
        run, message = told
        if message is not None:
            raise error or FCNZooError(message)  # the first process's own error; the others' copy of it
        if rank != 0:
            shared = read_inputs(outputs.folder, run)
            plan = _Plan(*shared, rows=Rows(), run=run) if shared is not None else None
        sees = [None] * world
        together(rank, world, dist.all_gather_object, sees, plan is not None)
        blind = [str(r) for r, ok in enumerate(sees) if not ok]
        if blind:
            raise FCNZooError(
                f"--out {outputs.folder} is not shared by every process: process{'es' if len(blind) > 1 else ''} "
                f"{', '.join(blind)} of {world} cannot see {outputs.folder / JOURNAL_DIR / INPUTS}, which process 0 "
                "wrote; on several machines, pass an --out on a file system that all of them mount")
        return plan
    finally:
        if ours:  # from here on the processes meet through files: no collective can time out
            dist.destroy_process_group()


def _prepare(sources: list[Source], outputs: Outputs, journal: Journal, resume: bool, made: dict | None,
             world: int) -> _Plan:
    """The first process's checks and records before anything is segmented; the journal is read once."""
    journal_dir = outputs.folder / JOURNAL_DIR
    sources = apart(sources, outputs)
    if made is not None and resume:
        check_resumable(outputs.folder, made)
    elif made is not None:  # every output is remade: no earlier row may count as done later
        for old in journal_dir.glob("journal*.jsonl"):
            old.unlink()
    # an earlier run's marks, the frame masks a killed run was making (_segment_video), and what a killed run was
    # writing of the summary and the journals
    for old in [*journal_dir.glob("done-*.json"), *journal_dir.glob("alive-*.json"), *journal_dir.glob("frames-*"),
                *journal_dir.glob(".*.partial"), *outputs.folder.glob(".summary.csv.*.partial")]:
        _remove(old)
    journal_dir.mkdir(parents=True, exist_ok=True)
    if made is not None:
        with atomic_path(journal_dir / MADE_BY) as tmp:
            tmp.write_text(json.dumps(made, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if resume:
        rows = journal.read()
    else:
        rows = Rows()
        journal.mark()
    run = next_run(rows)
    # done: made by an earlier run from this very file (another file of the same name is segmented anew)
    done = {s.name for s in sources if (row := rows.get(s.name)) is not None and row.get("status") == "ok"
            and row.get("input") == _identity(s.path)}
    if world > 1:
        write_inputs(outputs.folder, run, sources, done)
    return _Plan(sources, done, rows, run)


def _clear_leftovers(folder: Path, targets: set[Path]) -> None:
    """Remove the temporary files (``.<name>.<pid>-<thread>.partial``) a killed process left beside ``targets``."""
    stems = {(t.parent, partial_stem(t.name)) for t in targets}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != JOURNAL_DIR]
        for name in files:
            match = PARTIAL_NAME.match(name)
            if match and (Path(root), match.group(1)) in stems:  # Path: "./a" and "a" are one folder
                Path(root, name).unlink(missing_ok=True)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _write_image(seg, source: Source, outputs: Outputs) -> tuple[list[Path], dict]:
    """An image's outputs, which exist together or not at all, and its journal row."""
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
            path.unlink(missing_ok=True)
        raise
    return written, _row(source, seg.size, seg.class_shares())


def _segment_video(model, source: Source, outputs: Outputs, options: dict):
    """The overlay video, and the frame masks made in ``--out/.fcn-zoo`` then moved beside what is there."""
    from .video import segment_video

    paths = outputs.paths(source)
    if not outputs.masks:
        return segment_video(model, source.path, paths[0], alpha=outputs.alpha, **options)
    folder = paths[1]
    if folder.exists() and not folder.is_dir():
        raise FCNZooError(f"{folder}: exists and is not a folder, so the frame masks of {source.path} cannot go "
                          "there; move it, or pass another --out")
    staging = Path(tempfile.mkdtemp(dir=outputs.folder / JOURNAL_DIR, prefix="frames-"))
    try:
        result = segment_video(model, source.path, paths[0], masks_dir=staging / "frames", alpha=outputs.alpha,
                               **options)
        try:
            _move_frames(staging / "frames", folder)
        except BaseException:  # the clip failed: its overlay and the frames this run moved go, nothing else
            paths[0].unlink(missing_ok=True)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # fcn-zoo's own, and by now empty unless this failed
    return result


def _move_frames(frames: Path, folder: Path) -> None:
    """The frame masks moved into ``folder``, beside what it holds; where one cannot go, none is left there."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    if not folder.exists():
        try:
            frames.rename(folder)
            return
        except OSError:  # made meanwhile: merge below
            if not folder.is_dir():
                raise
    moved = []
    try:
        for frame in sorted(frames.iterdir()):
            os.replace(frame, folder / frame.name)  # a folder of that name there: IsADirectoryError
            moved.append(folder / frame.name)
    except BaseException:
        for path in moved:
            path.unlink(missing_ok=True)
        raise


def _identity(path: Path) -> list:
    """The file a row's outputs are made from: its real path, size and modification time (``--resume`` counts
    an output as done only when its input is still that file)."""
    try:
        stat = os.stat(path)
    except OSError:
        return [os.path.realpath(path), None, None]
    return [os.path.realpath(path), stat.st_size, stat.st_mtime_ns]


def _row(source: Source, size=(None, None), shares: dict[str, float] | None = None, frames: int | None = None) -> dict:
    return {"name": source.name, "input": _identity(source.path), "path": source.file_name,
            "kind": "video" if source.video else "image",
            "width": size[1], "height": size[0], "frames": frames, "status": "ok", "error": "", "shares": shares or {}}


def _shown(path) -> str:
    """``path`` as one line: a name holding a newline (or another unprintable character) escaped."""
    path = str(path)
    return path if path.isprintable() else repr(path)[1:-1]


def _failure(source: Source, error: BaseException) -> dict:
    path, shown = str(source.path), _shown(source.path)
    message = (str(error).replace(path, shown).strip().splitlines() or [type(error).__name__])[0].strip()
    if shown not in message:
        message = f"{shown}: {message}"
    return {**_row(source), "status": "failed", "error": message}


def _top(shares: dict[str, float]) -> str:
    # "; " because ADE20K's class names hold commas ("building, edifice")
    return "; ".join(f"{k} {v:.0%}" for k, v in list(shares.items())[:3])


def _write_summary(folder: Path, sources: list[Source], rows: Rows, class_names: list[str]) -> None:
    """``summary.csv``, one row per source in input order, then each class's share; written row by row."""
    columns = ["path", "kind", "width", "height", "frames", "status", "error"]
    with atomic_path(folder / "summary.csv") as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow([*columns, *class_names])
        for source in sources:
            row = rows.get(source.name)
            if row is not None:  # None: not reached (another process stopped before it)
                writer.writerow(["" if row[c] is None else row[c] for c in columns]
                                + [f"{row['shares'].get(n, 0.0):.6f}" for n in class_names])
