"""Where weights come from: a name, repo id, folder or ``.pth`` becomes a local ``save_pretrained`` folder.

Resolution order for a zoo name (e.g. ``fcn_resnet50os8_voc``):

1. its Hugging Face Hub repo at the pinned revision (or ``revision``), if that is in the Hugging Face cache;
2. a converted copy of the reference ``.pth`` in the fcn_zoo cache (not when ``revision`` is given);
3. the Hub repo at that revision, downloaded;
4. the reference ``.pth`` itself, downloaded (``FCN_ZOO_REFERENCE_URL`` replaces the base URL) as
   ``<name>.pth`` or, where the server has only the older name, ``<name>_train.pth``; read with
   ``torch.load(weights_only=True)``, converted, shape-checked and stored as safetensors in the cache.

Nothing touches the network while something usable is cached. With ``HF_HUB_OFFLINE=1`` or
``local_files_only=True`` only steps 1-2 run, and a miss is a :class:`NotCachedError` that says what to
download.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from ._files import INT8_FILES, cache_lock, cache_root, is_quantized_config, sha256_file, writable
from .devices import check_device_available
from .downloads import download_reference, record_hash
from .errors import (
    FCNZooError, MissingFileError, NotCachedError, UnknownModelError, WeightsError, first_line, is_connection_error,
)
from .zoo import CHECKPOINTS, Checkpoint, checkpoint_for_file

__all__ = ["from_pretrained", "resolve", "source_kind", "cache_root", "is_cached", "cached_folder"]

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: Seconds to wait for the Hub before saying it cannot be reached (huggingface_hub would retry for ~24 s).
HUB_CONNECT_TIMEOUT = 5.0


def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    num_classes: int | None = None,
    device: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
):
    """Load an FCN in eval mode.

    Args:
        name_or_path: a zoo name (``fcn_zoo.list_models()``), a Hub repo id ``owner/name`` or
            ``owner/name@revision``, a ``save_pretrained`` folder, or a reference ``.pth`` file.
        revision: a Hub branch, tag or commit; for zoo names it replaces the pinned revision.
        num_classes: if different from the checkpoint's, the classifiers are freshly initialised
            (for fine-tuning) and everything else is loaded.
        device: where to put the model (``"cpu"``, ``"cuda"``, ``"cuda:1"``...); default CPU.
        cache_dir: where downloads and converted weights are kept (default ``~/.cache/fcn_zoo`` and the
            Hugging Face cache).
        local_files_only: never touch the network (also implied by ``HF_HUB_OFFLINE=1``).

    Returns:
        an :class:`fcn_zoo.FCN` in eval mode; for an int8 folder (:func:`fcn_zoo.quantization.quantize`), a
        :class:`fcn_zoo.int8.QuantizedFCN` (on the CPU; ``pip install 'fcn-zoo[int8]'``).
    """
    from .model import FCN

    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    device = model_device(device)  # before anything is downloaded or loaded
    folder = resolve(name_or_path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    saved = _read_config(folder)
    from .int8 import load_int8

    if is_quantized_config(saved):
        if num_classes is not None and num_classes != saved.get("num_classes"):
            raise ValueError(f"{name_or_path} is an int8 model: fine-tune the fp32 model for new classes, then quantize it")
        if device.type != "cpu":
            raise ValueError(f"{name_or_path} is an int8 model, run on the CPU: leave device at its default")
        return load_int8(folder, saved)
    overrides = {}
    if num_classes is not None and saved.get("num_classes") != num_classes:
        # the saved class names, palette and dataset no longer apply
        overrides = dict(num_classes=num_classes, new_classes=True, class_names=None, palette=None, dataset=None)
    model = FCN.from_pretrained(folder, **overrides)
    return model.to(device).eval()


def model_device(device: str | None):
    """``device`` (default CPU) as a ``torch.device``, checked to exist here; shared with hubconf.py's entry points."""
    import torch

    try:
        parsed = torch.device(device or "cpu")
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'mps'") from e
    check_device_available(str(parsed))
    return parsed


