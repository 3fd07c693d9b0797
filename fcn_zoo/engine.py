"""The one engine under every door: items in, ``(item, Segmentation or error)`` out, in input order.

A :class:`Predictor` checks the options once and chooses the network (the caller's model, or a copy it owns:
fused, on another device, compiled, or an onnxruntime session). :meth:`Predictor.stream` reads items ahead on
threads (decoding and the tensor work release the GIL, and nothing needs pickling), batches consecutive images
of one evaluation size, runs the network and turns logits into labels (beside the next forward on GPUs).
``predict``, ``predict_iter``, videos, the Ray ``Segmenter``, ``fcn-zoo predict``, ``evaluate`` and the demo
are thin loops over it: each adds only where its items come from and where the results go.

A failure belongs to its item (a batch that fails is retried one image at a time): it is yielded as
``(item, exception)`` and the stream goes on; only ``errors="raise"`` stops at it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ._inference import device_of, evaluating, inference_copy
from .devices import check_device_available
from .errors import ImageError, is_out_of_memory
from .images import describe, read_image
from ._files import is_quantized_config
from .labels import upsample_argmax, upsample_softmax
from .model import whole_number
from .protocol import TTA, autocast, autocast_dtype, compiled_features, network_logits, prepare
from .segmentation import Segmentation

__all__ = ["Predictor", "overlaps"]


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
        caller, own_device = model, device_of(model)
        try:
            device = torch.device(device) if device is not None else own_device
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'mps'") from e
        if device.type == "cpu":
            device = torch.device("cpu")  # cpu:N names the same CPU
        elif device != own_device:
            check_device_available(str(device))  # a GPU torch cannot see: one line saying why
        if not (tta is None or isinstance(tta, (bool, TTA))):
            raise ValueError(f"tta must be True, False, None or a TTA, got {tta!r}")
        for what, pair in (("window", window), ("stride", stride)):
            if pair is not None and not _pair_of_counts(pair):
                raise ValueError(f"{what} must be (height, width), two integers >= 1, got {pair!r}")
        if stride is not None and any(s > w for s, w in zip(stride, window or model.crop_size)):
            raise ValueError(f"stride {tuple(stride)} is larger than the window {tuple(window or model.crop_size)}: the "
                             "pixels between windows would be in none")
        if is_quantized_config(getattr(model, "config", {})) and (device.type != "cpu" or precision not in ("fp32", "auto")
                                                                or engine != "torch" or compile):
            raise ValueError("an int8 model runs on the CPU by OpenVINO, at OpenVINO's precision: leave device, "
                             "precision, engine and compile at their defaults")
        if batch_size is None:
            batch_size = 1 if device.type == "cpu" else 8
        if not whole_number(batch_size, 1):
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        dtype = autocast_dtype(precision, device)
        if engine == "onnxruntime" and (device.type != "cpu" or dtype is not None):
            raise ValueError("engine='onnxruntime' runs on the CPU in fp32; use engine='torch' for GPUs")
        # a fused copy is made only where it is asked for and can serve (compiled code is kept per model, and
        # onnxruntime fuses its own graph); a copy on the device where the model is elsewhere
        if fuse and engine == "torch" and not compile and not getattr(model, "_fused", False):
            model = model.fuse(inplace=False, device=device)  # channels_last on a GPU
        elif device.type != own_device.type or device.index not in (None, own_device.index):  # "cuda": the model's GPU
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
        without workers); ``overlap``: labels on a thread of their own beside the next forward (default:
        :func:`overlaps`), on CUDA on a stream of their own."""
        if errors not in ("raise", "yield"):
            raise ValueError(f"errors must be 'raise' or 'yield', got {errors!r}")
        if num_workers is None:
            idle = (os.cpu_count() or 1) - torch.get_num_threads()
            num_workers = 2 if self.device.type != "cpu" else max(0, min(2, idle))
        if not whole_number(num_workers, 0):
            raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
        if prefetch is None:
            prefetch = 2 * max(num_workers, self.batch_size) if num_workers else self.batch_size
        if not whole_number(prefetch, 1) or prefetch < self.batch_size:
            raise ValueError(f"prefetch ({prefetch}) must be at least the batch size ({self.batch_size})")
        overlap = overlaps(self.device) if overlap is None else overlap
        read = read or (lambda item: read_image(item, name(item)))
        return self._stream(iter(items), read, name, num_workers, prefetch, errors, overlap)  # a generator: reads nothing yet

    def _stream(self, items: Iterator, read, name, num_workers: int, prefetch: int, errors: str, overlap: bool):
        pin = self.device.type == "cuda"  # page-locked: the copy to the GPU overlaps the work before it
        # the labels' own CUDA stream: their kernels and host syncs wait for their batch's forward pass only,
        # not for the next one that the network queues meanwhile on its stream
        where = device_of(self.model)  # "cuda" may name another GPU than the model's
        side = torch.cuda.Stream(where) if overlap and where.type == "cuda" else None

        def load(item):
            rgb = read(item)
            with torch.inference_mode():
                prepared = prepare(self.model, rgb, self.eval_size)
                return rgb, prepared.pin_memory() if pin else prepared

        def failed(item, error: Exception):
            if errors == "raise":
                raise error
            return item, error

        in_flight: deque = deque()  # (items, future of their Segmentations or exceptions), in input order

        def settle(limit: int):
            """The results of the batches in flight, oldest first, until at most ``limit`` are left."""
            while len(in_flight) > limit or (in_flight and in_flight[0][1].done()):
                batch_items, labels = in_flight.popleft()
                for item, result in zip(batch_items, labels.result()):
                    yield failed(item, result) if isinstance(result, Exception) else (item, result)

        def segment(batch: list):
            """The forward pass of ``batch``, its labels beside the next one; where it fails, each image alone."""
            rgbs, prepared = [rgb for _, (rgb, _) in batch], [p for _, (_, p) in batch]
            names = [name(item) for item, _ in batch]
            try:
                logits = self.forward(rgbs, names, prepared)
            except Exception as e:
                logits = e
            if not isinstance(logits, Exception):
                ready = None
                if side is not None:  # the logits are done when the work queued so far on this stream is
                    ready = torch.cuda.Event()
                    ready.record(torch.cuda.current_stream(where))
                in_flight.append(([item for item, _ in batch], post(self._labels, rgbs, names, logits, side, ready)))
                yield from settle(1 if overlap else 0)  # one batch's labels beside the next forward
            elif len(batch) > 1:  # out of memory, or one image the network cannot take: only those fail that fail alone
                del logits  # its traceback holds the failed batch's input and activations: freed before the retries
                for one in batch:
                    yield from segment([one])
            else:
                yield from settle(0)
                yield failed(batch[0][0], logits)

        with contextlib.ExitStack() as stack:
            post = _submitter(stack, 1 if overlap else 0, "fcn_zoo-labels")
            reads = _read_ahead(items, load, _submitter(stack, num_workers, "fcn_zoo-read"), prefetch)
            for batch in _batches(reads, self.batch_size):
                item, loaded = batch[0]
                if isinstance(loaded, Exception):  # a failed read: what came before it first
                    yield from settle(0)
                    if item is _SOURCE_FAILED:  # the items themselves failed (a generator that raised): it ends here
                        raise loaded
                    yield failed(item, loaded)
                else:
                    yield from segment(batch)
            yield from settle(0)

    def forward(self, images: list, names: list[str], prepared: list[torch.Tensor] | None = None) -> list[list[torch.Tensor]]:
        """The network's part for :func:`~fcn_zoo.images.read_image` arrays (``prepared``: the same through
        :func:`~fcn_zoo.protocol.prepare`, made here if not given): per image its low-resolution logits, on the
        model's device."""
        modes = contextlib.nullcontext() if self._owned else evaluating(self.model)
        with torch.inference_mode(), modes, self._memory(names):
            if prepared is None:
                prepared = [prepare(self.model, rgb, self.eval_size) for rgb in images]
            return network_logits(self.model, prepared, batch_size=self.batch_size, features=self.features,
                                  **self.options)

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

    def _labels(self, images: list, names: list[str], logits: list, stream=None, ready=None) -> list:
        """:meth:`finish`; where it fails for a batch, each image alone, an exception in place of one that fails.
        ``stream``: the CUDA stream to run on, once the forward pass's event ``ready`` has happened."""
        if stream is not None:
            stream.wait_event(ready)
            for tensor in (t for per_image in logits for t in per_image):
                tensor.record_stream(stream)  # their memory is not reused until this stream is done with them
            with torch.cuda.stream(stream):
                return self._labels(images, names, logits)
        try:
            return self.finish(images, names, logits)
        except Exception as e:
            if len(images) == 1:
                return [e]
        return [self._labels([rgb], [name], [lg])[0] for rgb, name, lg in zip(images, names, logits)]

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


