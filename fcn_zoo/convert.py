"""Other implementations' FCN checkpoints -> :class:`fcn_zoo.FCN` state dicts and configs.

Three layouts are understood:

- ``reference``: sssegmentation's ``{'model': state_dict}`` (``backbone_net.stem.*``, ``decoder.*``,
  ``auxiliary_decoder.*``), the twelve published rows;
- ``torchvision``: ``torchvision.models.segmentation.fcn_resnet50/101`` (plain 7x7 stem, one-conv head,
  256-channel auxiliary head);
- ``mmseg``: mmsegmentation's ``{'state_dict': ...}`` (``backbone.stem.*``, ``decode_head.convs.N.{conv,bn}``,
  ``decode_head.conv_cat``, ``decode_head.conv_seg``, ``auxiliary_head.*``).

Each is the same :class:`fcn_zoo.FCN` with another configuration; conversion renames keys and reads the
configuration from the tensors' shapes. Files are read with ``torch.load(weights_only=True)``, so no code
in a pickle can run.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ._files import sha256_file
from .errors import WeightsError, first_line
from .zoo import DATASETS

if TYPE_CHECKING:
    import torch

__all__ = ["FORMATS", "read_checkpoint", "convert_state_dict", "detect_format"]

FORMATS = ("reference", "torchvision", "mmseg")
#: what :func:`write_folder` writes
FOLDER_FILES = ("config.json", "model.safetensors", "provenance.json", "README.md")

# (old prefix, new prefix), first match wins
_PREFIXES = {
    "reference": (
        ("backbone_net.stem.7.", "backbone.bn1."),
        ("backbone_net.stem.", "backbone.conv1."),
        ("backbone_net.", "backbone."),
        ("decoder.", "decode_head."),
        ("auxiliary_decoder.", "auxiliary_head."),
    ),
    "torchvision": (
        ("backbone.", "backbone."),
        ("classifier.", "decode_head."),
        ("aux_classifier.", "auxiliary_head."),
    ),
    "mmseg": (
        ("backbone.stem.7.", "backbone.bn1."),
        ("backbone.stem.", "backbone.conv1."),
        ("backbone.", "backbone."),
        ("decode_head.", "decode_head."),
        ("auxiliary_head.", "auxiliary_head."),
    ),
}


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.pth`` of tensors safely; unwrap ``{'model': ...}`` / ``{'state_dict': ...}``.

    Raises:
        WeightsError: the file is missing, not a torch file, or holds more than tensors and plain data.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise WeightsError(
            f"{path}: not a checkpoint of plain tensors ({_refusal(e)}); it was not loaded, and no code in it ran"
        ) from e
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(
            f"{path}: expected a state dict of tensors (optionally under 'model'), got {type(obj).__name__}"
        )
    return obj


def _refusal(error: Exception) -> str:
    """The line of torch's error naming the type it refused (it comes below torch's advice), else the first."""
    for line in str(error).splitlines():
        if "Unsupported global" in line or "Unsupported operand" in line:
            return line.split("WeightsUnpickler error:", 1)[-1].strip().split(" was not an allowed global")[0]
    return f"{type(error).__name__}: {first_line(error)}"  # a bare KeyError(101) says nothing alone


def detect_format(state_dict: dict[str, torch.Tensor]) -> str:
    """Which of :data:`FORMATS` a state dict is in, from its key names."""
    keys = [k.removeprefix("module.") for k in state_dict]
    if any(k.startswith("backbone_net.") for k in keys):
        return "reference"
    if any(k.startswith("decode_head.conv_seg.") for k in keys):
        return "mmseg"
    if any(k.startswith("classifier.") for k in keys):
        return "torchvision"
    raise WeightsError("not an FCN checkpoint of a known layout (reference, torchvision or mmseg)")


def convert_state_dict(
    state_dict: dict[str, torch.Tensor], source: str, *, name: str = "", output_stride: int | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Convert a ``source``-layout state dict; returns ``(FCN config, FCN state dict)``.

    Args:
        source: one of :data:`FORMATS`.
        name: the checkpoint's file name; an ``os8``/``os16`` (reference) or ``d8``/``d16`` (mmseg) in it
            gives the output stride, which weights do not record (it is a dilation), and a ``_voc`` /
            ``_ade20k`` / ``_cityscapes`` suffix gives the dataset.
        output_stride: overrides what the name says.

    Raises:
        WeightsError: a key this layout does not have, or shapes that fit no FCN.
    """
    if source not in FORMATS:
        raise ValueError(f"unknown checkpoint layout {source!r}; use one of {', '.join(FORMATS)}")
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}  # saved from a DDP wrapper
    renamed, unknown = {}, []
    for key, value in state_dict.items():
        for old, new in _PREFIXES[source]:
            if key.startswith(old):
                renamed[new + key[len(old):]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        what = name or "checkpoint"
        try:
            layout = detect_format(state_dict)
        except WeightsError:
            layout = source
        hint = "" if layout == source else (
            f"; its keys look like the {layout} layout: "
            f"convert it with `fcn-zoo convert {what} --from {layout} --out DIR`"
        )
        keys = ", ".join(sorted(unknown)[:8])
        raise WeightsError(f"{what}: not a {source} FCN state dict: unknown keys {keys}{hint}")
    concat_input = source == "mmseg" and any(k.startswith("decode_head.conv_cat.") for k in renamed)
    if source == "mmseg":
        renamed = _mmseg_heads(renamed, concat_input)
    return _infer_config(renamed, source, name, output_stride, concat_input), renamed


def _mmseg_heads(sd: dict[str, torch.Tensor], concat_input: bool) -> dict[str, torch.Tensor]:
    """mmseg's ``convs.N.{conv,bn}`` / ``conv_cat`` / ``conv_seg`` -> FCNHead's Sequential indices."""
    out = {k: v for k, v in sd.items() if not k.startswith(("decode_head.", "auxiliary_head."))}
    for head in ("decode_head", "auxiliary_head"):
        keys = [k.removeprefix(f"{head}.") for k in sd if k.startswith(f"{head}.")]
        num_convs = len({m.group(1) for k in keys if (m := re.match(r"convs\.(\d+)\.", k))})
        # conv_cat is one more conv3x3-BN-ReLU after the convs, then come the dropout and the classifier
        with_cat = head == "decode_head" and concat_input
        for key in keys:
            rest = re.sub(r"^conv_cat\.", f"convs.{num_convs}.", key) if with_cat else key
            if m := re.match(r"convs\.(\d+)\.(conv|bn)\.(.+)", rest):
                out[f"{head}.{3 * int(m.group(1)) + (m.group(2) == 'bn')}.{m.group(3)}"] = sd[f"{head}.{key}"]
            elif rest.startswith("conv_seg."):
                classifier = 3 * (num_convs + with_cat) + 1
                out[f"{head}.{classifier}.{rest.removeprefix('conv_seg.')}"] = sd[f"{head}.{key}"]
            else:
                raise WeightsError(f"not an mmseg FCN head key: {head}.{key}")
    return out


def _infer_config(
    sd: dict[str, torch.Tensor], source: str, name: str, output_stride: int | None, concat_input: bool
) -> dict:
    """The :class:`fcn_zoo.FCN` keyword arguments that the tensors' shapes and the file's ``name`` describe."""
    what = name or "checkpoint"
    blocks = {m.group(1) for k in sd if (m := re.match(r"backbone\.layer3\.(\d+)\.", k))}
    depth = {6: 50, 23: 101, 36: 152}.get(len(blocks))
    if depth is None:
        raise WeightsError(f"{what}: layer3 has {len(blocks)} blocks, not a ResNet-50/101/152")
    if output_stride is None:
        output_stride = _output_stride_from_name(source, name)
    num_classes, num_convs, channels = _head_layout(sd, "decode_head", what)
    aux_channels = None
    if any(k.startswith("auxiliary_head.") for k in sd):
        _, aux_convs, aux_channels = _head_layout(sd, "auxiliary_head", what)
        if aux_convs != 1:
            raise WeightsError(f"{what}: the auxiliary head has {aux_convs} convs; FCN's has one")
    config = {
        "num_classes": num_classes,
        "backbone": f"resnet{depth}{'c' if 'backbone.conv1.0.weight' in sd else ''}",  # deep stem: V1c
        "output_stride": output_stride,
        "head_channels": channels,
        "num_convs": num_convs - concat_input,
        "concat_input": concat_input,
        "aux_channels": aux_channels,
    }
    parts = Path(name).stem.split("_")  # mmseg's names go on after the dataset: ..._cityscapes_20200604_192608-efe53f0d
    named = next((d for d in DATASETS if any(part.startswith(d) for part in parts)), None)  # also mmseg's voc12aug
    if named is not None and DATASETS[named].num_classes == num_classes:
        config["dataset"] = named
    elif source == "torchvision" and DATASETS["voc"].num_classes == num_classes:
        # VOC's 20 classes, but trained on a COCO subset (COCO_WITH_VOC_LABELS_V1): VOC's names, not its dataset
        config.update(DATASETS["voc"].metadata())
    return config


def _head_layout(sd: dict[str, torch.Tensor], head: str, what: str) -> tuple[int, int, int]:
    """``(num_classes, num_convs, channels)`` of an FCNHead's state dict; the classifier counts as a conv."""
    convs = sorted(
        int(m.group(1)) for k, v in sd.items() if (m := re.fullmatch(rf"{head}\.(\d+)\.weight", k)) and v.ndim == 4
    )
    if not convs:
        raise WeightsError(f"{what}: no {head} convolutions found")
    classifier = sd[f"{head}.{convs[-1]}.weight"]
    if classifier.shape[-2:] != (1, 1):
        raise WeightsError(f"{what}: {head}'s last convolution is not the 1x1 classifier")
    channels = sd[f"{head}.0.weight"].shape[0] if len(convs) > 1 else classifier.shape[1]
    return int(classifier.shape[0]), len(convs) - 1, int(channels)


def _output_stride_from_name(source: str, name: str) -> int:
    """The output stride a file's name gives (weights do not record a dilation); torchvision's is always 8."""
    if source == "torchvision":
        return 8
    pattern = r"os(8|16|32)(?!\d)" if source == "reference" else r"d(8|16|32)(?!\d)"
    if m := re.search(pattern, Path(name).stem):
        return int(m.group(1))
    example = "fcn_resnet50os8_voc.pth" if source == "reference" else "fcn_r50-d8_512x512_20k_voc12aug.pth"
    raise WeightsError(
        f"{name or 'checkpoint'}: the output stride is not stored in the weights; "
        f"name the file as its source does (e.g. {example}) or pass --output-stride"
    )


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    source: str = "reference",
    *,
    checkpoint=None,
    output_stride: int | None = None,
    parity: bool = False,
    provenance: dict | None = None,
) -> dict:
    """Convert the ``source``-layout file ``src`` into the ``save_pretrained`` folder ``out``.

    Every key is mapped and every shape checked against the :class:`fcn_zoo.FCN` the weights describe.
    With ``parity``, the source implementation (if importable) runs on the same input as the converted
    model and the figures go into ``provenance.json``. With ``checkpoint`` (a zoo row), the weights must be
    that row's architecture and the card is the row's. ``out`` appears complete or not at all.

    Returns:
        the provenance written to ``out/provenance.json``.
    """
    from . import __version__
    from .model import FCN
    from .parity import measure_parity, source_model
    from .weights import load_state_dict

    src = Path(src)
    original = read_checkpoint(src)
    name = src.name
    if checkpoint is not None:
        name = f"{checkpoint.name}.pth"
        output_stride = output_stride or checkpoint.output_stride
    config, state_dict = convert_state_dict(original, source, name=name, output_stride=output_stride)
    architecture = (config["backbone"], config["num_classes"])
    if checkpoint is not None and architecture != (checkpoint.backbone, checkpoint.num_classes):
        raise WeightsError(
            f"{src}: holds {config['backbone']} with {config['num_classes']} classes, but {checkpoint.name} "
            f"is {checkpoint.backbone} with {checkpoint.num_classes}; the file is not this checkpoint"
        )
    model = FCN(**config)
    load_state_dict(model, state_dict, source=str(src))  # strict: every key, every shape
    record = {
        "source_format": source, "source_sha256": sha256_file(src), **(provenance or {}),
        "converted_with": f"fcn-zoo {__version__}",
    }
    if parity:
        found = source_model(source, config, original)
        record["parity"] = None if found is None else {"implementation": found[1], **measure_parity(model, found[0])}
    return write_folder(model, Path(out), record, row=checkpoint)


