"""``fcn-zoo list`` and ``info``: the zoo's rows, and what a row or a save_pretrained folder is, as rows of text."""

from __future__ import annotations

from pathlib import Path

from . import list_models, zoo
from ._files import is_quantized_config
from .errors import FCNZooError

__all__ = ["describe", "listing"]


def listing(dataset: str | None = None, cache_dir=None) -> list[tuple[str, ...]]:
    """A header and a row per zoo model (of ``dataset``, if given): name, dataset, classes, mIoU, cached."""
    from .hub import is_cached

    rows = [("name", "dataset", "classes", "mIoU", "cached")]
    for c in map(zoo.get_checkpoint, list_models(dataset)):
        cached = "yes" if is_cached(c.name, cache_dir) else "no"
        rows.append((c.name, c.dataset, str(c.num_classes), f"{c.reference_miou:.2f}", cached))
    return rows


def describe(name: str, cache_dir=None) -> list[tuple[str, str]]:
    """``(field, value)`` pairs describing a zoo name or a save_pretrained folder, without importing torch."""
    from .downloads import reference_download_urls
    from .hub import cache_root, cached_folder, source_kind

    kind = source_kind(name)  # an unknown name is one line with suggestions
    if kind == "folder":
        return _folder_fields(Path(name).expanduser())
    if kind != "zoo":
        raise FCNZooError(f"{name}: fcn-zoo info describes zoo names and save_pretrained folders; make a folder "
                          "of it first (fcn-zoo download for a Hub repo, fcn-zoo convert for a .pth) and pass that")
    c = zoo.get_checkpoint(name)
    d = c.data
    h, w = d.typical_eval_shape
    miou = f"{c.miou:.2f} (reference, {d.val_split})"
    if c.miou_newest is not None:
        miou = f"{c.miou_newest:.2f} (reference's newest, {d.val_split}); {c.miou:.2f} in the seed table"
    cached = cached_folder(c.name, cache_dir)
    urls = reference_download_urls(c)
    return [
        ("name", c.name),
        ("model", c.title),
        ("backbone", f"{c.backbone} (timm), output stride {c.output_stride}"),
        ("dataset", f"{d.title} ({d.train_split}/{d.val_split}), {d.num_classes} classes"),
        ("crop size", f"{c.crop_size[0]}x{c.crop_size[1]}"),
        ("recipe", f"SGD lr {c.lr}, poly, batch {c.batch_size}, {c.epochs} epochs"),
        ("evaluation", f"whole image, single scale, resize keeping ratio to {d.eval_size[0]}x{d.eval_size[1]}"),
        ("mIoU", miou),
        ("parameters", f"{c.params_m:.2f} M at inference (the file also holds the training-only auxiliary head)"),
        ("compute", f"{c.gflops:.1f} GFLOPs per {w}x{h} image (a typical {d.title} image at its evaluation size)"),
        ("weights", f"{c.weights_mb:.1f} MB safetensors; the reference .pth also holds the optimizer state (~2x)"),
        ("cached", f"yes, {cached}" if cached else f"no (would be converted into {cache_root(cache_dir) / 'reference' / c.name})"),
        ("hub repo", f"{c.hub_repo_id}" + (f" @ {c.hub_revision}" if c.hub_revision else " (not published; reference weights are used)")),
        ("reference", f"{urls[0]} (or {urls[1].rsplit('/', 1)[1]}, its older name)"),
        ("classes", "; ".join(d.classes)),
    ]


def _folder_fields(folder: Path) -> list[tuple[str, str]]:
    """What a save_pretrained folder's ``config.json`` and ``model.safetensors`` say, read without torch."""
    import json
    import math

    from safetensors import safe_open

    from .hub import resolve

    resolve(folder)  # one line naming what the folder lacks
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FCNZooError(f"{config_path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise FCNZooError(f"{config_path}: expected a JSON object, got {type(config).__name__}")

    def get(key: str):
        return config.get(key, "not recorded")

    def size(key: str) -> str:
        return "x".join(map(str, config[key])) if isinstance(config.get(key), list) else "not recorded"

    quantization = config.get("quantization")
    if is_quantized_config(config):  # an int8 model: its OpenVINO network in place of the safetensors
        weights = folder / "openvino_model.bin"
        agreed = quantization.get("agreement", {})
        counted = (f"int8 (OpenVINO {quantization.get('openvino')}), calibrated on "
                   f"{quantization.get('calibration', {}).get('images')} images of {quantization.get('source')}; "
                   f"labels agree with fp32 on {100 * agreed.get('pixels', math.nan):.2f}% of pixels")
    else:
        weights = folder / "model.safetensors"
        buffers = ("running_mean", "running_var", "num_batches_tracked")
        try:
            with safe_open(weights, framework="numpy") as f:
                shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
        except Exception as e:  # safetensors' own error types
            raise FCNZooError(f"{weights}: not a readable safetensors file ({e})") from e
        inference = sum(math.prod(s) for k, s in shapes.items()
                        if not k.startswith("auxiliary_head.") and not k.endswith(buffers))
        counted = f"{inference / 1e6:.2f} M at inference"
    dataset = zoo.DATASETS.get(config.get("dataset"))
    classes = config.get("class_names") or []
    aux = config.get("aux_channels") if not is_quantized_config(config) else None  # int8: the inference network
    return [
        ("folder", str(folder)),
        ("backbone", f"{get('backbone')} (timm), output stride {get('output_stride')}"),
        ("head", f"FCN head, {get('num_convs')} conv3x3 of {get('head_channels')} channels"
                 + (f"; auxiliary head of {aux} channels (training only)" if aux else "; no auxiliary head")),
        ("dataset", f"{dataset.title if dataset else 'not recorded'}, {get('num_classes')} classes"),
        ("crop size", size("crop_size")),
        ("evaluation", f"whole image, single scale, resize keeping ratio to {size('eval_size')}"),
        ("normalisation", f"mean {get('mean')}, std {get('std')} (RGB values in 0..255)"),
        ("quantization" if is_quantized_config(config) else "parameters", counted),
        ("weights", f"{weights.name}, {weights.stat().st_size / 1e6:.1f} MB"),
        ("classes", "; ".join(map(str, classes)) or "not recorded"),
    ]
