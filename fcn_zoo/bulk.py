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
from dataclasses import dataclass
from pathlib import Path

from ._files import atomic_path
from .devices import distributed_rank
from .errors import FCNZooError, first_line
from .images import save_image
from .sources import Source
from .stream import predict_iter

__all__ = ["Outputs", "Totals", "segment_sources", "made_by"]

JOURNAL_DIR = ".fcn-zoo"
MADE_BY = "made_by.json"
#: the options of predict that change a mask, an overlay or a confidence map (batch size, workers, device
#: and compile change none beyond float rounding)
OUTPUT_OPTIONS = ("tta", "mode", "window", "stride", "precision", "engine")


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


def made_by(model: str, state_dict_sha256: str, config: dict, outputs: Outputs, options: dict) -> dict:
    """What makes a folder's outputs: the model (as named, its state dict's sha256 and its configuration:
    classes, palette, normalisation, evaluation size), the output kinds and every option of ``options``
    that changes an output."""
    return {
        "model": str(model), "state_dict_sha256": state_dict_sha256, "config": json.loads(json.dumps(config)),
        "outputs": {"overlay": outputs.overlay, "alpha": outputs.alpha, "confidence": outputs.confidence, "masks": outputs.masks},
        "options": {k: _plain_value(options.get(k)) for k in OUTPUT_OPTIONS},
    }


def _plain_value(value):
    if hasattr(value, "__dataclass_fields__"):  # a TTA
        return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(value).items()}
    return list(value) if isinstance(value, tuple) else value


def check_resumable(folder: Path, made: dict) -> None:
    """Refuse, in one line naming the difference, to resume into ``folder`` if its outputs were made otherwise."""
    journal_dir = folder / JOURNAL_DIR
    try:
        before = json.loads((journal_dir / MADE_BY).read_text(encoding="utf-8"))
    except FileNotFoundError:
        if any(journal_dir.glob("journal*.jsonl")):
            raise FCNZooError(f"--resume: {folder} does not record which model and options made its outputs (an older "
                              "fcn-zoo wrote it); rerun without --resume, or pass a new --out") from None
        return
    except ValueError:
        raise FCNZooError(f"--resume: {journal_dir / MADE_BY} is damaged; rerun without --resume, or pass a new --out") from None
    how = "rerun without --resume to remake every output, or pass a new --out"
    if before.get("state_dict_sha256") != made["state_dict_sha256"]:
        raise FCNZooError(
            f"--resume: {folder} was made by another model ({before.get('model')}, weights sha256 "
            f"{str(before.get('state_dict_sha256'))[:12]}...) than {made['model']} (sha256 {made['state_dict_sha256'][:12]}...); {how}")
    for key in sorted(set(made["config"]) | set(before.get("config", {}))):
        if before.get("config", {}).get(key) != made["config"].get(key):
            raise FCNZooError(f"--resume: {folder} was made by {before.get('model')} with another {key} in its config.json "
                              f"than {made['model']} has now; {how}")
    for group in ("outputs", "options"):
        for key, now in made[group].items():
            then = before.get(group, {}).get(key)
            if then != now:
                raise FCNZooError(f"--resume: {folder} was made with {key}={then!r}, this run asks for {key}={now!r}; {how}")


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
    if made is not None:
        if resume:
            check_resumable(outputs.folder, made)  # every process, before any writes
        _barrier(world)
        if rank == 0:
            journal_dir = outputs.folder / JOURNAL_DIR
            if not resume:  # every output is remade: no row of an earlier run may count as done later
                for old in journal_dir.glob("journal*.jsonl"):
                    old.unlink()
            journal_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(journal_dir / MADE_BY) as tmp:
                tmp.write_text(json.dumps(made, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _barrier(world)
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

    if resume:
        _clear_leftovers(outputs.folder, {p for s in todo for p in outputs.paths(s)})
    try:
        images = [s for s in todo if not s.video]
        by_path = iter(images)
        for (_, result), source in zip(predict_iter(model, [s.path for s in images], errors="yield", **options), by_path):
            if isinstance(result, Exception):
                record(source, _failure(source, result), "")
                continue
            try:
                written = _write_image_outputs(result, source, outputs)
            except Exception as e:  # a full disk, a folder where a file should go: this source fails alone
                record(source, _failure(source, e), "")
                continue
            row = _row(source, result.size, result.class_shares())
            record(source, row, f"{source.path} -> {', '.join(map(str, written))} ({_top(row['shares'])})")
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
        if bar is not None:
            bar.close()
        journal.close()
    totals = _gather(totals, rank, world)
    if rank == 0:
        _write_summary(outputs.folder, sources, journal.read(), model.class_names)
        journal.compact([s.name for s in sources])
    totals.elapsed = time.perf_counter() - start
    return totals


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


class Journal:
    """Rows of finished sources, one JSON line each, appended and flushed as they finish; this process
    writes ``journal-<rank>.jsonl``, and reads every process's journal (a torn last line is ignored)."""

    def __init__(self, folder: Path, rank: int):
        self.folder = folder / JOURNAL_DIR
        self.path = self.folder / f"journal-{rank}.jsonl"
        self._file = None

    def read(self) -> dict[str, dict]:
        rows: dict[str, dict] = {}
        if not self.folder.is_dir():
            return rows
        # the compacted journal of an earlier run first, then this run's: a later row replaces an earlier one
        paths = [self.folder / "journal.jsonl", *sorted(self.folder.glob("journal-*.jsonl"))]
        for path in (p for p in paths if p.is_file()):
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the line a killed process was writing
                rows[row["name"]] = row
        return rows

    def append(self, row: dict) -> None:
        if self._file is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
            if self._file.tell():
                self._file.write("\n")  # after a torn line
        self._file.write(json.dumps(row, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def compact(self, names: list[str]) -> None:
        """One journal with the final row of each source, in input order, in place of the per-process ones."""
        rows = self.read()
        text = "".join(json.dumps(rows[n], sort_keys=True) + "\n" for n in names if n in rows)
        with atomic_path(self.folder / "journal.jsonl") as tmp:
            tmp.write_text(text, encoding="utf-8")
        for path in self.folder.glob("journal-*.jsonl"):
            path.unlink(missing_ok=True)


def _barrier(world: int) -> None:
    """Wait for every process (under torchrun)."""
    if world == 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    dist.barrier()


def _gather(totals: Totals, rank: int, world: int) -> Totals:
    """Every process's totals summed, after all have finished (their journals complete)."""
    if world == 1:
        return totals
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    counts = torch.tensor([totals.done, totals.failed, totals.skipped], dtype=torch.int64)
    dist.all_reduce(counts)
    return Totals(*map(int, counts.tolist()))


def _progress(total: int, initial: int, disable: bool):
    if disable or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="img", dynamic_ncols=True, file=sys.stderr)
