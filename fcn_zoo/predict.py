"""Segment images: :func:`predict` (one image, a list or a batch), :func:`predict_iter` (a stream) and
:func:`preprocess` (an image as the tensor the network takes), each a few lines over the engine
(:class:`fcn_zoo.engine.Predictor`). The default is the reference evaluation protocol exactly
(:mod:`fcn_zoo.protocol`); reading images is :mod:`fcn_zoo.images`, the result :mod:`fcn_zoo.segmentation`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from .engine import Predictor
from .errors import ImageError
from .images import read_image
from .protocol import TTA, prepare
from .segmentation import Segmentation

__all__ = ["predict", "predict_iter", "preprocess", "Segmentation", "TTA"]


def predict(
    model,
    images,
    *,
    tta: bool | TTA | None = None,
    mode: str = "whole",
    window: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    engine: str = "torch",
    compile: bool = False,
    fuse: bool = False,
    cache_dir=None,
) -> Segmentation | list[Segmentation]:
    """Segment images with ``model`` (an :class:`fcn_zoo.FCN`).

    Args:
        images: one image, a list of them, or a batch: an ``(N, 3, H, W)`` tensor or ``(N, H, W, 3)`` array.
            An image is a path, encoded bytes, a PIL image, a uint8 ``(H, W, 3)`` (or ``(H, W)``) array (float
            in ``[0, 1]`` too), or a ``(3, H, W)`` tensor (float in ``[0, 1]`` or uint8), read by
            :func:`fcn_zoo.images.read_image`. Arrays and tensors are read as **RGB**: an OpenCV
            ``cv2.imread`` array is BGR and silently gives worse masks; pass ``img[..., ::-1]`` (or
            ``cv2.cvtColor(img, cv2.COLOR_BGR2RGB)``). EXIF rotation is applied; greyscale, palette, 16-bit
            and alpha images are converted to 8-bit RGB (alpha is dropped).
        tta: ``True`` for flip + scales 0.5-1.75, or a :class:`TTA`; default none (the reference protocol).
        mode: ``"whole"`` (the reference protocol) or ``"slide"``: overlapping windows, all in batches.
        window: the sliding window ``(h, w)``; default the training crop.
        stride: the window's step ``(h, w)``; default 2/3 of the window.
        batch_size: images (or windows) per forward pass; default 8 on GPUs, 1 on CPUs (where batching
            does not raise throughput and costs memory: benchmarks/RESULTS.md).
        device: run on this device; default the model's. For another device than the model's a copy of the
            model is moved there for this call: the model itself stays where it is.
        precision: ``"fp32"``, or ``"bf16"`` / on GPUs ``"fp16"``: the network under autocast (resizing
            and argmax stay fp32); ``"auto"``: bf16 where the device runs it natively, else fp32. On CPUs with
            AVX512-BF16 (AMD Zen 4 on) a ``fuse()``d model runs 2x faster in bf16, with AMX (Intel Xeon 4th
            generation on) 5.4x (docs/int8.md); without them bf16 is emulated and slower, and a warning says so.
        engine: ``"torch"``, or on CPU ``"onnxruntime"``: the model exported once to ONNX (cached) and run
            by onnxruntime, which fuses what eager PyTorch cannot (~15% faster: benchmarks/RESULTS.md).
        compile: run the network through ``torch.compile`` (made once per model and device and kept, so
            only the first call pays the compilation: tens of seconds); for serving many images, mostly
            on GPUs. Each new evaluation shape after the first compiles once more, with dynamic shapes.
        fuse: run a fused copy of the model (``model.fuse(inplace=False)``: BatchNorm folded, ReLU and
            residual additions inside the convolutions; 7-18% faster on CPU) made for this call, instead of
            the model itself. Pays off for a list of images; a model you ``fuse()``d yourself is run as it is.
        cache_dir: where ``engine="onnxruntime"`` keeps its exported graphs (default ``$FCN_ZOO_CACHE`` or
            ``~/.cache/fcn_zoo``).

    The model is left as it was found: it runs in eval mode for the call (every submodule's mode is restored
    afterwards), on its own device, in its own memory format; only the input is made channels_last.

    Returns:
        a :class:`Segmentation` for one image, a list of them for a list or a batch.
    """
    single = not isinstance(images, (list, tuple)) and getattr(images, "ndim", 0) != 4
    items = [images] if single else list(images)
    if not items:
        raise ImageError("no images given: pass an image or a non-empty list of images")
    predictor = Predictor(
        model, tta=tta, mode=mode, window=window, stride=stride, batch_size=batch_size, device=device,
        precision=precision, engine=engine, compile=compile, fuse=fuse, cache_dir=cache_dir,
    )
    results = [seg for _, seg in predictor.stream(items, num_workers=0, overlap=False, errors="raise")]
    return results[0] if single else results


def predict_iter(
    model, images: Iterable, *, num_workers: int | None = None, prefetch: int | None = None, errors: str = "raise",
    fuse: bool = True, confidence: bool = False, overlap: bool | None = None, **options,
) -> Iterator[tuple[object, Segmentation | Exception]]:
    """Segment ``images`` lazily: yields ``(image, Segmentation)`` in input order.

    Args:
        images: any iterable (a list, a generator, a dataset) of what :func:`fcn_zoo.predict.predict`
            takes: paths, PIL images, RGB arrays or tensors. It is consumed as the results are.
        num_workers: threads reading, decoding and resizing images ahead of the network; 0 reads each
            image when the network needs it, and asks ``images`` for the next one only once the result before
            it is out (for a live source: a camera, requests each answered by its result). Default: 2 on GPUs; on the CPU, as many (up to 2) as there are
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
        overlap: turn a batch's logits into labels on a thread (and on CUDA a stream) of their own while the
            network runs the next batch (default: on CUDA GPUs, where the network's time is the device's and the
            host would otherwise idle; on the CPU both would share the same cores, and on Apple's MPS two
            threads would issue kernels at once).
        confidence: compute each result's :attr:`~fcn_zoo.segmentation.Segmentation.confidence` with its
            labels, on the model's device (a GPU's time, not the host's), instead of when first asked for.
        **options: as :func:`fcn_zoo.predict.predict` (``tta``, ``mode``, ``batch_size``, ``device``,
            ``precision``, ``engine``, ``compile``...). Consecutive images of equal evaluation size share a
            forward pass, ``batch_size`` at a time.
    """
    predictor = Predictor(model, fuse=fuse, confidence=confidence, **options)  # bad options fail here, before anything is read
    return predictor.stream(images, num_workers=num_workers, prefetch=prefetch, overlap=overlap, errors=errors)


def preprocess(model, image) -> torch.Tensor:
    """``image`` (anything :func:`~fcn_zoo.images.read_image` takes) as exactly the tensor the model is run on
    by :func:`predict`: a normalised float32 ``(1, 3, h, w)`` tensor on the CPU, resized (keeping the aspect
    ratio, 8-bit values rounded as the reference does) to fit ``model.eval_size``. ``model(x)`` then gives
    logits ``(1, C, h, w)``; upsample them to the image's own size before the argmax, as ``predict`` does."""
    return prepare(model, read_image(image))
