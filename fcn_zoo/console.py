"""How the command line talks: fcn_zoo's own lines on stderr, other libraries' logs kept quiet unless
``--debug``, and every error as one line."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Iterator

from .errors import FCNZooError, first_line

__all__ = ["configure_logging", "interrupt_on_sigterm", "print_columns", "quiet_loggers", "report"]


def interrupt_on_sigterm() -> None:
    """``kill`` (a scheduler's, torchrun's stop) as Ctrl-C: the outputs under way are finished or removed whole,
    and the command says "interrupted" in one line (exit 130) instead of dying between two files."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def print_columns(rows: list[tuple[str, ...]]) -> None:
    """``rows`` of text in aligned columns on stdout (``fcn-zoo list`` and ``info``)."""
    widths = [max(map(len, column)) for column in zip(*rows)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


@contextlib.contextmanager
def quiet_loggers(*names: str, level: int = logging.ERROR) -> Iterator[None]:
    """The loggers ``names`` at ``level`` within the block (what they say there is not the user's to act on, or is
    said otherwise), at their own levels again after it."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(level)
    try:
        yield
    finally:
        for log, old in zip(loggers, levels):
            log.setLevel(old)


def configure_logging(debug: bool) -> None:
    """fcn_zoo's own INFO lines (downloads) on stderr; other libraries' logs only with ``--debug``.

    The root logger is left alone, so httpx's and onnxscript's chatter never prints and huggingface_hub's
    warnings (its own handler's) are not printed twice; its retry warnings are silenced too, since the error
    that follows says what happened, in one line.
    """
    ours = logging.getLogger("fcn_zoo")
    for old in [h for h in ours.handlers if isinstance(h, _StderrHandler)]:
        ours.removeHandler(old)
    level = "debug" if debug else "error"
    os.environ["HF_HUB_VERBOSITY"] = level  # read when huggingface_hub is imported
    if "huggingface_hub" in sys.modules:
        logging.getLogger("huggingface_hub").setLevel(level.upper())
    if debug:
        logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")
    else:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        ours.addHandler(handler)
    ours.setLevel(logging.DEBUG if debug else logging.INFO)


class _StderrHandler(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record comes."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def report(error: BaseException, debug: bool) -> None:
    """One line on stderr (the traceback too with ``--debug``)."""
    if debug:
        traceback.print_exception(error)
    message = first_line(error)
    if not isinstance(error, (FCNZooError, OSError, ValueError)):
        message = f"{message} ({type(error).__name__}; --debug shows where)"
    print(f"fcn-zoo: error: {message}", file=sys.stderr)
