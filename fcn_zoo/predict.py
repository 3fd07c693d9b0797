"""What happens to an image: read -> RGB -> reference resize -> normalise -> forward -> logits at the
image's own size -> argmax -> :class:`~fcn_zoo.segmentation.Segmentation`.

The default is the reference evaluation protocol exactly: resize keeping the aspect ratio so that the
image fits the row's evaluation size (``(2048, 512)``, Cityscapes ``(2048, 1024)``), one forward pass,
bilinear upsampling of the logits straight to the original size, argmax. Reading images is
``fcn_zoo.images``, turning logits into labels ``fcn_zoo.labels``, the result ``fcn_zoo.segmentation``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._fusion import cpu_has_bf16
from ._inference import evaluating, inference_copy
from .errors import ImageError, is_out_of_memory
from .images import describe, load_image, rgb_uint8, save_image
from .labels import upsample_argmax, upsample_softmax
from .segmentation import Segmentation
from .zoo import eval_resize_shape

__all__ = ["predict", "predict_labels", "Predictor", "Segmentation", "TTA", "load_image", "eval_resize_shape", "save_image"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TTA:
    """Test-time augmentation: average the logits over ``scales`` (and their horizontal flips)."""

    scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    flip: bool = True


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
        images: one image or a list. An image is a path, a PIL image, a uint8 ``(H, W, 3)`` (or ``(H, W)``)
            array, or a ``(3, H, W)`` tensor (float in ``[0, 1]`` or uint8). Arrays and tensors are read as
            **RGB**: an OpenCV ``cv2.imread`` array is BGR and silently gives worse masks; pass
            ``img[..., ::-1]`` (or ``cv2.cvtColor(img, cv2.COLOR_BGR2RGB)``). EXIF rotation is applied;
            greyscale, palette, 16-bit and alpha images are converted to RGB (alpha is dropped).
        tta: ``True`` for flip + scales 0.5-1.75, or a :class:`TTA`; default none (the reference protocol).
        mode: ``"whole"`` (the reference protocol) or ``"slide"``: overlapping windows, all in batches.
        window: the sliding window ``(h, w)``; default the training crop.
        stride: the window's step ``(h, w)``; default 2/3 of the window.
        batch_size: images (or windows) per forward pass; default 8 on GPUs, 1 on CPUs (where batching
            does not raise throughput and costs memory: benchmarks/RESULTS.md).
        device: run on this device; default the model's. For another device than the model's a copy of the
            model is moved there for this call: the model itself stays where it is.
        precision: ``"fp32"``, or ``"bf16"`` / on GPUs ``"fp16"``: the network under autocast (resizing
            and argmax stay fp32). On CPUs with AMX (Intel Xeon 4th generation on), bf16 is 3.4x faster
            than fp32, 5.4x on a ``fuse()``d model (benchmarks/RESULTS.md); without bf16 instructions it
            is slower, and a warning says so.
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
        a :class:`Segmentation` for one image, a list of them for a list.
    """
    single = not isinstance(images, (list, tuple))
    items = [images] if single else list(images)
    if not items:
        raise ImageError("no images given: pass an image or a non-empty list of images")
    predictor = Predictor(
        model, tta=tta, mode=mode, window=window, stride=stride, batch_size=batch_size, device=device,
        precision=precision, engine=engine, compile=compile, fuse=fuse, cache_dir=cache_dir,
    )
    results = []
    for start in range(0, len(items), predictor.batch_size):
        chunk = items[start:start + predictor.batch_size]
        results += predictor([load_image(item) for item in chunk], [describe(item) for item in chunk])
    return results[0] if single else results


