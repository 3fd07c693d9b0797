"""What a folder of ``fcn-zoo predict`` outputs records about itself, under ``--out/.fcn-zoo``: the journal of
finished sources (one JSON line each, per process), ``made_by.json``, what made the outputs, which
``--resume`` checks before it continues, and ``inputs.jsonl``, the run's inputs as its first process named
them, which the other processes of a ``torchrun`` read instead of looking for inputs themselves."""

from __future__ import annotations

import json
import posixpath
import time
from collections.abc import MutableMapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ._files import atomic_path
from .errors import FCNZooError
from .inputs import Source

__all__ = ["JOURNAL_DIR", "MADE_BY", "INPUTS", "RESERVED", "Journal", "Outputs", "apart", "made_by", "check_resumable",
           "next_run", "write_inputs", "read_inputs"]

JOURNAL_DIR = ".fcn-zoo"
MADE_BY = "made_by.json"
INPUTS = "inputs.jsonl"  # the run's inputs as the first process named them, for the others
#: the options of predict that change a mask, an overlay or a confidence map (batch size, workers, device
#: and compile change none beyond float rounding)
OUTPUT_OPTIONS = ("tta", "mode", "window", "stride", "precision", "engine")


def made_by(model: str, state_dict_sha256: str, config: dict, outputs, options: dict) -> dict:
    """What makes a folder's outputs: the model (as named, its state dict's sha256 and its configuration:
    classes, palette, normalisation, evaluation size), the output kinds and every option of ``options``
    that changes an output. Values are as JSON gives them back (a TTA a dict, tuples lists), to compare
    with what a folder records."""
    return json.loads(json.dumps({
        "model": str(model), "state_dict_sha256": state_dict_sha256, "config": config,
        "outputs": {"overlay": outputs.overlay, "alpha": outputs.alpha, "confidence": outputs.confidence,
                    "masks": outputs.masks},
        "options": {k: options.get(k) for k in OUTPUT_OPTIONS},
    }, default=asdict))


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
        raise FCNZooError(f"--resume: {journal_dir / MADE_BY} is damaged; rerun without --resume, or pass a new "
                          "--out") from None
    how = "rerun without --resume to remake every output, or pass a new --out"
    if "state_dict_sha256" not in before or "config" not in before:
        raise FCNZooError(f"--resume: {folder} records less of what made its outputs than this fcn-zoo checks (an "
                          f"older version wrote it); {how}")
    model, digest = before.get("model"), before["state_dict_sha256"]
    if digest != made["state_dict_sha256"]:
        raise FCNZooError(f"--resume: {folder} was made by another model ({model}, weights sha256 "
                          f"{str(digest)[:12]}...) than {made['model']} (sha256 "
                          f"{made['state_dict_sha256'][:12]}...); {how}")
    for key in sorted(set(made["config"]) | set(before["config"])):
        if before["config"].get(key) != made["config"].get(key):
            raise FCNZooError(f"--resume: {folder} was made by {model} with another {key} in its config.json "
                              f"than {made['model']} has now; {how}")
    for group in ("outputs", "options"):
        for key, now in made[group].items():
            then = before.get(group, {}).get(key)
            if then != now:
                raise FCNZooError(f"--resume: {folder} was made with {key}={then!r}, this run asks for "
                                  f"{key}={now!r}; {how}")


def next_run(rows: Rows) -> int:
    """A stamp for a new run's rows: the time in nanoseconds, or one past the newest run in ``rows`` where
    the clock reads earlier (a clock set back), so that a later run's rows always win."""
    newest = max((_stamp(row)[0] for row in rows.values()), default=0)
    return max(time.time_ns(), newest + 1)


def _stamp(row: dict) -> tuple[int, int]:
    stamp = row.get("stamp")
    if isinstance(stamp, list) and len(stamp) == 2 and all(isinstance(v, int) for v in stamp):
        return stamp[0], stamp[1]
    return 0, 0  # a row from before stamps: older than any stamped one


