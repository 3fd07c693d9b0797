"""The exceptions fcn_zoo raises. Every one derives from :class:`FCNZooError`."""

from __future__ import annotations

import difflib

__all__ = ["FCNZooError", "UnknownModelError", "WeightsError", "ImageError", "NotCachedError", "is_out_of_memory"]


class FCNZooError(Exception):
    """Base class of every error fcn_zoo raises on purpose; its message is meant for the user."""


class UnknownModelError(FCNZooError, KeyError):
    """A model (or dataset) name that is not in the zoo."""

    def __init__(self, name: str, known: list[str], kind: str = "model"):
        self.name = name
        self.suggestions = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(self.suggestions)}?" if self.suggestions else f"known: {', '.join(known)}"
        super().__init__(f"unknown {kind} {name!r}: {hint}")

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


class WeightsError(FCNZooError, ValueError):
    """A weights file or config that cannot be turned into the model it claims to be."""


class ImageError(FCNZooError, ValueError):
    """An input image that cannot be read or is not an image."""


class NotCachedError(FCNZooError, FileNotFoundError):
    """Weights that are not on this machine while downloads are disabled."""


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says a device ran out of memory: ``torch.OutOfMemoryError`` (GPUs) or the plain
    ``RuntimeError`` the CPU allocator raises."""
    return isinstance(error, MemoryError) or (isinstance(error, RuntimeError) and "memory" in str(error).lower())
