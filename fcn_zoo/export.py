"""Export a model for runtimes without fcn_zoo: ONNX (onnxruntime, TensorRT, OpenVINO, ...).

The exported graph is ``FCN.forward`` in eval mode: a normalised ``(N, 3, H, W)`` float image ``image`` (RGB,
``(x - mean) / std`` on 0..255 values) -> ``(N, C, H, W)`` logits ``logits``, with the axes ``batch``,
``height`` and ``width`` dynamic and named. Resizing to the evaluation size and the argmax stay with the
caller; what they need is in the file's metadata (``metadata_props``, which onnxruntime reads as
``session.get_modelmeta().custom_metadata_map``): ``class_names`` and ``palette`` (JSON lists), ``mean``,
``std``, ``eval_size`` (long, short) and ``crop_size`` (JSON), ``num_classes``, ``output`` (``logits`` at
the input's size, or ``features`` at the backbone's), ``source`` (the model as named), ``state_dict_sha256``
and ``fcn_zoo_version``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
from pathlib import Path

import torch

from . import __version__
from ._files import atomic_path, cache_lock, cache_root, is_quantized_config, writable
from ._inference import device_of, evaluating, inference_copy
from .console import quiet_loggers
from .errors import FCNZooError, first_line
from .parity import measure_parity
from .weights import state_dict_sha256

__all__ = ["export", "metadata", "onnx_session", "FORMATS"]

FORMATS = {"onnx": ".onnx"}
# torch.onnx.export has taken dynamo=True, dynamic_shapes and external_data since torch 2.5, and names in
# dynamic_shapes ({0: "batch"}) since torch 2.7; the package's own floor is lower (pyproject.toml)
EXPORT_TORCH = "2.7"
logger = logging.getLogger(__name__)
# The exporter's own loggers: torch's print to stderr through their own handlers, onnxscript's and onnx_ir's
# log every optimisation pass at INFO through the root logger.
_EXPORTER_LOGGERS = (
    "torch.onnx", "torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes", "onnxscript", "onnx_ir",
)


class _Features(torch.nn.Module):
    """``model.forward_features`` as a module's forward, for export."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_features(x)


def export(
    model, path: str | os.PathLike, fmt: str = "onnx", *, example_size: tuple[int, int] = (512, 512),
    features: bool = False, source: str | None = None,
) -> Path:
    """Write ``model`` to ``path`` in ``fmt`` (``onnx``), with the metadata of the module docstring; the file
    appears only when complete.

    ``features=True`` exports ``forward_features`` (logits at the backbone's resolution) instead. ``source``:
    how the model was named (a zoo name, repo id or folder), recorded in the metadata. The model is exported
    in eval mode and left in the modes it had. A ``torch.export`` program is not offered: its serialiser
    cannot yet store the symbolic ``ceil`` that the backbone's shapes need (torch 2.14)."""
    if is_quantized_config(getattr(model, "config", {})):
        raise FCNZooError("an int8 model is an OpenVINO network already (openvino_model.xml in its folder, which "
                          "OpenVINO runs); export the fp32 model it was made from")
    if torch.torch_version.TorchVersion(torch.__version__) < EXPORT_TORCH:
        raise FCNZooError(f"ONNX export needs torch>={EXPORT_TORCH} (this is torch {torch.__version__}): "
                          f"pip install 'torch>={EXPORT_TORCH}'")
    import onnx

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    path = Path(path)
    if not path.parent.is_dir():
        raise FCNZooError(f"{path}: the folder {path.parent} does not exist; create it or name another file")
    if path.is_dir():
        raise FCNZooError(f"{path}: is a folder; pass a file name")
    module = _Features(model) if features else model
    x = torch.randn(2, 3, *example_size, device=device_of(model))  # batch 2: 1 would be a constant
    # named axes: export finds their ranges itself (the dilated convolutions add guards)
    dims = {0: "batch", 2: "height", 3: "width"}
    with atomic_path(path) as tmp, _quiet(), evaluating(module):
        # external_data=False: one file that can be copied alone (the default writes the weights beside it,
        # named after the temporary name)
        torch.onnx.export(
            module, (x,), str(tmp), dynamo=True, input_names=["image"], output_names=["logits"],
            dynamic_shapes={"x": dims}, verbose=False, external_data=False,
        )
        proto = onnx.load(str(tmp))
        onnx.helper.set_model_props(proto, metadata(model, features=features, source=source))
        onnx.save(proto, str(tmp))
    return path