def write_folder(model, folder: Path, provenance: dict, *, row=None, mean_iou: float | None = None,
                 eval_dataset: str | None = None, repo_id: str | None = None) -> dict:
    """``save_pretrained`` into ``folder`` with ``provenance.json`` (returned, ``weights_sha256`` added) and the
    model card (:func:`fcn_zoo.cards.model_card`'s arguments). Written beside ``folder`` and renamed, so it is
    never seen half-written; a concurrent writer that finished first wins."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}-") as tmp:
        staged = Path(tmp) / folder.name  # made by save_pretrained with the mode of any new folder
        model.save_pretrained(staged)
        provenance = {**provenance, "weights_sha256": sha256_file(staged / "model.safetensors")}
        (staged / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
        card = model.generate_model_card(
            row=row, provenance=provenance, mean_iou=mean_iou, eval_dataset=eval_dataset, repo_id=repo_id
        )
        (staged / "README.md").write_text(str(card), encoding="utf-8")
        try:
            os.replace(staged, folder)
        except OSError:
            if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
                return provenance  # a concurrent writer finished first
            if not folder.is_dir() or not {p.name for p in folder.iterdir()} <= set(FOLDER_FILES):
                raise
            # an incomplete copy of such a folder (a cache entry that lost its weights): replaced, and removed
            # with the staging folder
            os.replace(folder, Path(tmp) / "incomplete")
            os.replace(staged, folder)
    return provenance
