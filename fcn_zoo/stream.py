"""Many images, one at a time: :func:`predict_iter` segments an iterable of images lazily, in input order,
reading, decoding, resizing and normalising the next images while the network runs on the current ones.

Reading is done by a few threads, not worker processes: decoding (PIL) and the tensor operations that
follow release the GIL, threads need no pickling of the inputs (PIL images, arrays, generators of
paths all work) and no copy of the process, and on the CPU the network keeps the cores it was given.
At most ``prefetch`` images are read ahead, so memory does not grow with the number of images.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from .images import describe, load_image
from .predict import Predictor, prepare
from .segmentation import Segmentation

__all__ = ["predict_iter"]

logger = logging.getLogger(__name__)


def predict_iter(
    model, images: Iterable, *, num_workers: int = 2, prefetch: int | None = None, errors: str = "raise", **options
) -> Iterator[tuple[object, Segmentation | Exception]]:
    """Segment ``images`` lazily: yields ``(image, Segmentation)`` in input order.

    Args:
        images: any iterable (a list, a generator, a dataset) of what :func:`fcn_zoo.predict.predict`
            takes: paths, PIL images, RGB arrays or tensors. It is consumed as the results are.
        num_workers: threads reading and decoding images ahead of the network.
        prefetch: how many images may be read ahead (default ``2 x max(num_workers, batch_size)``).
        errors: ``"raise"`` stops at the first image that cannot be read or segmented; ``"yield"`` yields
            ``(image, exception)`` for it and goes on (what ``fcn-zoo predict`` does, to list failures).
        **options: as :func:`fcn_zoo.predict.predict` (``tta``, ``mode``, ``batch_size``, ``device``,
            ``precision``, ``engine``, ``compile``...). Consecutive images of equal evaluation size share a
            forward pass, ``batch_size`` at a time.
    """
    if errors not in ("raise", "yield"):
        raise ValueError(f"errors must be 'raise' or 'yield', got {errors!r}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    predictor = Predictor(model, **options)  # bad options fail here, before anything is read
    prefetch = prefetch or 2 * max(num_workers, predictor.batch_size)
    if prefetch < predictor.batch_size:
        raise ValueError(f"prefetch ({prefetch}) must be at least the batch size ({predictor.batch_size})")
    return _iterate(predictor, iter(images), num_workers, prefetch, errors)


def _iterate(predictor: Predictor, source, num_workers: int, prefetch: int, errors: str):
    batch_size = predictor.batch_size
    with ThreadPoolExecutor(num_workers, thread_name_prefix="fcn_zoo-read") as pool:
        pending: deque = deque()  # (image, future of load_image) in input order

        def read(image):
            loaded = load_image(image)
            with torch.inference_mode():
                return loaded, prepare(predictor.model, *loaded)

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
                try:
                    segs = predictor(
                        [loaded for _, (loaded, _) in batch], [describe(image) for image, _ in batch],
                        [prepared for _, (_, prepared) in batch],
                    )
                except Exception as e:
                    if errors == "raise":
                        raise
                    for image, _ in batch:
                        yield _failed(image, e, errors)
                    continue
                for (image, _), seg in zip(batch, segs):
                    yield image, seg
        finally:
            for _, future in pending:
                future.cancel()


def _failed(image, error: Exception, errors: str) -> tuple[object, Exception]:
    if errors == "raise":
        raise error
    return image, error
