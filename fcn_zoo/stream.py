"""Many images, one at a time: :func:`predict_iter` segments an iterable of images lazily, in input order,
reading, decoding, resizing and normalising the next images while the network runs on the current ones.

Reading is done by a few threads, not worker processes: decoding (PIL) and the tensor operations that
follow release the GIL, threads need no pickling of the inputs (PIL images, arrays, generators of
paths all work) and no copy of the process. They pay where cores would otherwise idle (GPU inference,
or torch given fewer threads than cores); on the CPU torch's threads use every core by default, so there
images are read in turn unless asked. At most ``prefetch`` images are read ahead, so memory does not
grow with the number of images.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .images import describe, load_image
from .predict import Predictor, prepare
from .segmentation import Segmentation

__all__ = ["predict_iter"]

logger = logging.getLogger(__name__)


def predict_iter(
    model, images: Iterable, *, num_workers: int | None = None, prefetch: int | None = None, errors: str = "raise",
    fuse: bool = True, confidence: bool = False, overlap: bool | None = None, **options,
) -> Iterator[tuple[object, Segmentation | Exception]]:
    """Segment ``images`` lazily: yields ``(image, Segmentation)`` in input order.

    Args:
        images: any iterable (a list, a generator, a dataset) of what :func:`fcn_zoo.predict.predict`
            takes: paths, PIL images, RGB arrays or tensors. It is consumed as the results are.
        num_workers: threads reading, decoding and resizing images ahead of the network; 0 reads each
            image when the network needs it. Default: 2 on GPUs; on the CPU, as many (up to 2) as there are
            cores that torch's threads leave idle, which is none by default: there the network uses every
            core, and readers would only take time from it (benchmarks/RESULTS.md: 2-7% slower on 2 cores).
        prefetch: how many images may be read ahead (default ``2 x max(num_workers, batch_size)``, or the
            batch size without workers).
        errors: ``"raise"`` stops at the first image that cannot be read or segmented; ``"yield"`` yields
            ``(image, exception)`` for it and goes on (what ``fcn-zoo predict`` does, to list failures).
        fuse: the stream owns a fused copy of the model (``model.fuse(inplace=False)``), made when
            ``predict_iter`` is called: faster (7-18% on CPU), and what the model becomes after that call
            (new weights, modes, layers) is not seen by this stream; ``False`` runs the model itself, in
            eval mode for each batch. A model you ``fuse()``d yourself, ``compile=True`` and
            ``engine="onnxruntime"`` make no copy.
        overlap: turn a batch's logits into labels on a thread of their own while the network runs the next
            batch (default: on GPUs, where the network's time is the device's and the host would otherwise
            idle; on the CPU both would share the same cores).
        confidence: compute each result's :attr:`~fcn_zoo.segmentation.Segmentation.confidence` with its
            labels, on the model's device (a GPU's time, not the host's), instead of when first asked for.
        **options: as :func:`fcn_zoo.predict.predict` (``tta``, ``mode``, ``batch_size``, ``device``,
            ``precision``, ``engine``, ``compile``...). Consecutive images of equal evaluation size share a
            forward pass, ``batch_size`` at a time.
    """
    if errors not in ("raise", "yield"):
        raise ValueError(f"errors must be 'raise' or 'yield', got {errors!r}")
    predictor = Predictor(model, fuse=fuse, confidence=confidence, **options)  # bad options fail here, before anything is read
    if num_workers is None:
        idle = (os.cpu_count() or 1) - torch.get_num_threads()
        num_workers = 2 if predictor.device.type != "cpu" else max(0, min(2, idle))
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    prefetch = prefetch or (2 * max(num_workers, predictor.batch_size) if num_workers else predictor.batch_size)
    if prefetch < predictor.batch_size:
        raise ValueError(f"prefetch ({prefetch}) must be at least the batch size ({predictor.batch_size})")
    overlap = predictor.device.type != "cpu" if overlap is None else overlap
    return _iterate(predictor, iter(images), num_workers, prefetch, errors, overlap)  # a generator: reads nothing yet


def _iterate(predictor: Predictor, source, num_workers: int, prefetch: int, errors: str, overlap: bool):
    batch_size = predictor.batch_size
    pool = ThreadPoolExecutor(num_workers, thread_name_prefix="fcn_zoo-read") if num_workers else _InPlace()
    post = ThreadPoolExecutor(1, thread_name_prefix="fcn_zoo-labels") if overlap else _InPlace()
    with pool, post:
        pending: deque = deque()  # (image, future of load_image) in input order
        in_flight: deque = deque()  # (batch, future of its Segmentations), in input order

        def settle(limit: int):
            """Yield the results of batches in flight, oldest first, until at most ``limit`` are left."""
            while len(in_flight) > limit or (in_flight and in_flight[0][1].done()):
                batch, future = in_flight.popleft()
                try:
                    segs = future.result()
                except Exception as e:
                    if errors == "raise":
                        raise
                    for image, _ in batch:
                        yield _failed(image, e, errors)
                    continue
                for (image, _), seg in zip(batch, segs):
                    yield image, seg

        pin = predictor.device.type == "cuda"  # page-locked: the copy to the GPU overlaps the work before it

        def read(image):
            loaded = load_image(image)
            with torch.inference_mode():
                prepared = prepare(predictor.model, *loaded)
                return loaded, prepared.pin_memory() if pin else prepared

        def fill() -> None:
            for image in itertools.islice(source, prefetch - len(pending)):
                pending.append((image, pool.submit(read, image)))

        try:
            fill()
            while pending:
                batch, shape = [], None
                while pending and len(batch) < batch_size:
                    image, future = pending[0]
                    try:
                        loaded = future.result()
                    except Exception as e:
                        if batch:
                            break  # segment what came before, in order, then report this one
                        pending.popleft()
                        fill()
                        yield from settle(0)
                        yield _failed(image, e, errors)
                        continue
                    if batch and loaded[1].shape != shape:  # a forward pass takes images of one size
                        break
                    shape = loaded[1].shape
                    batch.append((image, loaded))
                    pending.popleft()
                fill()
                if not batch:
                    continue
                loaded, names = [loaded for _, (loaded, _) in batch], [describe(image) for image, _ in batch]
                try:
                    logits = predictor.forward(loaded, names, [prepared for _, (_, prepared) in batch])
                except Exception as e:
                    if errors == "raise":
                        raise
                    yield from settle(0)
                    for image, _ in batch:
                        yield _failed(image, e, errors)
                    continue
                in_flight.append((batch, post.submit(predictor.finish, loaded, names, logits)))
                yield from settle(1 if overlap else 0)  # one batch's labels beside the next forward
            yield from settle(0)
        finally:
            for _, future in pending:
                future.cancel()


class _InPlace:
    """An executor without threads: ``submit`` runs the call at once (``num_workers=0``)."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as e:
            future.set_exception(e)
        return future

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def _failed(image, error: Exception, errors: str) -> tuple[object, Exception]:
    if errors == "raise":
        raise error
    return image, error
