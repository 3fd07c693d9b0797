"""Export a model for runtimes without fcn_zoo: ONNX (onnxruntime, TensorRT, OpenVINO, ...).

The exported graph is ``FCN.forward`` in eval mode: a normalised ``(N, 3, H, W)`` float image (RGB, mean
(123.675, 116.28, 103.53) and std (58.395, 57.12, 57.375) on 0..255 values) -> ``(N, C, H, W)`` logits,
with batch, height and width dynamic. Resizing to the evaluation size and the argmax stay with the caller.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["export", "FORMATS"]

FORMATS = {"onnx": ".onnx"}


def export(model, path: str | os.PathLike, fmt: str = "onnx", *, example_size: tuple[int, int] = (512, 512)) -> Path:
    """Write ``model`` to ``path`` in ``fmt`` (``onnx``); the file appears only when complete.

    A ``torch.export`` program is not offered: its serialiser cannot yet store the symbolic ``ceil`` that
    the backbone's shapes need (torch 2.14)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    path = Path(path)
    model = model.eval()
    x = torch.randn(2, 3, *example_size)  # batch 2: a batch of 1 would be specialised to a constant
    auto = torch.export.Dim.AUTO  # let export find the ranges (the dilated convolutions add guards)
    dims = {0: auto, 2: auto, 3: auto}
    tmp = path.with_name(f".{path.name}.partial")
    try:
        torch.onnx.export(
            model, (x,), str(tmp), dynamo=True, input_names=["image"], output_names=["logits"],
            dynamic_shapes={"x": dims}, verbose=False,
        )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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