def metadata(model, *, features: bool = False, source: str | None = None) -> dict[str, str]:
    """What a user of the exported file needs beside the graph, as ``metadata_props`` strings."""
    return {
        "class_names": json.dumps(list(model.class_names)),
        "palette": json.dumps([list(c) for c in model.palette]),
        "mean": json.dumps(list(model.mean)), "std": json.dumps(list(model.std)),
        "eval_size": json.dumps(list(model.eval_size)), "crop_size": json.dumps(list(model.crop_size)),
        "num_classes": str(model.num_classes),
        "output": "features" if features else "logits",
        "source": source or "",
        "state_dict_sha256": state_dict_sha256(model),
        "fcn_zoo_version": __version__,
    }


@contextlib.contextmanager
def _quiet():
    """The exporter narrates its passes and warns about internals a user cannot act on; only ``--debug``
    (the ``fcn_zoo`` logger at DEBUG) shows that. Levels are restored afterwards."""
    if logger.isEnabledFor(logging.DEBUG):
        yield
        return
    with quiet_loggers(*_EXPORTER_LOGGERS), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def max_abs_difference(model, path: Path, fmt: str) -> float | None:
    """Max abs logit difference of the exported file and ``model`` on a seeded input; ``None`` if no runtime."""
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def exported(x):
        return torch.from_numpy(session.run(None, {"image": x.numpy()})[0])

    return measure_parity(model, exported)["max_abs_diff"]


def onnx_session(model, cache_dir: str | os.PathLike | None = None):
    """An onnxruntime session running ``model.forward_features`` on the CPU.

    The graph is exported once per model and kept in the fcn_zoo cache (``cache_dir``, ``$FCN_ZOO_CACHE`` or
    ``~/.cache/fcn_zoo``: ``onnx/<key>.onnx``), keyed on what it holds: the weights' content
    (:func:`fcn_zoo.weights.state_dict_sha256`), the configuration and the module's layers as ``repr`` shows
    them. The session is kept on the model under the same key, so a model whose weights or layers changed
    in any way gets a session of its own. An entry onnxruntime cannot load (cut short, or an older entry
    whose separate weights file is gone) is exported again rather than failing the predict.
    """
    try:
        import onnxruntime
    except ImportError as e:
        raise FCNZooError("engine='onnxruntime' needs onnxruntime: pip install 'fcn-zoo[export]'") from e

    digest = hashlib.sha256(json.dumps(getattr(model, "_hub_mixin_config", None) or {}, sort_keys=True).encode())
    digest.update(repr(model).encode())  # the layers and their settings (eps, padding, dilation, swapped layers)
    digest.update(b"fused" if getattr(model, "_fused", False) else b"plain")
    digest.update(state_dict_sha256(model).encode())
    key = digest.hexdigest()[:32]
    cached = model.__dict__.get("_onnx_session")
    if cached is not None and cached[0] == key:
        return cached[1]
    path = cache_root(cache_dir) / "onnx" / f"{key}.onnx"
    session = _cached_session(onnxruntime, path)
    if session is None:
        writable(path.parent)
        with cache_lock(f"onnx-{key}", cache_dir):  # one export of a graph: other threads and processes wait here
            session = _cached_session(onnxruntime, path)  # what one of them exported meanwhile
            if session is None:
                on_cpu = model if device_of(model).type == "cpu" else inference_copy(model, "cpu")
                export(on_cpu, path, features=True)
                session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model.__dict__["_onnx_session"] = (key, session)
    return session


def _cached_session(onnxruntime, path: Path):
    """A session of the cached graph at ``path``; ``None`` where there is none, or one onnxruntime cannot load
    (cut short, or an older entry whose separate weights file is gone), which is removed."""
    if not path.is_file():
        return None
    try:
        return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's errors derive from Exception only
        logger.info("%s cannot be loaded (%s); exporting it again", path, first_line(e))
        for stale in [path, *path.parent.glob(f".{path.name}.*.data")]:  # older entries kept weights beside
            stale.unlink(missing_ok=True)
        return None
