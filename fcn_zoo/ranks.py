"""The processes of one ``fcn-zoo predict`` run under ``torchrun``: which process takes an input, a gloo group
for the start of the run, and the end met through files (each process's ``done-<rank>.json`` and, while it
works, its ``alive-<rank>.json``), so that a slow process is waited for and a dead one named.

``FCN_ZOO_DIST_TIMEOUT`` (seconds, default 1800) bounds every wait: the start, and a silence at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from pathlib import Path

from ._files import atomic_path
from .errors import FCNZooError, first_line

__all__ = ["shard", "timeout", "join", "together", "Heartbeat", "meet_at_the_end", "read_json"]


def shard(name: str, world: int) -> int:
    """The process, of ``world``, that segments the source named ``name``: by a hash of the name, so that
    adding or removing inputs moves no other input to another process."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "big") % world


def timeout() -> float:
    """Seconds the processes of a run wait for one another: at the start, and for a sign of life at the end."""
    return float(os.environ.get("FCN_ZOO_DIST_TIMEOUT", 1800))


def join(rank: int, world: int) -> bool:
    """Join the processes' gloo group for the start of the run, unless the caller has a group; returns
    whether it was made here (and so is to be ended here)."""
    import datetime

    import torch.distributed as dist

    if dist.is_initialized():
        return False
    try:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout()))
    except Exception as e:
        raise FCNZooError(f"process {rank} of {world}: the processes did not all start within {timeout():g} s "
                          f"(FCN_ZOO_DIST_TIMEOUT; {first_line(e)}); see the other processes' errors") from e
    return True


def together(rank: int, world: int, collective, *args, **kwargs) -> None:
    try:
        collective(*args, **kwargs)
    except Exception as e:  # a process that stopped or never came
        raise FCNZooError(f"process {rank} of {world}: the processes did not all meet at the start "
                          f"({first_line(e)}); see the other processes' errors") from e


class Heartbeat:
    """This process's sign of life for the first one, which waits for it at the end: ``alive-<rank>.json``
    rewritten every few seconds by a thread of its own, whatever the process is busy with (a long video)."""

    def __init__(self, journal_dir: Path, rank: int, run: int):
        self._path = journal_dir / f"alive-{rank}.json"
        self._run = run
        self._stop = threading.Event()
        self._beat(0)
        every = max(0.2, min(10.0, timeout() / 8))
        self._thread = threading.Thread(target=self._loop, args=(every,), name="fcn_zoo-alive", daemon=True)
        self._thread.start()

    def _loop(self, every: float) -> None:
        beats = 0
        while not self._stop.wait(every):
            beats += 1
            with contextlib.suppress(OSError):  # a full disk: better named by the first process than failed
                self._beat(beats)

    def _beat(self, beats: int) -> None:
        with atomic_path(self._path) as tmp:
            tmp.write_text(json.dumps({"run": self._run, "beat": beats}), encoding="utf-8")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def meet_at_the_end(journal_dir: Path, counts: dict[str, int], rank: int, world: int, run: int,
                    poll: float = 0.25) -> tuple[dict[str, int], list[int]]:
    """Every process's ``counts`` summed, and (the first process) the processes that stopped without finishing.

    Each other process writes ``done-<rank>.json`` when it is through; the first waits for them all, as long
    as each keeps rewriting its ``alive-<rank>.json`` (:class:`Heartbeat`), and gives up on one that has not
    for ``FCN_ZOO_DIST_TIMEOUT`` seconds. No collective: a slow process is waited for, a dead one named."""
    if world == 1:
        return counts, []
    if rank != 0:
        with atomic_path(journal_dir / f"done-{rank}.json") as tmp:
            tmp.write_text(json.dumps({"run": run, "counts": counts}), encoding="utf-8")
        return counts, []
    summed, missing, limit = dict(counts), [], timeout()
    waiting = {r: (None, time.monotonic()) for r in range(1, world)}  # rank -> (last sign of life, seen when)
    while waiting:
        for r, (seen, since) in list(waiting.items()):
            mark = read_json(journal_dir / f"done-{r}.json")
            if mark is not None and mark.get("run") == run:
                for k, v in mark["counts"].items():
                    summed[k] = summed.get(k, 0) + v
                del waiting[r]
            elif (beat := read_json(journal_dir / f"alive-{r}.json")) != seen:
                waiting[r] = (beat, time.monotonic())
            elif time.monotonic() - since > limit:
                missing.append(r)
                del waiting[r]
        if waiting:
            time.sleep(poll)
    for r in range(1, world):
        (journal_dir / f"done-{r}.json").unlink(missing_ok=True)
        (journal_dir / f"alive-{r}.json").unlink(missing_ok=True)
    return summed, missing


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
