"""Maintainers' path from a reference ``.pth`` to a pinned Hugging Face Hub repo.

``publish(name)``: download the reference file (``FCN_ZOO_REFERENCE_URL`` applies, hashes are checked),
convert it, measure parity with the reference implementation, reload the folder and compare, write the
model card, and upload the folder in one commit. The commit hash is what the table pins.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ._files import sha256_file, write_json
from .errors import FCNZooError, WeightsError, first_line, is_connection_error
from .zoo import CHECKPOINTS, Checkpoint

__all__ = ["publish", "PARITY_MAX_ABS_DIFF", "PARITY_MIN_LABEL_AGREEMENT"]

#: Conversions that differ more from the reference than this are not published.
PARITY_MAX_ABS_DIFF = 1e-3
PARITY_MIN_LABEL_AGREEMENT = 0.999
STATE_NAME = "published.json"


def publish(
    name: str,
    out: str | Path,
    *,
    repo_id: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
    log=print,
) -> dict:
    """Convert, verify and (unless ``dry_run``) upload one zoo row; returns its entry in ``out/published.json``.

    The work folder ``out/<name>`` holds exactly what is uploaded: ``config.json``, ``model.safetensors``,
    ``provenance.json`` and ``README.md``; it is built in ``out/.<name>.staging`` and renamed only once verified,
    so a present folder is a verified one. A row already done (uploaded, or built for a dry run) is skipped,
    so ``publish all`` resumes where it stopped.
    """
    from .convert import convert_checkpoint
    from .downloads import download_reference, record_hash

    checkpoint = CHECKPOINTS[name]
    repo_id = repo_id or checkpoint.hub_repo_id
    out = Path(out)
    folder = out / name
    state_path = out / STATE_NAME
    try:
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    except ValueError as e:
        raise FCNZooError(f"{state_path}: not valid JSON ({e}); fix or delete it") from e
    done = state.get(name, {})
    staging = out / f".{name}.staging"  # the download and the unverified folder; a killed run's are removed here
    shutil.rmtree(staging, ignore_errors=True)
    if done.get("commit") and done.get("repo_id") == repo_id:
        log(f"{name}: already published as {repo_id}@{done['commit']}")
        return done
    if not (folder / "README.md").is_file():
        try:
            pth, url, sha256 = download_reference(checkpoint, staging)
            provenance = convert_checkpoint(
                pth, staging / name, "reference", checkpoint=checkpoint, parity=True, provenance={"source_url": url}
            )
            _verify(checkpoint, staging / name, pth, provenance)
            record_hash(checkpoint, sha256)
            shutil.rmtree(folder, ignore_errors=True)  # without README.md: not one this function verified
            (staging / name).rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    provenance = json.loads((folder / "provenance.json").read_text())
    if sha256_file(folder / "model.safetensors") != provenance["weights_sha256"]:
        raise WeightsError(f"{folder}: model.safetensors changed since it was verified; delete the folder and rerun")
    entry = {"repo_id": repo_id, **{key: provenance[key] for key in ("source_sha256", "weights_sha256", "parity")}}
    files = sorted(p.name for p in folder.iterdir())
    if dry_run:
        log(f"{name}: dry run, would upload to {repo_id}:")
        for f in files:
            log(f"  {f} ({(folder / f).stat().st_size:,} bytes)")
    else:
        source_file = provenance.get("source_url", checkpoint.reference_url).rsplit("/", 1)[-1]
        commit = upload(folder, repo_id, files, token, f"{checkpoint.title}, converted from {source_file}")
        entry["commit"] = commit.oid
        log(f"{name}: published {repo_id}@{commit.oid}; pin it in fcn_zoo/zoo.py: hub_revision=\"{commit.oid}\"")
    state[name] = entry
    write_json(out / STATE_NAME, state)
    return entry


def upload(folder: Path, repo_id: str, files: list[str], token: str | None, message: str, rerun: str = "rerun to upload it"):
    """One commit of ``files`` to ``repo_id``; the Hub's errors and unreachable networks become one line, which ends
    with ``rerun``: how to upload the folder later."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api = HfApi(token=token)
        api.create_repo(repo_id, exist_ok=True, repo_type="model")
        return api.upload_folder(folder_path=folder, repo_id=repo_id, allow_patterns=files, commit_message=message)
    except HfHubHTTPError as e:
        raise FCNZooError(
            f"{repo_id}: the Hugging Face Hub refused the upload ({first_line(e)}); "
            "check the token (hf auth login) and the repo id"
        ) from e
    except Exception as e:
        if not is_connection_error(e):
            raise
        raise FCNZooError(
            f"{repo_id}: the Hugging Face Hub cannot be reached ({first_line(e)}); "
            f"the folder {folder} is built and verified: {rerun}"
        ) from e


def _verify(checkpoint: Checkpoint, folder: Path, pth: Path, provenance: dict) -> None:
    """The conversion is within the parity thresholds, and the folder, loaded the way users load it, gives the
    reference's logits exactly as the converted model did."""
    from .convert import read_checkpoint
    from .hub import from_pretrained
    from .parity import measure_parity, source_model

    parity = provenance.get("parity")
    if parity is None:
        raise FCNZooError(
            f"{checkpoint.name}: parity with the reference implementation could not be measured because "
            "sssegmentation is not importable; install the test extra (pip install -e '.[test]') and retry"
        )
    if parity["max_abs_diff"] > PARITY_MAX_ABS_DIFF or parity["label_agreement"] < PARITY_MIN_LABEL_AGREEMENT:
        raise WeightsError(
            f"{checkpoint.name}: the converted model differs from the reference (max abs logit difference "
            f"{parity['max_abs_diff']:.2e}, label agreement {parity['label_agreement']:.4f}); not published"
        )
    run, _ = source_model("reference", json.loads((folder / "config.json").read_text()), read_checkpoint(pth))
    again = measure_parity(from_pretrained(folder), run, size=tuple(parity["input_shape"][-2:]))
    if any(again[key] != parity[key] for key in ("max_abs_diff", "label_agreement")):
        raise WeightsError(f"{folder}: the saved weights do not reproduce the verified logits; not published")
