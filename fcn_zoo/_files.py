"""Small file helpers shared by the weight, image and training paths, and where the fcn_zoo cache is."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from .errors import FCNZooError, WeightsError

#: an int8 model's network in its folder, in place of model.safetensors (fcn_zoo.int8)
INT8_FILES = ("openvino_model.xml", "openvino_model.bin")


def clear_for_save(folder: Path, weights: tuple[str, ...]) -> None:
    """Before a model's ``weights`` are saved into ``folder``: the card and weights of what was saved there before
    removed (huggingface_hub keeps a README.md it finds, which would describe the earlier model, and int8 files
    beside fp32 ones, or the reverse, are another model's)."""
    for name in ("README.md", "model.safetensors", *INT8_FILES):
        if name not in weights:
            (folder / name).unlink(missing_ok=True)


def is_quantized_config(config: dict) -> bool:
    """Whether a folder's ``config.json`` describes an int8 model (whose files are :data:`INT8_FILES`)."""
    return isinstance(config.get("quantization"), dict)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary name beside ``path`` to write to; renamed to ``path`` when the block succeeds,
    deleted when it fails. Readers of ``path`` never see a partial file. The name is this thread's own, so
    that two threads (or processes) writing ``path`` at once never write into one file."""
    path = Path(path)
    tmp = path.with_name(f".{partial_stem(path.name)}.{os.getpid()}-{threading.get_ident()}.partial")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


#: the temporary names :func:`atomic_path` writes to; group 1 is the :func:`partial_stem` of the file being written
PARTIAL_NAME = re.compile(r"^\.(.+)\.\d+(?:-\d+)?\.partial$")


def partial_stem(name: str) -> str:
    """What :func:`atomic_path`'s temporary name holds of ``name``: all of it, or where the temporary name would pass
    the 255 bytes a file name may have, its first 160 bytes and a hash of the whole."""
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) <= 200:
        return name
    return encoded[:160].decode("utf-8", "ignore") + "~" + hashlib.sha256(encoded).hexdigest()[:16]


def write_json(path: str | Path, data) -> None:
    """``data`` as indented JSON, written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The fcn_zoo cache (converted reference weights, ONNX graphs): ``cache_dir``, ``$FCN_ZOO_CACHE`` or
    ``~/.cache/fcn_zoo``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("FCN_ZOO_CACHE"):
        return Path(os.environ["FCN_ZOO_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "fcn_zoo"


def known_sha256(checkpoint, cache_dir=None) -> str | None:
    """The sha256 a zoo row's reference file must have: the table's, or the one recorded in the cache's
    ``known_hashes.json`` when it first converted (``fcn_zoo.downloads.record_hash``)."""
    return checkpoint.sha256 or known_hashes(cache_dir).get(checkpoint.name)


def known_hashes_path(cache_dir=None) -> Path:
    return cache_root(cache_dir) / "known_hashes.json"


def known_hashes(cache_dir=None) -> dict[str, str]:
    path = known_hashes_path(cache_dir)
    try:
        known = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as e:
        raise WeightsError(f"{path}: not valid JSON ({e}); delete it to record hashes anew") from e
    if not isinstance(known, dict):
        raise WeightsError(f"{path}: expected a JSON object, got {type(known).__name__}; delete it to record hashes anew")
    return known


@contextlib.contextmanager
def cache_lock(name: str, cache_dir: str | os.PathLike | None = None) -> Iterator[None]:
    """Held by one process at a time, across processes (a file lock in ``<cache>/.locks``): the one that fetches
    or converts ``name`` into the cache while the others wait, then find it there (torchrun's processes on a
    cold cache download a file once, not once each)."""
    from filelock import FileLock

    folder = cache_root(cache_dir) / ".locks"
    writable(folder)
    with FileLock(str(folder / f"{name.replace('/', '--')}.lock")):
        yield


def writable(folder: Path, what: str = "the fcn_zoo cache",
             fix: str = "set FCN_ZOO_CACHE or pass cache_dir= a writable folder") -> None:
    """Create ``folder`` and check that files can be made in it, or say which setting to change."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise FCNZooError(f"{folder}: {what} cannot be written ({e.strerror or e}); {fix}") from e
