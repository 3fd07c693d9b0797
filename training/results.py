"""What a training run leaves: ``last/`` and ``best/`` folders with their cards, ``curves.png``, the upload of
``best/`` and the run's last line."""

from __future__ import annotations

import os
from pathlib import Path

from fcn_zoo.convert import write_folder

from .plan import Plan

__all__ = ["export_folder", "plot_curves", "push_best", "final_line"]


def export_folder(model, plan: Plan, results: dict, meta: dict, folder: Path, repo_id: str | None = None) -> None:
    """The model as a ``save_pretrained`` folder (``best/`` or ``last/``) whose card carries the measured mIoU,
    the per-class IoU and the run (for fine-tuning: the init source and the data)."""
    import shutil

    run = evaluated_run(meta, plan.val_set)
    provenance = {
        "run": run,
        "measured_miou": round(100 * results["mIoU"], 2),
        "per_class_iou": {n: None if v != v else round(100 * v, 2) for n, v in zip(plan.val_set.class_names, results["IoU"])},
    }
    fresh = folder.with_name(f"{folder.name}.new")
    shutil.rmtree(fresh, ignore_errors=True)
    write_folder(model, fresh, provenance, row=plan.row, mean_iou=provenance["measured_miou"],
                 eval_dataset=None if plan.row else plan.meta["data"]["name"], repo_id=repo_id)
    old = folder.with_name(f"{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)  # left by a run killed between the renames: its folder is complete
    if folder.exists():
        os.replace(folder, old)
    os.replace(fresh, folder)  # between the two renames best.old holds the previous best
    shutil.rmtree(old, ignore_errors=True)


def evaluated_run(meta: dict, val_set) -> dict:
    """What provenance.json says of the run, the val samples its evaluations scored among it: with
    ``--eval-max-samples`` the first ``eval_samples`` of them, whose count and sha256 are the data's
    ``val_images`` and ``val_sha256`` (what the card prints); the whole val split's stay in ``val_images_all``
    and ``val_sha256_all``."""
    count = meta.get("eval_samples", len(val_set))
    run = {**meta, "val_samples_sha256": val_set.fingerprint(count)}
    if count < len(val_set) and isinstance(meta.get("data"), dict):
        data = meta["data"]
        run["data"] = {**data, "val_images": count, "val_images_all": data.get("val_images", len(val_set)),
                       "val_sha256": run["val_samples_sha256"], "val_sha256_all": data.get("val_sha256")}
    return run


def plot_curves(history: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    if history["loss"]:  # with few points each one is marked: a single point is visible, not an empty panel
        a.plot(*zip(*history["loss"]), marker="o" if len(history["loss"]) < 50 else None)
    a.set_xlabel("iteration")
    a.set_ylabel("loss")
    if history["miou"]:
        b.plot(*zip(*[(i, 100 * m) for i, m in history["miou"]]), marker="o")
    b.set_xlabel("iteration")
    b.set_ylabel("val mIoU (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def push_best(folder: Path, repo_id: str, prog: str = "python -m training.train") -> None:
    """One commit of ``best/`` to the Hub repo ``repo_id`` (created if needed); its URL on stdout."""
    from fcn_zoo.errors import FCNZooError
    from fcn_zoo.publish import upload

    try:
        commit = upload(folder, repo_id, sorted(p.name for p in folder.iterdir() if p.is_file()), None,
                        f"Upload {folder} (fcn-zoo training)", rerun="rerun the command with --resume to upload it (nothing is trained again)")
    except FCNZooError as e:
        raise SystemExit(f"{prog}: {e}") from e
    print(f"uploaded {folder} to https://huggingface.co/{repo_id} (commit {getattr(commit, 'oid', commit)})")


def final_line(state: dict, out: Path) -> str:
    """The run's last line: the final and the best mIoU, and where ``last/`` and ``best/`` are."""
    scores = state["history"]["miou"]
    if not scores:
        return f"{state['iteration']} iterations; no evaluation ran; checkpoints in {out}"
    final_iter, final = scores[-1]
    best_iter, best = max(scores, key=lambda s: s[1])
    return (f"{state['iteration']} iterations: final mIoU {100 * final:.2f} (iteration {final_iter}), best "
            f"{100 * best:.2f} (iteration {best_iter}); {out / 'last'}, {out / 'best'}")
