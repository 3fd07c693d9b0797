"""The one engine under every door: items in, ``(item, Segmentation or error)`` out, in input order.

A :class:`Predictor` checks the options once and chooses the network to run (the caller's model, or a copy
it owns: fused, on another device, compiled, or an onnxruntime session). :meth:`Predictor.stream` then reads
items ahead on threads (:func:`~fcn_zoo.images.read_image`, resize, normalise), batches consecutive images of
one evaluation size, runs the network and turns logits into labels (beside the next forward on GPUs).
``predict``, ``predict_iter``, videos, the Ray ``Segmenter``, ``fcn-zoo predict``, ``evaluate`` and the demo
are thin loops over it: each adds only where its items come from and where the results go.

A failure belongs to its item: an image that cannot be read, or whose forward pass fails (a batch that fails
is retried one image at a time), is yielded as ``(item, exception)`` and the stream goes on; only
``errors="raise"`` stops at it. Reading is done by threads, not processes: decoding and the tensor work
release the GIL, and nothing needs pickling. At most ``prefetch`` items are read ahead.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ._inference import evaluating, inference_copy
from .errors import ImageError, is_out_of_memory
from .images import describe, read_image
from .labels import upsample_argmax, upsample_softmax
from .protocol import TTA, autocast, autocast_dtype, compiled_features, network_logits, prepare, same_device
from .segmentation import Segmentation

__all__ = ["Predictor"]


class Predictor:
    """Options checked once, the network chosen; :meth:`stream` segments items. The caller's model is never
    moved, converted or left in another mode. Options as :func:`fcn_zoo.predict.predict`; ``eval_size``
    replaces the model's resize bound; ``confidence`` computes each result's confidence map with its labels,
    on the model's device."""

    def __init__(
        self, model, *, tta=None, mode="whole", window=None, stride=None, batch_size=None, device=None,
        precision="fp32", engine="torch", compile=False, fuse=False, cache_dir=None, confidence=False, eval_size=None,
    ):
        if mode not in ("whole", "slide"):
            raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
        if engine not in ("torch", "onnxruntime"):
            raise ValueError(f"engine must be 'torch' or 'onnxruntime', got {engine!r}")
        if compile and engine != "torch":
            raise ValueError("compile=True applies to engine='torch'; onnxruntime compiles its graph itself")
        caller, own_device = model, next(model.parameters()).device
        device = torch.device(device) if device is not None else own_device
        if batch_size is None:
            batch_size = 1 if device.type == "cpu" else 8
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        dtype = autocast_dtype(precision, device)
        if engine == "onnxruntime" and (device.type != "cpu" or dtype is not None):
            raise ValueError("engine='onnxruntime' runs on the CPU in fp32; use engine='torch' for GPUs")
        # a fused copy is made only where it is asked for and can serve (compiled code is kept per model, and
        # onnxruntime fuses its own graph); a copy on the device where the model is elsewhere
        if fuse and engine == "torch" and not compile and not getattr(model, "_fused", False):
            model = model.fuse(inplace=False, device=device)
            if device.type == "cuda":  # the copy is ours: the layout tensor cores run fastest
                model.to(memory_format=torch.channels_last)
        elif not same_device(device, own_device):
            if compile or engine == "onnxruntime":  # compiled code and sessions are kept per model: not per copy
                raise ValueError(f"{'compile=True' if compile else 'engine=onnxruntime'} runs the model where it is "
                                 f"({own_device}); move it first: model.to({str(device)!r})")
            model = inference_copy(model, device)
        # a copy made here is in eval mode throughout and no one else holds it: no modes to check per batch
        self._owned = model is not caller
        self.model = model
        features = None
        if engine == "onnxruntime":
            from .export import onnx_session

            session = onnx_session(model, cache_dir=cache_dir)
            features = lambda x: torch.from_numpy(session.run(None, {"image": x.contiguous().numpy()})[0])  # noqa: E731
        elif compile:
            features = compiled_features(model)
        self.features = autocast(features or model.forward_features, device, dtype)
        self.options = {"tta": TTA() if tta is True else (tta or None), "mode": mode, "window": window, "stride": stride}
        self.batch_size, self.device, self.confidence = batch_size, device, confidence
        self.eval_size = tuple(eval_size) if eval_size is not None else None
        self.dtype = torch.uint8 if model.num_classes <= 256 else torch.int32

    def stream(
        self, items: Iterable, *, read: Callable | None = None, name: Callable[[object], str] = describe,
        num_workers: int | None = None, prefetch: int | None = None, overlap: bool | None = None, errors: str = "yield",
    ) -> Iterator[tuple[object, Segmentation | Exception]]:
        """Segment ``items`` lazily, in order: yields ``(item, Segmentation)``, or ``(item, exception)`` for one
        that fails (``errors="raise"`` raises it instead). ``read(item)`` gives the image's ``(H, W, 3)`` uint8
        array (default :func:`~fcn_zoo.images.read_image`), ``name(item)`` what messages call it.
        ``num_workers``: reader threads (default: 2 on GPUs; on the CPU the cores torch's threads leave idle, up
        to 2); ``prefetch``: items read ahead (default ``2 x max(num_workers, batch_size)``, or the batch size
        without workers); ``overlap``: labels on a thread of their own beside the next forward (default on GPUs)."""
        if errors not in ("raise", "yield"):
            raise ValueError(f"errors must be 'raise' or 'yield', got {errors!r}")
        if num_workers is None:
            idle = (os.cpu_count() or 1) - torch.get_num_threads()
            num_workers = 2 if self.device.type != "cpu" else max(0, min(2, idle))
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        prefetch = prefetch or (2 * max(num_workers, self.batch_size) if num_workers else self.batch_size)
        if prefetch < self.batch_size:
            raise ValueError(f"prefetch ({prefetch}) must be at least the batch size ({self.batch_size})")
        overlap = self.device.type != "cpu" if overlap is None else overlap
        read = read or (lambda item: read_image(item, name(item)))
        return self._stream(iter(items), read, name, num_workers, prefetch, errors, overlap)  # a generator: reads nothing yet

    def _stream(self, source, read, name, num_workers: int, prefetch: int, errors: str, overlap: bool):
        pool = ThreadPoolExecutor(num_workers, thread_name_prefix="fcn_zoo-read") if num_workers else _InPlace()
        post = ThreadPoolExecutor(1, thread_name_prefix="fcn_zoo-labels") if overlap else _InPlace()
        pin = self.device.type == "cuda"  # page-locked: the copy to the GPU overlaps the work before it

        def load(item):
            rgb = read(item)
            with torch.inference_mode():
                prepared = prepare(self.model, rgb, self.eval_size)
                return rgb, prepared.pin_memory() if pin else prepared

        def failed(item, error: Exception):
            if errors == "raise":
                raise error
            return item, error

        with pool, post:
            pending: deque = deque()  # (item, future of (rgb, prepared)) in input order
            in_flight: deque = deque()  # (batch, future of its Segmentations, its finish arguments), in input order

            def fill() -> None:
                for item in itertools.islice(source, prefetch - len(pending)):
                    pending.append((item, pool.submit(load, item)))

            def settle(limit: int):
                """The results of batches in flight, oldest first, until at most ``limit`` are left."""
                while len(in_flight) > limit or (in_flight and in_flight[0][1].done()):
                    batch, future, (rgbs, names, logits) = in_flight.popleft()
                    try:
                        segs = future.result()
                    except Exception as e:
                        if len(batch) == 1:
                            yield failed(batch[0][0], e)
                            continue
                        for k, (item, _) in enumerate(batch):  # each image's labels alone: only those that fail fail
                            try:
                                (seg,) = self.finish([rgbs[k]], [names[k]], [logits[k]])
                            except Exception as one:
                                yield failed(item, one)
                                continue
                            yield item, seg
                        continue
                    yield from ((item, seg) for (item, _), seg in zip(batch, segs))

            try:
                fill()
                while pending:
                    batch, shape = [], None
                    while pending and len(batch) < self.batch_size:
                        item, future = pending[0]
                        try:
                            loaded = future.result()
                        except Exception as e:
                            if batch:
                                break  # segment what came before, in order, then report this one
                            pending.popleft()
                            fill()
                            yield from settle(0)
                            yield failed(item, e)
                            continue
                        if batch and loaded[1].shape != shape:  # a forward pass takes images of one size
                            break
                        shape = loaded[1].shape
                        batch.append((item, loaded))
                        pending.popleft()
                    fill()
                    if not batch:
                        continue
                    for part, logits in self._forwards(batch, name):
                        if isinstance(logits, Exception):
                            yield from settle(0)
                            yield failed(part[0][0], logits)
                            continue
                        rgbs, names = [rgb for _, (rgb, _) in part], [name(item) for item, _ in part]
                        in_flight.append((part, post.submit(self.finish, rgbs, names, logits), (rgbs, names, logits)))
                        yield from settle(1 if overlap else 0)  # one batch's labels beside the next forward
                yield from settle(0)
            finally:
                for _, future in pending:
                    future.cancel()

    def _forwards(self, batch: list, name):
        """``(part, logits or exception)`` for ``batch``: the whole batch at once, or where that fails (out of
        memory, one image the network cannot take), each image alone, so that only the images that fail alone
        fail."""
        try:
            yield batch, self.forward([rgb for _, (rgb, _) in batch], [name(i) for i, _ in batch], [p for _, (_, p) in batch])
            return
        except Exception as e:
            if len(batch) == 1:  # the stream settles what came before, then reports (or raises) this
                yield batch, e
                return
        for one in batch:
            yield from self._forwards([one], name)

    def forward(self, images: list, names: list[str], prepared: list[torch.Tensor] | None = None) -> list[list[torch.Tensor]]:
        """The network's part for :func:`~fcn_zoo.images.read_image` arrays (``prepared``: the same through
        :func:`~fcn_zoo.protocol.prepare`): per image its low-resolution logits, on the model's device."""
        modes = contextlib.nullcontext() if self._owned else evaluating(self.model)
        with torch.inference_mode(), modes, self._memory(names):
            return network_logits(
                self.model, [torch.from_numpy(rgb).permute(2, 0, 1) for rgb in images] if prepared is None else None,
                batch_size=self.batch_size, eval_size=self.eval_size, features=self.features, prepared=prepared,
                **self.options,
            )

    def finish(self, images: list, names: list[str], logits: list[list[torch.Tensor]]) -> list[Segmentation]:
        """Labels (and confidence) from :meth:`forward`'s logits, on the model's device; the Segmentations.
        Any thread may run it, beside the next :meth:`forward`."""
        model = self.model
        with torch.inference_mode(), self._memory(names):
            segs = [
                Segmentation(upsample_argmax(lg, rgb.shape[:2]).to(self.dtype).cpu().numpy(), model.class_names,
                             model.palette, rgb, [t.cpu() for t in lg])
                for rgb, lg in zip(images, logits)
            ]
            if self.confidence:  # on the model's device, where the logits are: only the map comes back
                for seg, lg in zip(segs, logits):
                    seg._confidence = upsample_softmax(lg, seg.size).cpu().numpy()
        return segs

    @contextlib.contextmanager
    def _memory(self, names: list[str]):
        """Running out of memory is the image's error, with what to do."""
        try:
            yield
        except RuntimeError as e:
            if not is_out_of_memory(e):
                raise
            hint = "use mode='slide'" if self.options["mode"] == "whole" else "use a smaller window"
            raise ImageError(
                f"{', '.join(names)}: not enough {self.device.type.upper()} memory to segment it at its evaluation "
                f"size; {hint}{', a batch_size of 1' if self.batch_size > 1 else ''} or a larger device"
            ) from e


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
