"""Export a model for runtimes without fcn_zoo: ONNX (onnxruntime, TensorRT, OpenVINO, ...).

The exported graph is ``FCN.forward`` in eval mode: a normalised ``(N, 3, H, W)`` float image (RGB, mean
(123.675, 116.28, 103.53) and std (58.395, 57.12, 57.375) on 0..255 values) -> ``(N, C, H, W)`` logits,
with batch, height and width dynamic. Resizing to the evaluation size and the argmax stay with the caller.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path

import torch

from ._files import atomic_path, cache_root, writable
from ._fusion import version_of
from .errors import first_line

__all__ = ["export", "onnx_session", "FORMATS"]

FORMATS = {"onnx": ".onnx"}
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
    model, path: str | os.PathLike, fmt: str = "onnx", *, example_size: tuple[int, int] = (512, 512), features: bool = False
) -> Path:
    """Write ``model`` to ``path`` in ``fmt`` (``onnx``); the file appears only when complete.

    ``features=True`` exports ``forward_features`` (logits at the backbone's resolution) instead.
    A ``torch.export`` program is not offered: its serialiser cannot yet store the symbolic ``ceil`` that
    the backbone's shapes need (torch 2.14)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    path = Path(path)
    model = model.eval()
    module = _Features(model).eval() if features else model
    x = torch.randn(2, 3, *example_size)  # batch 2: a batch of 1 would be specialised to a constant
    auto = torch.export.Dim.AUTO  # let export find the ranges (the dilated convolutions add guards)
    dims = {0: auto, 2: auto, 3: auto}
    with atomic_path(path) as tmp, _quiet():
        # external_data=False: one file that can be copied alone (the default writes the weights beside it,
        # named after the temporary name)
        torch.onnx.export(
            module, (x,), str(tmp), dynamo=True, input_names=["image"], output_names=["logits"],
            dynamic_shapes={"x": dims}, verbose=False, external_data=False,
        )
    return path


@contextlib.contextmanager
def _quiet():
    """The exporter narrates its passes and warns about internals a user cannot act on; only ``--debug``
    (the ``fcn_zoo`` logger at DEBUG) shows that. Levels are restored afterwards."""
    if logger.isEnabledFor(logging.DEBUG):
        yield
        return
    loggers = [logging.getLogger(name) for name in _EXPORTER_LOGGERS]
    levels = [log.level for log in loggers]
    try:
        for log in loggers:
            log.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def max_abs_difference(model, path: Path, fmt: str, size: tuple[int, int] = (256, 320)) -> float | None:
    """Max abs logit difference of the exported file and ``model`` on a seeded input; ``None`` if no runtime."""
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model.eval()(x)
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
    return float((got - expected).abs().max())


def onnx_session(model):
    """An onnxruntime session running ``model.forward_features`` on the CPU.

    The graph is exported once per set of weights and kept in the fcn_zoo cache (``onnx/<sha256>.onnx``);
    the session is kept on the model until its weights change. An entry onnxruntime cannot load (cut short,
    or an older entry whose separate weights file is gone) is exported again rather than failing the predict.
    """
    import hashlib
    import json

    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError("engine='onnxruntime' needs onnxruntime: pip install 'fcn-zoo[export]'") from e

    state = model.state_dict()
    version = sum(version_of(t) for t in state.values())
    cached = getattr(model, "_onnx_session", None)
    if cached is not None and cached[0] == version:
        return cached[1]
    digest = hashlib.sha256(json.dumps(getattr(model, "_hub_mixin_config", None) or {}, sort_keys=True).encode())
    digest.update(b"fused" if getattr(model, "_fused", False) else b"plain")
    for key, tensor in state.items():
        digest.update(key.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    path = cache_root() / "onnx" / f"{digest.hexdigest()[:32]}.onnx"
    session = None
    if path.is_file():
        try:
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's errors derive from Exception only
            logger.info("%s cannot be loaded (%s); exporting it again", path, first_line(e))
            for stale in [path, *path.parent.glob(f".{path.name}.*.data")]:  # older entries kept weights beside
                stale.unlink(missing_ok=True)
    if session is None:
        writable(path.parent)
        export(model.to("cpu"), path, features=True)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model._onnx_session = (version, session)
    return session