def resolve(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Path:
    """Return a local folder holding ``config.json`` and ``model.safetensors`` for ``name_or_path``.

    Downloads and converts as needed; see the module docstring for the order.
    """
    offline = local_files_only or _hub_offline()
    kind = source_kind(name_or_path)
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if kind == "folder":
        missing = _missing_files(path)
        if missing:
            raise WeightsError(f"{path}: not a save_pretrained folder, it lacks {' and '.join(missing)}")
        return path
    if kind == "pth":
        return _convert_local_pth(path, cache_dir)
    if kind == "zoo":
        if (path / CONFIG_NAME).is_file():  # e.g. an earlier `predict NAME ... --out NAME`
            logger.warning("%s: loading the zoo model, not the folder of that name here; pass ./%s to load the folder",
                           text, text)
        return _resolve_zoo(CHECKPOINTS[text], revision, cache_dir, offline)
    repo_id, _, repo_revision = text.partition("@")
    return _download_hub(repo_id, revision or repo_revision or None, cache_dir, offline)


def source_kind(name_or_path: str | os.PathLike) -> str:
    """What ``name_or_path`` names, told without loading anything: ``"folder"``, ``"pth"`` (a local file),
    ``"zoo"`` (a row's name) or ``"hub"`` (a repo id, ``owner/name[@revision]``). A missing path, a file of
    another kind or an unknown name raises the error :func:`resolve` would."""
    text = os.fspath(name_or_path)
    if not text.strip():  # Path("") is the current folder
        raise MissingFileError(f"{text!r}: an empty model name; pass a zoo name, Hub repo id, folder or .pth file")
    if text in CHECKPOINTS:  # a row's name is the row, even beside a folder of that name: `./NAME` is the folder
        return "zoo"
    path = Path(text).expanduser()
    if path.is_dir():
        return "folder"
    if path.is_file():
        if path.suffix in (".pth", ".pt"):
            return "pth"
        raise WeightsError(
            f"{path}: expected a save_pretrained folder (config.json + model.safetensors) or a reference .pth file"
        )
    if _REPO_ID.match(text.partition("@")[0]) and not text.endswith((".pth", ".pt", "/")):
        return "hub"
    if os.sep in text or text.endswith((".pth", ".pt")):
        raise MissingFileError(f"{text}: no such file or folder")
    raise UnknownModelError(text, sorted(CHECKPOINTS))


def is_cached(name: str, cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether zoo model ``name`` loads without the network."""
    return cached_folder(name, cache_dir) is not None


def cached_folder(name: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The local folder zoo model ``name`` loads from without the network, or ``None``."""
    checkpoint = CHECKPOINTS[name]
    if checkpoint.hub_revision:
        try:
            return _download_hub(checkpoint.hub_repo_id, checkpoint.hub_revision, cache_dir, offline=True)
        except NotCachedError:
            pass
    converted = cache_root(cache_dir) / "reference" / name
    return None if _missing_files(converted) else converted


# --- the routes ----------------------------------------------------------------------------------


def _resolve_zoo(checkpoint: Checkpoint, revision: str | None, cache_dir, offline: bool) -> Path:
    # whatever is already on this machine first: an unreachable Hub costs huggingface_hub ~20 s of retries
    if revision:  # an explicitly requested Hub revision has no fallback
        try:
            return _download_hub(checkpoint.hub_repo_id, revision, cache_dir, offline=True)
        except NotCachedError:
            if offline:
                raise
        return _download_hub(checkpoint.hub_repo_id, revision, cache_dir, offline=False)
    cached = cached_folder(checkpoint.name, cache_dir)
    if cached is not None:
        return cached
    if checkpoint.hub_revision and not offline:
        try:
            return _download_hub(checkpoint.hub_repo_id, checkpoint.hub_revision, cache_dir, offline=False)
        except FCNZooError as e:
            logger.info("%s; using the reference weights instead", e)
    converted = cache_root(cache_dir) / "reference" / checkpoint.name
    if offline and _hub_offline():  # also what stops `fcn-zoo download NAME` itself
        raise NotCachedError(
            f"{checkpoint.name} is not cached and HF_HUB_OFFLINE=1 disables downloads: unset HF_HUB_OFFLINE to "
            f"download it (`fcn-zoo download {checkpoint.name}`), or copy {converted} from a machine that has it"
        )
    if offline:
        raise NotCachedError(
            f"{checkpoint.name} is not cached and downloads are disabled (local_files_only=True). "
            f"On a machine with network run `fcn-zoo download {checkpoint.name}` and copy {converted}, "
            f"or place {checkpoint.name}.pth behind FCN_ZOO_REFERENCE_URL and allow downloads."
        )
    from .convert import convert_checkpoint

    writable(converted.parent)
    with cache_lock(f"reference-{checkpoint.name}", cache_dir):  # other processes wait here, then find it
        if _missing_files(converted):
            for stale in converted.parent.glob(f".{checkpoint.name}-*"):  # a killed load's: the lock says none is in use
                shutil.rmtree(stale, ignore_errors=True)
            with tempfile.TemporaryDirectory(dir=converted.parent, prefix=f".{checkpoint.name}-") as tmp:
                pth, url, sha256 = download_reference(checkpoint, Path(tmp), cache_dir)
                try:
                    convert_checkpoint(pth, converted, "reference", checkpoint=checkpoint, provenance={"source_url": url})
                except WeightsError as e:  # named by its URL: the temporary file is gone
                    raise WeightsError(str(e).replace(str(pth), url)) from e
                record_hash(checkpoint, sha256, cache_dir)
    return converted


def _download_hub(repo_id: str, revision: str | None, cache_dir, offline: bool) -> Path:
    from huggingface_hub import errors, hf_hub_download

    where = f"{repo_id}@{revision}" if revision else repo_id
    if not offline:
        _check_hub_reachable(repo_id, revision, cache_dir, where)
    def download(filename: str) -> Path:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, local_files_only=offline))

    try:
        config = download(CONFIG_NAME)
        for filename in INT8_FILES if is_quantized_config(_read_config(config.parent)) else (WEIGHTS_NAME,):
            download(filename)
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled) as e:  # before the HTTP errors: not an answer
        if offline and _hub_offline():
            raise NotCachedError(f"{where} is not in the Hugging Face cache and HF_HUB_OFFLINE=1 disables downloads: "
                                 "unset HF_HUB_OFFLINE to download it") from e
        if offline:
            raise NotCachedError(
                f"{where} is not in the Hugging Face cache and downloads are disabled; "
                f"on a machine with network run `hf download {repo_id}"
                f"{' --revision ' + revision if revision else ''}` and copy the cache here"
            ) from e
        raise FCNZooError(f"{where}: the Hugging Face Hub cannot be reached ({first_line(e)})") from e
    except errors.RevisionNotFoundError as e:
        raise WeightsError(f"{where}: the Hub repo has no such revision; use a branch, tag or commit it has") from e
    except errors.RepositoryNotFoundError as e:
        raise UnknownModelError(repo_id, sorted(CHECKPOINTS), kind="model or Hub repo") from e
    except getattr(errors, "RemoteEntryNotFoundError", errors.EntryNotFoundError) as e:  # huggingface_hub 1.0 / 0.x
        raise WeightsError(f"{where}: the Hub repo has no {CONFIG_NAME} + {WEIGHTS_NAME}; not an fcn_zoo model") from e
    except errors.HfHubHTTPError as e:
        raise FCNZooError(f"{where}: the Hugging Face Hub answered {first_line(e)}") from e
    return config.parent


