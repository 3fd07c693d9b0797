"""Downloads: a URL to a file (size-checked, stall-limited), and a row's reference ``.pth`` from its release
page or a mirror (``FCN_ZOO_REFERENCE_URL``), checked against the table's sha256 or the one recorded at the
first download."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
from pathlib import Path

from ._files import atomic_path, cache_lock, cache_root, known_hashes, known_hashes_path, known_sha256, writable, write_json
from .errors import FCNZooError, WeightsError, first_line
from .zoo import Checkpoint

__all__ = ["download", "download_reference", "record_hash", "reference_download_urls"]

logger = logging.getLogger(__name__)


def reference_download_urls(checkpoint: Checkpoint) -> list[str]:
    """The URLs a row's reference ``.pth`` is tried at, in order: ``<name>.pth``, then the older
    ``<name>_train.pth``; ``FCN_ZOO_REFERENCE_URL`` replaces the base if set."""
    base = os.environ.get("FCN_ZOO_REFERENCE_URL")
    if not base:
        return checkpoint.reference_urls
    return [f"{base.rstrip('/')}/{url.rsplit('/', 1)[1]}" for url in checkpoint.reference_urls]


def download_reference(checkpoint: Checkpoint, directory: Path, cache_dir=None) -> tuple[Path, str, str]:
    """Download a row's reference ``.pth`` into ``directory``; returns ``(path, url, sha256)``.

    ``<name>.pth`` is tried first, then the reference's older name ``<name>_train.pth`` if the server
    has no file of the first name (404). The sha256 must equal the table's, or, where the table has none
    yet, the one recorded in the cache (``cache_dir``'s ``known_hashes.json``) by :func:`record_hash` once a first
    download converted; a file that differs is deleted and refused.
    """
    from urllib.error import HTTPError

    writable(cache_root(cache_dir))  # where the hash is recorded: checked before the transfer, not after it
    expected = known_sha256(checkpoint, cache_dir)  # a damaged known_hashes.json too
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{checkpoint.name}.pth"
    urls = reference_download_urls(checkpoint)
    for i, url in enumerate(urls):
        logger.info("downloading %s", url)
        try:
            sha256 = download(url, path)
            break
        except HTTPError as e:
            if e.code == 404 and i + 1 < len(urls):
                continue
            raise FCNZooError(_download_failed(checkpoint, urls[: i + 1], e)) from e
        except (OSError, ValueError, http.client.HTTPException) as e:  # URLError is an OSError
            raise FCNZooError(_download_failed(checkpoint, [url], e)) from e
    if expected and sha256 != expected:
        path.unlink(missing_ok=True)
        if checkpoint.sha256:
            origin = "published in the table"
            how = ("it is not the published file; to use it anyway, download it and load the local file "
                   f"(fcn_zoo.from_pretrained('{checkpoint.name}.pth'))")
        else:
            origin = "recorded at the first download"
            how = (f"if the mirror's file was changed on purpose, delete the \"{checkpoint.name}\" entry of "
                   f"{known_hashes_path(cache_dir)} and load again to accept it")
        raise WeightsError(f"{url}: sha256 {sha256} differs from {expected}, {origin}; the file was not used; {how}")
    return path, url, sha256


def record_hash(checkpoint: Checkpoint, sha256: str, cache_dir=None) -> None:
    """Record the sha256 of a row's reference file, where the table has none, once the file has converted: later
    downloads must match it. (A page a mirror served in its place never converts, so is never recorded.)"""
    if checkpoint.sha256:
        return
    with cache_lock("known_hashes", cache_dir):  # rows converting in other processes at once each add theirs
        known = known_hashes(cache_dir)
        if checkpoint.name not in known:
            write_json(known_hashes_path(cache_dir), {**known, checkpoint.name: sha256})


def download(url: str, path: Path, timeout: float | None = None) -> str:
    """Download ``url`` to ``path`` with a progress bar; return its sha256.

    ``timeout`` (seconds without data, default ``$FCN_ZOO_DOWNLOAD_TIMEOUT`` or 60) ends a stalled download.

    Unlike ``torch.hub.download_url_to_file`` this checks the received size against Content-Length (a
    connection cut mid-file is an error, not a short file) and does not wait forever on a silent server.
    The file appears at ``path`` only when complete.
    """
    from urllib.request import Request, urlopen

    from tqdm.auto import tqdm

    if timeout is None:
        setting = os.environ.get("FCN_ZOO_DOWNLOAD_TIMEOUT") or "60"
        try:
            timeout = float(setting)
        except ValueError:
            timeout = float("nan")
        if not 0 < timeout < float("inf"):  # a setting, not the network: named apart from download failures
            raise FCNZooError(f"FCN_ZOO_DOWNLOAD_TIMEOUT={setting!r}: expected a positive number of seconds "
                              "without data (default 60); fix or unset it")
    digest = hashlib.sha256()
    with atomic_path(path) as tmp:
        with urlopen(Request(url, headers={"User-Agent": "fcn-zoo"}), timeout=timeout) as response, open(tmp, "wb") as f:
            expected = int(response.headers.get("Content-Length") or 0) or None
            received = 0
            with tqdm(total=expected, unit="B", unit_scale=True, unit_divisor=1024, desc=path.name) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if expected is not None and received != expected:
            raise OSError(f"the connection closed after {received} of {expected} bytes")
    return digest.hexdigest()


def _download_failed(checkpoint: Checkpoint, urls: list[str], error: BaseException) -> str:
    """One line naming the URLs tried and the setting that chose them."""
    from urllib.error import HTTPError

    tried = urls[0] if len(urls) == 1 else f"{' and '.join(urls)} (the reference's older name)"
    mirror = os.environ.get("FCN_ZOO_REFERENCE_URL")
    if isinstance(error, HTTPError) and error.code == 404:
        where = f"the mirror FCN_ZOO_REFERENCE_URL={mirror}" if mirror else "the reference's release page"
        return (f"{checkpoint.name}: {where} has no such file ({tried} answered 404); "
                + (f"put {checkpoint.name}.pth there" if mirror else "set FCN_ZOO_REFERENCE_URL to a mirror that holds it"))
    setting = f"FCN_ZOO_REFERENCE_URL={mirror} is the mirror used" if mirror else "or set FCN_ZOO_REFERENCE_URL to a mirror"
    return f"{checkpoint.name}: downloading {tried} failed ({first_line(error)}); check the network ({setting})"
