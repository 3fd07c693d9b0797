"""The reference evaluation protocol on tensors: resize keeping the aspect ratio to fit the evaluation size
(8-bit values rounded, as the reference resizes 8-bit images), normalise, run the network (whole image,
sliding windows, test-time augmentation), and return the low-resolution logits that labels are upsampled
from (:mod:`fcn_zoo.labels`). :mod:`fcn_zoo.engine` runs it over streams of images."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._fusion import cpu_has_bf16
from ._inference import device_of
from .zoo import eval_resize_shape

__all__ = ["TTA", "network_logits", "prepare", "compiled_features"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TTA:
    """Test-time augmentation: average the logits over ``scales`` (and their horizontal flips)."""

    scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    flip: bool = True

    def __post_init__(self):
        scales = tuple(self.scales) if isinstance(self.scales, (list, tuple)) else ()
        if not scales or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in scales):
            raise ValueError(f"TTA scales must be one or more positive numbers, got {self.scales!r}")
        object.__setattr__(self, "scales", scales)


def network_logits(
    model, prepared: list[torch.Tensor], *, tta: TTA | None = None, mode: str = "whole", window=None, stride=None,
    batch_size: int = 8, features=None,
) -> list[list[torch.Tensor]]:
    """Per image its logits before upsampling to its size: one ``(1, C, h, w)`` float32 tensor, or one per TTA
    scale and flip (their upsampled mean is the answer). ``prepared``: images of one evaluation size through
    :func:`prepare`, run as one batch. Call under ``torch.inference_mode()`` with the model in eval mode.
    ``features`` replaces ``model.forward_features`` (another runtime running the same graph)."""
    device = device_of(model)
    features = features or model.forward_features

    def run(x: torch.Tensor) -> torch.Tensor:
        if mode == "slide":
            return _slide(features, x, window or model.crop_size, stride, batch_size)
        return features(x)

    inputs = [x.to(device, non_blocking=True) for x in prepared]
    batch = inputs[0] if len(inputs) == 1 else torch.cat(inputs)
    outs = []
    for scale in tta.scales if tta else (1,):
        if scale == 1:
            x = batch
        elif min(int(side * scale) for side in batch.shape[-2:]) >= 1:
            x = F.interpolate(batch, scale_factor=scale, mode="bilinear", align_corners=False)
        else:  # a side of a narrow strip that would vanish at this scale keeps one pixel
            size = [max(1, int(side * scale)) for side in batch.shape[-2:]]
            x = F.interpolate(batch, size=size, mode="bilinear", align_corners=False)
        outs.append(run(x))
        if tta and tta.flip:
            outs.append(run(x.flip(-1)).flip(-1))
    # each image's own copy where a batch holds several: a result does not keep the whole batch's logits alive
    return [[(out if len(inputs) == 1 else out[i:i + 1].clone()).float() for out in outs] for i in range(len(inputs))]


def prepare(model, rgb, eval_size: Sequence[int] | None = None) -> torch.Tensor:
    """A :func:`~fcn_zoo.images.read_image` array resized to the evaluation size (default the model's) and
    normalised, on the CPU: what reader threads do ahead of the network."""
    return _preprocess(model, torch.from_numpy(rgb).permute(2, 0, 1), torch.device("cpu"), eval_size or model.eval_size)


def _preprocess(model, x: torch.Tensor, device: torch.device, eval_size: Sequence[int]) -> torch.Tensor:
    """``(3, H, W)`` 8-bit values -> normalised ``(1, 3, h, w)`` float32 at the evaluation size, channels_last.
    The reference resizes 8-bit images and keeps them 8-bit: the resized values are rounded."""
    x = x.to(device).unsqueeze(0).float()
    size = eval_resize_shape(x.shape[-2], x.shape[-1], eval_size)
    if size != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).round_().clamp_(0, 255)
    mean = torch.tensor(model.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(model.std, device=device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


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


def _forward_features(model, x: torch.Tensor) -> torch.Tensor:
    return model.forward_features(x)


@functools.cache
def _compiled_forward():
    return torch.compile(_forward_features)


def compiled_features(model):
    """``model.forward_features`` through ``torch.compile``. One compiled function serves every model (its
    guards tell models apart), so a model compiles once per input shape family and the compiled code holds
    no reference that would keep a model alive. Weights are read at each call, not frozen in."""
    return functools.partial(_compiled_forward(), model)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype the network runs in for ``precision`` on ``device`` (``None``: fp32). ``"auto"``: bf16 where the
    device runs it natively (a CPU with AVX512-BF16 or AMX, a GPU of compute capability 8.0 or more), else fp32."""
    dtypes = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    if precision not in dtypes:
        raise ValueError(f"precision must be 'fp32', 'fp16', 'bf16' or 'auto', got {precision!r}")
    if device.type == "cpu" and precision == "fp16":
        raise ValueError("precision='fp16' is for GPUs; on CPU use 'bf16' (CPUs with AMX or AVX512-BF16) or 'fp32'")
    if device.type == "cpu" and precision == "bf16" and not cpu_has_bf16():
        logger.warning("this CPU has no bf16 instructions (AVX512-BF16, AMX) and emulates bf16: precision='bf16' "
                       "runs slower than fp32 here; use 'fp32' (or an int8 model: fcn_zoo.quantize)")
    return dtypes[precision]


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 natively (a V100 or T4 emulates it, as a CPU without AVX512-BF16 or AMX does)."""
    if device.type == "cpu":
        return cpu_has_bf16()
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def autocast(features, device: torch.device, dtype: torch.dtype | None):
    """``features`` run under autocast to ``dtype`` (the network only: resizing and argmax stay in fp32)."""
    if dtype is None:
        return features

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype):
            return features(x)

    return run