def _check_hub_reachable(repo_id: str, revision: str | None, cache_dir, where: str) -> None:
    """Fail at once with one line when the Hub cannot be reached and ``repo_id`` is not (wholly) cached.

    huggingface_hub retries an unreachable Hub for ~24 s before giving up; one request without retries tells
    the same. A repo that is cached is left to huggingface_hub, which serves the cache when the Hub is down.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError

    def cached(filename: str) -> str | None:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
        return found if isinstance(found, str) else None

    config = cached(CONFIG_NAME)
    if config is not None:  # the repo is cached when its weights are too, not its config alone
        try:
            weights = INT8_FILES if is_quantized_config(_read_config(Path(config).parent)) else (WEIGHTS_NAME,)
        except WeightsError:
            weights = (WEIGHTS_NAME,)
        if all(cached(filename) for filename in weights):
            return
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, CONFIG_NAME, revision=revision), timeout=HUB_CONNECT_TIMEOUT)
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status is not None and status >= 500:  # huggingface_hub would retry these for ~24 s as well
            raise FCNZooError(f"{where}: the Hugging Face Hub answered {status}; try again later") from e
    except Exception as e:  # the HTTP client's connection and timeout errors: the Hub is not there
        if not is_connection_error(e):
            raise
        raise FCNZooError(
            f"{where}: the Hugging Face Hub cannot be reached ({first_line(e)}); "
            "check the network, or set HF_HUB_OFFLINE=1 to use only what is cached"
        ) from e


def _convert_local_pth(path: Path, cache_dir) -> Path:
    from .convert import convert_checkpoint

    sha256 = sha256_file(path)
    folder = cache_root(cache_dir) / "local" / f"{path.stem}-{sha256[:16]}"
    if _missing_files(folder):
        writable(folder.parent)
        with cache_lock(f"local-{folder.name}", cache_dir):  # other processes wait here, then find it
            if _missing_files(folder):
                try:
                    convert_checkpoint(path, folder, "reference", checkpoint=checkpoint_for_file(path),
                                       provenance={"source_file": str(path.resolve())})
                except WeightsError as e:  # loading takes no --output-stride: a converted folder records it
                    raise WeightsError(str(e).replace(
                        "pass --output-stride", f"convert it once, `fcn-zoo convert {path} --from reference "
                        "--output-stride 8 --out DIR` (or 16), and load DIR")) from e
    return folder


# --- helpers -------------------------------------------------------------------------------------


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _missing_files(folder: Path) -> list[str]:
    try:  # the config says which: a stray openvino_model.xml beside fp32 weights does not make them int8
        weights = INT8_FILES if is_quantized_config(_read_config(folder)) else (WEIGHTS_NAME,)
    except WeightsError:
        weights = (WEIGHTS_NAME,)
    return [f for f in (CONFIG_NAME, *weights) if not (folder / f).is_file()]


def _read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"{folder / CONFIG_NAME}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise WeightsError(f"{folder / CONFIG_NAME}: expected a JSON object, got {type(config).__name__}")
    return config