class Rows(MutableMapping):
    """Each input's row (a dict), kept as its compact JSON text: a million rows take ~0.3 GB, not the ~2 GB of
    as many dicts. Reading one decodes it."""

    def __init__(self):
        self._lines: dict[str, bytes] = {}

    def __getitem__(self, name: str) -> dict:
        return json.loads(self._lines[name])

    def __setitem__(self, name: str, row: dict) -> None:
        self._lines[name] = json.dumps(row, sort_keys=True, separators=(",", ":")).encode("utf-8")

    def __delitem__(self, name: str) -> None:
        del self._lines[name]

    def __iter__(self):
        return iter(self._lines)

    def __len__(self) -> int:
        return len(self._lines)

    def line(self, name: str) -> str:
        """The row's JSON text, as the journal holds it."""
        return self._lines[name].decode("utf-8")


class Journal:
    """Rows of finished sources, one JSON line each, appended and flushed as they finish; this process
    writes ``journal-<rank>.jsonl``, and :meth:`read` replays every process's journal (a torn last line is
    ignored).

    Each row is stamped ``[run, sequence]``: the run's stamp (:func:`next_run`, the same in every process of
    a run) and the row's place among this process's rows. An input's row with the newest stamp wins,
    whichever process wrote it and in whichever file: an input failed by process 1 of a two-process run and
    redone by a one-process ``--resume`` is done, though ``journal-1.jsonl`` still holds its failure.
    """

    def __init__(self, folder: Path, rank: int, run: int = 0):
        self.folder = folder / JOURNAL_DIR
        self.path = self.folder / f"journal-{rank}.jsonl"
        self.run = run
        self._sequence = 0
        self._file = None
        self._read_to: dict[str, int] = {}  # file name -> bytes already replayed (or there at the start)

    def read(self) -> Rows:
        """Every input's newest row, from the compacted journal of earlier runs and every process's own."""
        rows = Rows()
        self._read_to = {}
        for path in [self.folder / "journal.jsonl", *sorted(self.folder.glob("journal-*.jsonl"))]:
            if path.is_file():
                self._read_to[path.name] = _replay(path, 0, rows)
        return rows

    def mark(self) -> None:
        """Note where every process's journal ends now, without reading it: :meth:`read_new` starts there."""
        self._read_to = {p.name: p.stat().st_size for p in self.folder.glob("journal-*.jsonl")}

    def read_new(self, rows: Rows) -> None:
        """Add to ``rows`` what the other processes appended since :meth:`read` or :meth:`mark` (this
        process's own rows are the caller's already)."""
        for path in sorted(self.folder.glob("journal-*.jsonl")):
            if path != self.path:
                _replay(path, self._read_to.get(path.name, 0), rows)

    def append(self, row: dict) -> dict:
        """Write ``row`` stamped; returns it as written."""
        if self._file is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
            if self._file.tell():
                self._file.write("\n")  # after a torn line
        row = {**row, "stamp": [self.run, self._sequence]}
        self._sequence += 1
        self._file.write(json.dumps(row, sort_keys=True) + "\n")
        self._file.flush()
        return row

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def compact(self, names: list[str], rows: Rows) -> None:
        """One journal with the final row of each of ``rows``, ``names`` first in input order (then the inputs of
        earlier runs that this one did not name, which a later ``--resume`` of them still finds done), in place
        of the per-process ones. Written line by line; the rows keep their stamps, so a stop between the two
        steps leaves the same replay."""
        named = set(names)
        with atomic_path(self.folder / "journal.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
            for name in [*names, *(n for n in rows if n not in named)]:
                if name in rows:
                    f.write(rows.line(name) + "\n")
        for path in self.folder.glob("journal-*.jsonl"):
            path.unlink(missing_ok=True)


def _replay(path: Path, offset: int, rows: Rows) -> int:
    """Replay ``path`` from byte ``offset`` into ``rows`` (newest stamp wins, then later line); returns its end."""
    with open(path, "rb") as f:
        f.seek(offset)
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # the line a killed process was writing
            if not isinstance(row, dict) or not isinstance(row.get("name"), str):
                continue
            old = rows.get(row["name"])
            if old is None or _stamp(row) >= _stamp(old):
                rows[row["name"]] = row
        return f.tell()


def write_inputs(folder: Path, run: int, sources: list[Source], done: set[str]) -> None:
    """The run's inputs, as the first process named them, for the others (``--out/.fcn-zoo/inputs.jsonl``):
    a first line with the run's stamp, then one line per source (path, name, video, whether an earlier run's
    journal says it is done, and whether its name keeps its suffix). Written line by line, atomically."""
    with atomic_path(folder / JOURNAL_DIR / INPUTS) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps({"run": run, "inputs": len(sources)}) + "\n")
        for s in sources:
            f.write(json.dumps([str(s.path), s.name, s.video, s.name in done, s.suffixed]) + "\n")