def _pair_of_counts(value) -> bool:
    try:
        return len(value) == 2 and all(whole_number(v, 1) for v in value)
    except TypeError:  # not a sequence
        return False


def overlaps(device: torch.device) -> bool:
    """Whether labels are made beside the next forward pass by default: on CUDA GPUs, where the network's time
    is the device's and the host would idle. Not on the CPU (both would share its cores), nor on MPS (two
    threads would issue kernels at once)."""
    return device.type == "cuda"


def _submitter(stack: contextlib.ExitStack, workers: int, name: str) -> Callable[..., Future]:
    """``submit`` of a pool of ``workers`` threads that ``stack`` shuts down (calls not started are cancelled);
    without workers, a call made at once."""
    if not workers:
        return _run_now
    pool = ThreadPoolExecutor(workers, thread_name_prefix=name)
    stack.callback(pool.shutdown, cancel_futures=True)
    return pool.submit


def _run_now(fn, *args) -> Future:
    future: Future = Future()
    try:
        future.set_result(fn(*args))
    except Exception as e:
        future.set_exception(e)
    return future


_SOURCE_FAILED = object()  # the item of an error of the items' own iterator


def _read_ahead(items: Iterator, load: Callable, submit: Callable[..., Future], prefetch: int) -> Iterator:
    """``(item, load(item) or its exception)`` in input order, at most ``prefetch`` items loading ahead. An error
    of ``items`` itself (a generator that raises) comes last, as ``(_SOURCE_FAILED, error)``, after every item
    it gave before it."""
    pending: deque = deque()
    failure = None

    def take(count: int) -> None:
        nonlocal failure
        try:
            for item in itertools.islice(items, count if failure is None else 0):
                pending.append((item, submit(load, item)))
        except Exception as e:
            failure = e

    threads = submit is not _run_now
    take(prefetch)
    while pending:
        item, future = pending.popleft()
        if threads:  # reader threads start the next reads before this one is waited for: they keep ahead
            take(prefetch - len(pending))
        try:
            loaded = future.result()
        except Exception as e:
            loaded = e
        yield item, loaded
        if not threads:  # without them, each image is read when the network needs it, once the result before it
            take(prefetch - len(pending))  # is out: a live source (a camera, a request answered by it) is not waited on
    if failure is not None:
        yield _SOURCE_FAILED, failure


def _batches(reads: Iterator, batch_size: int) -> Iterator[list]:
    """Consecutive images of one evaluation size (what a forward pass takes), ``batch_size`` at most; a failed
    read is a batch of its own."""

    def size(read: tuple) -> object:
        loaded = read[1]
        return id(loaded) if isinstance(loaded, Exception) else loaded[1].shape  # each failure a group of its own

    for _, group in itertools.groupby(reads, size):
        while batch := list(itertools.islice(group, batch_size)):
            yield batch