class Predictor:
    """:func:`predict`'s options checked once and the network to run chosen: the caller's model itself, or a
    copy it owns (fused, or on another device); then each call segments a batch of loaded images
    (``load_image`` results) into Segmentations. :func:`predict` and :func:`fcn_zoo.stream.predict_iter`
    share it. The caller's model is never moved, converted or left in another mode."""

    def __init__(
        self, model, *, tta=None, mode="whole", window=None, stride=None, batch_size=None, device=None,
        precision="fp32", engine="torch", compile=False, fuse=False, cache_dir=None, confidence=False,
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
        autocast_dtype = _autocast_dtype(precision, device)
        if engine == "onnxruntime" and (device.type != "cpu" or autocast_dtype is not None):
            raise ValueError("engine='onnxruntime' runs on the CPU in fp32; use engine='torch' for GPUs")
        # a fused copy is made only where it is asked for and can serve (compiled code is kept per model, and
        # onnxruntime fuses its own graph); a copy on the device where the model is elsewhere
        if fuse and engine == "torch" and not compile and not getattr(model, "_fused", False):
            model = model.fuse(inplace=False, device=device)
            if device.type == "cuda":  # the copy is ours: the layout tensor cores run fastest
                model.to(memory_format=torch.channels_last)
        elif not _same_device(device, own_device):
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
        self.features = _autocast(features or model.forward_features, device, autocast_dtype)
        self.options = {"tta": TTA() if tta is True else (tta or None), "mode": mode, "window": window, "stride": stride}
        self.batch_size, self.device, self.confidence = batch_size, device, confidence
        self.dtype = torch.uint8 if model.num_classes <= 256 else torch.int32

    def __call__(
        self, loaded: list[tuple[torch.Tensor, bool]], names: list[str], prepared: list[torch.Tensor] | None = None
    ) -> list[Segmentation]:
        """Segment ``loaded`` images (:func:`load_image` results; ``prepared``: the same through :func:`prepare`)."""
        return self.finish(loaded, names, self.forward(loaded, names, prepared))

    def forward(self, loaded, names: list[str], prepared: list[torch.Tensor] | None = None) -> list[list[torch.Tensor]]:
        """The network's part: per image its low-resolution logits, on the model's device."""
        modes = contextlib.nullcontext() if self._owned else evaluating(self.model)
        with torch.inference_mode(), modes, self._memory(names):
            return network_logits(
                self.model, [x for x, _ in loaded], from_uint8=[f for _, f in loaded], batch_size=self.batch_size,
                features=self.features, prepared=prepared, **self.options,
            )

    def finish(self, loaded, names: list[str], logits: list[list[torch.Tensor]]) -> list[Segmentation]:
        """Labels (and confidence) from :meth:`forward`'s logits, on the model's device; the Segmentations.
        Any thread may run it, beside the next :meth:`forward`."""
        model = self.model
        with torch.inference_mode(), self._memory(names):
            segs = [
                Segmentation(upsample_argmax(lg, x.shape[-2:]).to(self.dtype).cpu().numpy(), model.class_names,
                             model.palette, rgb_uint8(x), [t.cpu() for t in lg])
                for (x, _), lg in zip(loaded, logits)
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


def predict_labels(
    model,
    images: list[torch.Tensor],
    *,
    from_uint8: bool | list[bool] = True,
    tta: TTA | None = None,
    mode: str = "whole",
    window: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    batch_size: int = 8,
    eval_size: tuple[int, int] | None = None,
    features=None,
) -> list[torch.Tensor]:
    """The protocol on already-loaded images: ``(3, H, W)`` float tensors of 0..255 RGB values -> ``(H, W)``
    int64 label tensors on the model's device. ``from_uint8``: the images hold 8-bit values (per image or
    for all), which the reference keeps 8-bit through the resize. Call under ``torch.inference_mode()`` with the model in eval
    mode; :func:`predict` wraps it with input handling, and training's evaluation uses it directly.
    ``eval_size`` replaces the model's evaluation resize bound (for models trained at another scale);
    ``features`` replaces ``model.forward_features`` (another engine running the same graph)."""
    return labels_and_logits(
        model, images, from_uint8=from_uint8, tta=tta, mode=mode, window=window, stride=stride,
        batch_size=batch_size, eval_size=eval_size, features=features,
    )[0]


def labels_and_logits(
    model, images: list[torch.Tensor], *, from_uint8: bool | list[bool] = True, tta: TTA | None = None,
    mode: str = "whole", window=None, stride=None, batch_size: int = 8, eval_size=None, features=None,
    prepared: list[torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """:func:`predict_labels`, and per image the logits the labels come from (one ``(1, C, h, w)`` tensor, or
    one per TTA scale and flip) before upsampling to the image's size. ``prepared``: the images already
    through :func:`prepare` (done ahead, by another thread), in place of preparing them here."""
    logits = network_logits(model, images, from_uint8=from_uint8, tta=tta, mode=mode, window=window, stride=stride,
                            batch_size=batch_size, eval_size=eval_size, features=features, prepared=prepared)
    return [upsample_argmax(lg, x.shape[-2:]) for x, lg in zip(images, logits)], logits


def network_logits(
    model, images: list[torch.Tensor], *, from_uint8: bool | list[bool] = True, tta: TTA | None = None,
    mode: str = "whole", window=None, stride=None, batch_size: int = 8, eval_size=None, features=None,
    prepared: list[torch.Tensor] | None = None,
) -> list[list[torch.Tensor]]:
    """The network's part of :func:`labels_and_logits`: per image its logits before upsampling."""
    device = next(model.parameters()).device
    if prepared is not None:
        inputs = [x if x.device == device else x.to(device, non_blocking=True) for x in prepared]
    else:
        flags = from_uint8 if isinstance(from_uint8, list) else [from_uint8] * len(images)
        inputs = [_preprocess(model, x, flag, device, eval_size or model.eval_size) for x, flag in zip(images, flags)]
    return _logits(model, inputs, tta, mode, window, stride, batch_size, features or model.forward_features)


# --- the protocol --------------------------------------------------------------------------------


def prepare(model, x: torch.Tensor, from_uint8: bool) -> torch.Tensor:
    """A loaded image (:func:`load_image`) resized to the evaluation size and normalised, on the CPU, as
    :func:`labels_and_logits` would do it: what ``predict_iter``'s reader threads do ahead of the network."""
    return _preprocess(model, x, from_uint8, torch.device("cpu"), model.eval_size)


def _preprocess(model, x: torch.Tensor, from_uint8: bool, device: torch.device, eval_size: Sequence[int]) -> torch.Tensor:
    """``(3, H, W)`` 0..255 -> normalised ``(1, 3, h, w)`` at the evaluation size, channels_last."""
    x = x.to(device).unsqueeze(0)
    size = eval_resize_shape(x.shape[-2], x.shape[-1], eval_size)
    if size != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if from_uint8:  # the reference resizes 8-bit images and keeps them 8-bit
            x = x.round_().clamp_(0, 255)
    mean = torch.tensor(model.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(model.std, device=device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def _logits(model, inputs: list[torch.Tensor], tta: TTA | None, mode, window, stride, batch_size, features) -> list[torch.Tensor]:
    """Per image, the logits ``(1, C, h', w')`` to be upsampled to its original size.

    With TTA, a list of such tensors (one per scale and flip) whose upsampled mean is the answer.
    """
    def run(batch: torch.Tensor) -> torch.Tensor:
        if mode == "slide":
            return _slide(features, batch, window or model.crop_size, stride, batch_size)
        return features(batch)

    def run_tta(batch: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for scale in tta.scales:
            x = batch if scale == 1 else F.interpolate(batch, scale_factor=scale, mode="bilinear", align_corners=False)
            outs.append(run(x))
            if tta.flip:
                outs.append(run(x.flip(-1)).flip(-1))
        return outs

    results: list = [None] * len(inputs)
    by_shape: dict[tuple, list[int]] = {}
    for i, x in enumerate(inputs):
        by_shape.setdefault(tuple(x.shape), []).append(i)
    for indices in by_shape.values():  # images of equal evaluation size share a forward pass
        batch = inputs[indices[0]] if len(indices) == 1 else torch.cat([inputs[i] for i in indices])
        outs = run_tta(batch) if tta else [run(batch)]
        for j, i in enumerate(indices):
            results[i] = [o[j:j + 1].float() for o in outs]
    return results


def _slide(features, x: torch.Tensor, window: Sequence[int], stride: Sequence[int] | None, batch_size: int) -> torch.Tensor:
    """Sliding-window logits ``(N, C, h, w)`` from ``features`` (low-resolution logits of a batch of windows),
    each window's logits upsampled to the window as the model's forward does; windows batched, overlaps averaged."""
    n, _, h, w = x.shape
    wh, ww = min(window[0], h), min(window[1], w)
    sh, sw = stride or (max(1, math.ceil(window[0] * 2 / 3)), max(1, math.ceil(window[1] * 2 / 3)))
    ys = list(range(0, max(h - wh, 0) + 1, sh))
    xs = list(range(0, max(w - ww, 0) + 1, sw))
    if ys[-1] + wh < h:
        ys.append(h - wh)
    if xs[-1] + ww < w:
        xs.append(w - ww)
    boxes = [(y, xx) for y in ys for xx in xs]
    total = count = None
    for start in range(0, len(boxes), max(1, batch_size // n)):
        part = boxes[start:start + max(1, batch_size // n)]
        crops = torch.cat([x[:, :, y:y + wh, xx:xx + ww] for y, xx in part])
        out = F.interpolate(features(crops).float(), size=(wh, ww), mode="bilinear", align_corners=False)
        if total is None:
            total = x.new_zeros((n, out.shape[1], h, w), dtype=torch.float32)
            count = x.new_zeros((1, 1, h, w), dtype=torch.float32)
        for k, (y, xx) in enumerate(part):
            total[:, :, y:y + wh, xx:xx + ww] += out[k * n:(k + 1) * n]
            count[:, :, y:y + wh, xx:xx + ww] += 1
    return total / count


_compiled_forward = None


def _forward_features(model, x: torch.Tensor) -> torch.Tensor:
    return model.forward_features(x)


def compiled_features(model):
    """``model.forward_features`` through ``torch.compile``. One compiled function serves every model (its
    guards tell models apart), so a model compiles once per input shape family and the compiled code holds
    no reference that would keep a model alive. Weights are read at each call, not frozen in."""
    global _compiled_forward
    if _compiled_forward is None:
        _compiled_forward = torch.compile(_forward_features)
    return functools.partial(_compiled_forward, model)


def _same_device(asked: torch.device, own: torch.device) -> bool:
    """Whether ``asked`` names ``own`` ("cuda" names the model's GPU, whichever it is)."""
    return asked.type == own.type and (asked.index is None or asked.index == own.index)


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    dtypes = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision not in dtypes:
        raise ValueError(f"precision must be 'fp32', 'fp16' or 'bf16', got {precision!r}")
    if device.type == "cpu" and precision == "fp16":
        raise ValueError("precision='fp16' is for GPUs; on CPU use 'bf16' (CPUs with AMX or AVX512-BF16) or 'fp32'")
    if device.type == "cpu" and precision == "bf16" and not cpu_has_bf16():
        logger.warning("this CPU has no bf16 instructions (AMX, AVX512-BF16): precision='bf16' will be slower than fp32")
    return dtypes[precision]


def _autocast(features, device: torch.device, dtype: torch.dtype | None):
    """``features`` run under autocast to ``dtype`` (the network only: resizing and argmax stay in fp32)."""
    if dtype is None:
        return features

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype):
            return features(x)

    return run