def read_inputs(folder: Path, run: int) -> tuple[list[Source], set[str]] | None:
    """What :func:`write_inputs` wrote for the run stamped ``run``: the sources and the names done before;
    ``None`` where this process cannot see that file (an ``--out`` on another machine's disk, or an earlier
    run's list there)."""
    try:
        with open(folder / JOURNAL_DIR / INPUTS, encoding="utf-8") as f:
            head = json.loads(f.readline() or "null")
            if not isinstance(head, dict) or head.get("run") != run:
                return None
            sources, done = [], set()
            for line in f:
                path, name, video, finished, suffixed = json.loads(line)
                sources.append(Source(Path(path), name, video, suffixed))
                if finished:
                    done.add(name)
    except (OSError, ValueError):
        return None
    return (sources, done) if len(sources) == head.get("inputs") else None


RESERVED = (JOURNAL_DIR, "summary.csv")  # fcn-zoo's own names in --out, which no input's output may take


@dataclass(frozen=True)
class Outputs:
    """What to write for each source, under ``folder``."""

    folder: Path
    overlay: bool = False
    alpha: float = 0.5
    confidence: bool = False
    masks: bool = False  # videos: one palette PNG per frame

    def names(self, source: Source) -> list[str]:
        """The outputs of ``source``, relative to ``folder`` (``/``-separated, normalised): an image's mask,
        then its overlay and confidence map; a video's overlay, then the folder of its frame masks."""
        if source.video:
            ends = {"_overlay.mp4": True, "": self.masks}
        else:
            ends = {".png": True, "_overlay.jpg": self.overlay, "_confidence.png": self.confidence}
        return [posixpath.normpath(source.name + end) for end, wanted in ends.items() if wanted]

    def paths(self, source: Source) -> list[Path]:
        """:meth:`names` under ``folder``."""
        return [self.folder / name for name in self.names(source)]


def apart(sources: list[Source], outputs: Outputs) -> list[Source]:
    """``sources`` with every output inside ``outputs.folder``, none taking fcn-zoo's own names there
    (``.fcn-zoo``, ``summary.csv``), and no two sources' outputs meeting (see :func:`_meetings`): sources
    whose outputs would meet keep their suffix in their name, as ``x.jpg`` and ``x.png`` side by side do.
    Raises :class:`FCNZooError`, in one line naming the input (both, for a meeting), where that cannot be."""
    for source in sources:
        for name in outputs.names(source):
            if name in (".", "..") or name.startswith("../") or posixpath.isabs(name):
                raise FCNZooError(f"{source.path}: its output {outputs.folder / name} would lie outside --out "
                                  f"{outputs.folder}; give it a name inside --out")
            if name.split("/")[0] in RESERVED:
                raise FCNZooError(f"{source.path}: its output {outputs.folder / name} would take fcn-zoo's own "
                                  f"{name.split('/')[0]}; rename the input, or give it another name")
    renamed, _ = _meetings(sources, outputs)
    if not renamed:
        return sources
    sources = [replace(s, name=s.file_name, suffixed=True) if i in renamed else s for i, s in enumerate(sources)]
    _, met = _meetings(sources, outputs)
    if met is not None:
        a, b, name = met
        raise FCNZooError(f"{sources[a].path} and {sources[b].path}: both would write {outputs.folder / name}; "
                          "rename one of them, or give each its own --out")
    return sources


def _meetings(sources: list[Source], outputs: Outputs) -> tuple[set[int], tuple[int, int, str] | None]:
    """The sources to rename (both of a shared output; the outer one of an output inside another's, as a
    video's frame masks) and the first meeting (the two sources' indices and the output)."""
    owner: dict[str, int] = {}
    renamed: set[int] = set()
    first = None
    for i, source in enumerate(sources):
        for name in outputs.names(source):
            j = owner.setdefault(name, i)
            if j != i:
                renamed.update((i, j))
                first = first or (j, i, name)
    for name, i in owner.items():
        parent = posixpath.dirname(name)
        while parent:
            j = owner.get(parent)
            if j is not None and j != i:
                renamed.add(j)
                first = first or (j, i, parent)
            parent = posixpath.dirname(parent)
    return renamed, first
