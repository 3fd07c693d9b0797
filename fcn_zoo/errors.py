"""The exceptions fcn_zoo raises. Every one derives from :class:`FCNZooError`."""

from __future__ import annotations

import difflib

__all__ = ["FCNZooError", "UnknownModelError", "WeightsError", "ImageError", "NotCachedError", "MissingFileError",
           "is_out_of_memory", "is_connection_error", "first_line"]


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


class MissingFileError(FCNZooError, FileNotFoundError):
    """A file or folder named by the caller that does not exist."""


class MissingImageError(ImageError, MissingFileError):
    """An image path that names no file: an :class:`ImageError` (the image's failure, as any other) and a
    :class:`MissingFileError` (a ``FileNotFoundError``)."""


#: What the allocators say when they run out: CUDA's and MPS's "out of memory", the CPU allocator's
#: "can't allocate memory" and "not enough memory", cuDNN's and cuBLAS's workspace "ALLOC_FAILED". An
#: "illegal memory access" is not among them.
_OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "not enough memory", "status_alloc_failed")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says a device ran out of memory: ``MemoryError``, ``torch.OutOfMemoryError`` (GPUs)
    or the plain ``RuntimeError`` the CPU allocator raises."""
    if isinstance(error, MemoryError) or any(c.__name__ == "OutOfMemoryError" for c in type(error).__mro__):
        return True
    return isinstance(error, RuntimeError) and any(s in str(error).lower() for s in _OUT_OF_MEMORY)


#: Exception classes of the HTTP clients huggingface_hub has used (requests, httpx, httpx2) that mean the
#: server was not reached or did not answer in time; matched by name, so none of them has to be imported.
_TRANSPORT_ERRORS = {"TransportError", "NetworkError", "TimeoutException", "ConnectionError", "Timeout"}


def is_connection_error(error: BaseException) -> bool:
    """Whether ``error`` says a server was not reached or did not answer in time."""
    return isinstance(error, OSError) or any(c.__name__ in _TRANSPORT_ERRORS for c in type(error).__mro__)


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name if it has none): libraries' messages run long."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0].strip()
