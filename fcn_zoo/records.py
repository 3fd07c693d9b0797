"""What a folder of ``fcn-zoo predict`` outputs records about itself, under ``--out/.fcn-zoo``: the journal of
finished sources (one JSON line each, per process) and ``made_by.json``, what made the outputs, which
``--resume`` checks before it continues."""

from __future__ import annotations

import json
from pathlib import Path

from ._files import atomic_path
from .errors import FCNZooError

__all__ = ["JOURNAL_DIR", "MADE_BY", "Journal", "made_by", "check_resumable"]

JOURNAL_DIR = ".fcn-zoo"
MADE_BY = "made_by.json"
#: the options of predict that change a mask, an overlay or a confidence map (batch size, workers, device
#: and compile change none beyond float rounding)
OUTPUT_OPTIONS = ("tta", "mode", "window", "stride", "precision", "engine")


def made_by(model: str, state_dict_sha256: str, config: dict, outputs, options: dict) -> dict:
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
    if "state_dict_sha256" not in before or "config" not in before:
        raise FCNZooError(f"--resume: {folder} records less of what made its outputs than this fcn-zoo checks (an older "
                          f"version wrote it); {how}")
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
