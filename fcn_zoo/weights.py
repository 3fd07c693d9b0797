"""A state dict into an :class:`fcn_zoo.FCN`: strict, with errors that name the keys, shapes and dtypes that
do not fit, and the classifiers left freshly initialised when fine-tuning asks for another class count."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import WeightsError

if TYPE_CHECKING:
    import torch

    from .model import FCN

__all__ = ["load_weights", "load_state_dict", "state_dict_sha256"]

logger = logging.getLogger(__name__)


def load_weights(
    model: FCN, path: str | Path, *, strict: bool = True, map_location: str = "cpu", new_classes: bool = False
) -> FCN:
    """Load a ``model.safetensors`` into ``model``.

    Every key must match in name, shape and kind of dtype, except that with ``new_classes`` the two
    classifier convolutions keep their fresh initialisation when the file has another number of classes
    (fine-tuning). Anything else that does not match raises :class:`WeightsError` naming the keys.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    try:
        state_dict = load_file(path, device=str(map_location))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e}); delete it and download it again") from e
    load_state_dict(model, state_dict, source=str(path), strict=strict, new_classes=new_classes)
    return model


def load_state_dict(
    model: FCN, state_dict: dict[str, torch.Tensor], *, source: str, strict: bool = True, new_classes: bool = False
) -> None:
    """``model.load_state_dict`` with errors that name the keys, and classifier re-initialisation.

    With ``new_classes`` (the caller asked for another ``num_classes``), the classifiers are skipped and
    logged when their shapes differ from ``state_dict``'s only in the number of classes; otherwise that is
    an error like any other shape. Floating-point tensors may be stored in any float precision (they are
    cast); a float parameter stored as integers, or the reverse, is an error. Without ``strict``, the tensors
    the file lacks are freshly initialised (and named in a warning); every other one is the file's.
    """
    import torch

    expected = model.state_dict()
    classifier_keys = {
        f"{head}.{len(getattr(model, head)) - 1}.{p}"
        for head in ("decode_head", "auxiliary_head")
        if getattr(model, head) is not None
        for p in ("weight", "bias")
    }
    reinit = sorted(
        k for k in classifier_keys
        if new_classes and k in state_dict
        and state_dict[k].shape[0] != expected[k].shape[0] and state_dict[k].shape[1:] == expected[k].shape[1:]
    )
    missing = sorted(set(expected) - set(state_dict))
    shared = sorted(set(expected) & set(state_dict))
    problems = {
        "missing keys": missing if strict else [],
        "unexpected keys": sorted(set(state_dict) - set(expected)) if strict else [],
        "wrong shapes": [
            f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in shared
            if k not in reinit and state_dict[k].shape != expected[k].shape
        ],
        "wrong dtypes": [
            f"{k}: {state_dict[k].dtype} for {expected[k].dtype}"
            for k in shared
            if state_dict[k].is_floating_point() != expected[k].is_floating_point() or state_dict[k].is_complex()
        ],
    }
    if any(problems.values()):
        found = "; ".join(f"{what} {_short(keys)}" for what, keys in problems.items() if keys)
        raise WeightsError(f"{source}: does not fit FCN({_describe(model)}): {found}")
    if reinit:
        logger.warning(
            "%s has %d classes; the model has %d: the classifiers (%s) are freshly initialised for fine-tuning",
            source, state_dict[reinit[0]].shape[0], model.num_classes, ", ".join(reinit),
        )
    if missing:  # only without strict: those tensors keep a fresh initialisation
        logger.warning("%s lacks %d tensor(s) of the model, freshly initialised: %s", source, len(missing), _short(missing))
    kept = {k: v for k, v in state_dict.items() if k not in reinit}
    if not any(t.is_meta for t in expected.values()):
        model.load_state_dict(kept, strict=False)
        return
    # built on the meta device (FCN.from_pretrained): the file's tensors become the weights, nothing is
    # initialised only to be overwritten; what the file does not give is initialised as a fresh module is
    kept = {k: v.to(expected[k].dtype) if k in expected and v.is_floating_point() else v for k, v in kept.items()}
    model.load_state_dict(kept, strict=False, assign=True)
    device = next((t.device for t in kept.values()), "cpu")
    for module in model.modules():
        if any(t.is_meta for _, t in _own_tensors(module)):
            # reset_parameters initialises the whole module: the tensors the file gave it are put back after
            loaded = {name: t.detach() for name, t in _own_tensors(module) if not t.is_meta}  # to_empty swaps .data
            module.to_empty(device=device, recurse=False)
            module.reset_parameters()
            with torch.no_grad():
                for name, tensor in _own_tensors(module):
                    if name in loaded:
                        tensor.copy_(loaded[name])


def _own_tensors(module):
    return [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]


def _describe(model: FCN) -> str:
    cfg = getattr(model, "_hub_mixin_config", None) or {}
    return ", ".join(f"{k}={cfg[k]!r}" for k in ("backbone", "output_stride", "num_classes") if k in cfg)


def _short(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


def state_dict_sha256(model: torch.nn.Module) -> str:
    """Hex sha256 of ``model.state_dict()``: every tensor's name, dtype, shape and bytes, in order. It changes
    whenever a weight does, however it was changed (``load_state_dict``, in place, ``.data``, NumPy). Not the
    sha256 of a ``model.safetensors`` file (``weights_sha256`` in provenance), which also hashes its header.
    An int8 model, whose weights are OpenVINO's, gives the digest of its network (``QuantizedFCN.weights_sha256``)."""
    import torch

    if isinstance(getattr(model, "weights_sha256", None), str):
        return model.weights_sha256
    digest = hashlib.sha256()
    with torch.inference_mode(False), torch.no_grad():
        for key, tensor in model.state_dict().items():
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            digest.update(f"{key}:{flat.dtype}:{tuple(tensor.shape)};".encode())
            digest.update(flat.view(torch.uint8).numpy() if flat.numel() else b"")
    return digest.hexdigest()
