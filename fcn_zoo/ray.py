"""Batches of images in, label maps out: one callable class for Ray Data's ``map_batches`` (inference beyond
one machine: streaming, retries, CPU and GPU stages), or any loop over dicts of arrays.

    import ray
    from fcn_zoo.ray import Segmenter

    ds = ray.data.read_binary_files("s3://bucket/photos", include_paths=True)  # fcn-zoo decodes the bytes
    ds = ds.map_batches(Segmenter, fn_constructor_kwargs={"model": "fcn_resnet50os16_voc"}, batch_size=8,
                        num_gpus=1, compute=ray.data.ActorPoolStrategy(size=4))  # 4 GPUs; CPUs: docs/python.md

Each actor loads the model once, on its device (its GPU where Ray gives it one, else the CPU). Nothing here
imports Ray: the class takes and returns plain dicts of NumPy arrays, the format of Ray Data batches.
"""

from __future__ import annotations

import numpy as np

from .errors import first_line
from .images import describe, read_image

__all__ = ["Segmenter"]

IMAGE_COLUMNS = ("image", "bytes", "path")  # read_images, read_binary_files, a table of paths


class Segmenter:
    """Segment the images of a batch: ``{"image": ...}`` in, ``{"labels": ..., "shares": ...}`` out.

    Args:
        model: a zoo name, Hub repo id, ``save_pretrained`` folder or reference ``.pth`` (loaded once, here), or
            an :class:`~fcn_zoo.FCN` (or its int8 version).
        column: the batch's image column (default: the first of ``image``, ``bytes``, ``path``). Its values
            may be RGB arrays ``(H, W, 3)`` (a stacked ``(N, H, W, 3)`` array too), encoded image bytes, paths,
            or Hugging Face ``Image`` cells (``{"bytes": ..., "path": ...}``).
        device: default the GPU where there is one (under Ray, the one the actor was given), else the CPU.
        confidence: also return ``confidence``: each pixel's largest class probability, float16 ``(H, W)``.
        fuse: run a fused copy of the model (BatchNorm folded into the convolutions), as ``predict_iter`` and
            ``fcn-zoo predict`` do: faster, float rounding only; ``False`` runs the model as it is.
        **options: as :func:`fcn_zoo.predict.predict` (``tta``, ``mode``, ``precision``, ``batch_size``...).

    The result keeps the batch's other columns (``path``...) and adds ``labels`` (a uint8 ``(H, W)`` label map
    per image, int32 beyond 256 classes), ``shares`` (per image, each class's share of its pixels, in the
    order of :attr:`class_names`) and ``error``. The image column is dropped (unless it is ``path``), so it is
    not carried further.

    A failure is its row's, never the batch's: ``error`` is ``""`` for a row segmented, else one line naming
    the image and what went wrong (unreadable, not an image, out of memory...); such a row's ``labels`` is an
    empty ``(0, 0)`` array of the labels' dtype, its ``shares`` zeros and its ``confidence`` an empty
    ``(0, 0)`` float16 array, and the other rows are segmented as usual. A forward pass that fails for a whole
    batch is retried one image at a time, so that only the images that fail alone are marked.
    """

    def __init__(self, model="fcn_resnet50os16_voc", *, column: str | None = None, device: str | None = None,
                 confidence: bool = False, fuse: bool = True, **options):
        import torch

        from .engine import Predictor

        loaded = not isinstance(model, torch.nn.Module)  # an FCN or its int8 version is used as it is
        if loaded:
            from .hub import from_pretrained

            model = from_pretrained(model, device=device)  # default the CPU: an int8 model runs there, GPU or not
        if device is None:
            device = "cuda" if torch.cuda.is_available() and not hasattr(model, "quantization") else "cpu"
        if loaded and not hasattr(model, "quantization"):
            model = model.to(device)  # its own: moved, not copied
        self.predictor = Predictor(model, fuse=fuse, confidence=confidence, device=device, **options)
        self.class_names = list(model.class_names)
        self.column = column
        self.confidence = confidence

    def __call__(self, batch: dict) -> dict:
        column = self.column or next((c for c in IMAGE_COLUMNS if c in batch), None)
        if column is None or column not in batch:
            raise KeyError(f"the batch has no image column {self.column or ' / '.join(IMAGE_COLUMNS)!r} "
                           f"(its columns: {', '.join(batch)}); pass Segmenter(column=...)")
        values = list(batch[column])
        if "path" in batch:  # what messages call each image
            names = [str(p) for p in batch["path"]]
        else:  # a path the cell holds, else the row
            names = [describe(v) if isinstance(v, str) or (isinstance(v, dict) and v.get("path")) else
                     f"row {i} of the batch" for i, v in enumerate(values)]
        rows = self.predictor.stream(range(len(values)), read=lambda i: read_image(_cell(values[i]), names[i]),
                                     name=names.__getitem__, errors="yield")
        segs, errors = [], []
        for i, result in rows:
            failed = isinstance(result, Exception)
            segs.append(None if failed else result)
            errors.append(_error_line(names[i], result) if failed else "")
        num_classes = len(self.class_names)
        no_labels = np.zeros((0, 0), dtype=np.uint8 if num_classes <= 256 else np.int32)  # a failed row's
        out = {k: v for k, v in batch.items() if k != column or k == "path"}  # paths stay: they name the rows
        out["labels"] = _column([no_labels if seg is None else seg.labels for seg in segs])
        out["shares"] = np.zeros((len(segs), num_classes), dtype=np.float32)
        for row, seg in zip(out["shares"], segs):
            if seg is not None:
                row[:] = np.bincount(seg.labels.ravel(), minlength=num_classes) / seg.labels.size
        if self.confidence:
            out["confidence"] = _column([np.zeros((0, 0), np.float16) if seg is None else seg.confidence.astype(np.float16)
                                         for seg in segs])
        out["error"] = np.array(errors, dtype=object)
        return out


def _error_line(name: str, error: Exception) -> str:
    """A row's error: one line that names its image."""
    message = first_line(error)
    return message if name in message else f"{name}: {message}"


def _cell(value):
    """A batch cell as :func:`fcn_zoo.images.read_image` takes it (Ray hands nested lists as object arrays)."""
    if isinstance(value, np.ndarray) and value.dtype == object:
        value = np.asarray(value.tolist())
        if value.dtype.kind in "iu" and value.size and 0 <= value.min() and value.max() <= 255:
            value = value.astype(np.uint8)  # pixel values that came through lists
    return value


def _column(arrays: list[np.ndarray]) -> np.ndarray:
    """One array per row: stacked where the shapes agree, else an object array (Ray's variable-shaped tensors)."""
    if len({a.shape for a in arrays}) == 1:
        return np.stack(arrays)
    column = np.empty(len(arrays), dtype=object)
    column[:] = arrays
    return column
