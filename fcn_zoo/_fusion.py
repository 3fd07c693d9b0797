"""Inference-time fusion for ``FCN.fuse()``: BatchNorm folded into convolutions, then on CPU each convolution,
its ReLU and its residual addition run as one oneDNN kernel.

Fusion rewrites the module: it is explicit, and owned by whoever calls it (``model.fuse()`` in place, or a
fused copy made by an entry point that owns its model for a whole run). Nothing here is done to a model
behind its back, and no state is shared between models.

Eager PyTorch runs a ResNet block's ReLUs and residual addition as separate passes over memory; with
BatchNorm folded these are the only work outside the convolutions (about 4% of an R-50 OS8 forward on a
CPU). oneDNN applies them as post-ops of the convolution that produces the tensor, while it is still in
cache, through the same operators that ``torch.compile`` emits for CPU (``torch.ops.mkldnn``), with the
weights reordered once into oneDNN's blocked layout. Under CPU bf16 autocast the same kernels run in
bf16, with the weights kept packed in bf16. Wherever the kernels do not apply (other devices, other
autocast, autograd, tracing for export or compilation) the layer runs as ``conv2d`` followed by ``relu``.
"""

from __future__ import annotations

import functools
import itertools
import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .errors import is_out_of_memory

__all__ = ["ConvAct", "fuse", "fold_batchnorm", "fuse_activations", "input_splits", "onednn_available"]

logger = logging.getLogger(__name__)


def fuse(model: nn.Module, *, inplace: bool = True, device: str | torch.device | None = None) -> nn.Module:
    """:meth:`fcn_zoo.FCN.fuse`: ``model`` fused in place, or (``inplace=False``) a fused inference copy of it
    on ``device``, ``model`` left untouched. On a GPU the fused model is also channels_last: the layout tensor
    cores run fastest (a fused model is for inference only, and is never saved)."""
    from ._inference import device_of, inference_copy

    if not inplace:
        copied = inference_copy(model, device)
        return copied if getattr(copied, "_fused", False) else fuse(copied)
    if device is not None:
        raise ValueError("fuse(device=...) applies to inplace=False; move the model with .to() first")
    if getattr(model, "_fused", False):
        return model
    with torch.inference_mode(False), torch.no_grad():  # the new weights are ordinary tensors even when
        fold_batchnorm(model.eval())  # fuse() is called under inference mode
        fuse_activations(model)
    model.eval()  # the fused layers too: an eval model is never switched by predict (threads may share it)
    model.requires_grad_(False)
    if device_of(model).type == "cuda":
        model.to(memory_format=torch.channels_last)
    model._fused = True
    return model


@functools.cache
def onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this PyTorch build has the oneDNN fused convolution operators; for bf16, whether this CPU also
    has bf16 instructions (AMX, AVX512-BF16), without which oneDNN refuses bf16 convolutions."""
    has_ops = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    return has_ops and (dtype != torch.bfloat16 or cpu_has_bf16())


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 natively (AVX512-BF16 or AMX). oneDNN's own query,
    ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``, answers True on any AVX-512 CPU, which emulates bf16."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


SPLIT_BYTES = 12 << 20


def input_splits(weight: torch.Tensor) -> int:
    """Into how many input-channel slices a convolution is split so that each slice's weights are at most
    ``SPLIT_BYTES``: oneDNN runs a convolution whose weights far exceed the caches (FCN's head, 2048 -> 512
    channels 3x3, 38 MB) at ~90% of the matmul rate, and its four 512-channel slices, summed by post-ops,
    at ~100% (benchmarks/RESULTS.md). Only splits into equal slices of a multiple of 64 channels."""
    c_out, c_in = weight.shape[:2]
    nbytes = weight.numel() * weight.element_size()
    for splits in range(max(1, -(-nbytes // SPLIT_BYTES)), c_in // 64 + 1):
        if c_in % splits == 0 and (c_in // splits) % 64 == 0:
            return splits
    return 1


class ConvAct(nn.Module):
    """``relu(conv(x) + residual)``, ``relu(conv(x))`` or ``conv(x)``: a 2-D convolution and what follows it.

    On CPU the weight is packed once per dtype into oneDNN's layout, on first use: a fused model's weights
    are fixed (``fuse()`` is for models whose weights are final). Where oneDNN's kernel fails, this layer
    runs ``conv2d`` + ``relu`` from then on (the failure is logged once per message); no other layer or
    model is affected.
    """

    def __init__(self, conv: nn.Conv2d, relu: bool, residual: bool = False):
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("ConvAct supports zero padding given as numbers only")
        self.weight = conv.weight
        self.bias = conv.bias
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.relu = relu
        self.residual = residual
        self._packed: dict[torch.dtype, tuple[tuple, tuple[list[torch.Tensor], torch.Tensor | None]]] = {}
        self._failed: set[torch.dtype] = set()  # dtypes whose oneDNN kernel failed for this layer

    def extra_repr(self) -> str:
        c_out, c_in, kh, kw = self.weight.shape
        ops = ["conv"] + (["+ residual"] if self.residual else []) + (["relu"] if self.relu else [])
        return (f"{c_in * self.groups}, {c_out}, kernel_size=({kh}, {kw}), stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}: {' '.join(ops)}")

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if (residual is None) == self.residual:
            raise TypeError("this layer " + ("needs" if self.residual else "takes no") + " residual input")
        dtype = self._onednn_dtype(x, residual)
        if dtype is not None:
            try:
                return self._onednn_forward(x, residual, dtype)
            except RuntimeError as e:  # these operators are internal to PyTorch: if one fails on this CPU
                if is_out_of_memory(e):
                    raise  # not the kernel's fault: the caller decides (predict suggests mode='slide')
                self._failed.add(dtype)  # or build, this layer runs the plain path from then on
                _warn_once(f"oneDNN fused convolution failed ({e}); running conv2d + relu instead")
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if residual is not None:
            y += residual
        return F.relu(y, inplace=True) if self.relu else y

    def _onednn_forward(self, x: torch.Tensor, residual: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        geometry = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
        unary = "relu" if self.relu else "none"
        weights, bias = self._packed_weights(x, dtype)
        x = x.to(dtype)  # under bf16 autocast: as autocast would cast it
        if residual is not None:
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, residual.to(dtype), weights[0], bias, *geometry, "add", 1.0, unary, [], ""
            )
        if len(weights) == 1:
            return torch.ops.mkldnn._convolution_pointwise(x, weights[0], bias, *geometry, unary, [], "")
        # split over input channels: each slice's convolution adds onto the sum so far (a fused post-op)
        width = x.shape[1] // len(weights)
        parts = [part.contiguous(memory_format=torch.channels_last) for part in x.split(width, dim=1)]
        y = torch.ops.mkldnn._convolution_pointwise(parts[0], weights[0], bias, *geometry, "none", [], "")
        for i in range(1, len(weights)):
            last = i == len(weights) - 1  # the binary operator takes no unary "none": None, where no ReLU follows
            y = torch.ops.mkldnn._convolution_pointwise.binary(
                parts[i], y, weights[i], None, *geometry, "add", 1.0, "relu" if last and self.relu else None, [], ""
            )
        return y

    def _onednn_dtype(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.dtype | None:
        """The dtype of oneDNN's fused kernel for this call: float32, bfloat16 under CPU bf16 autocast (the
        weights then kept in bf16 too, not cast at each call), or ``None`` for plain conv2d + relu."""
        if not (
            x.device.type == "cpu"
            and self.weight.device.type == "cpu"  # else conv2d raises torch's own device error
            and self.weight.dtype == torch.float32
            and x.dim() == 4
            and x.shape[1] == self.weight.shape[1] * self.groups  # else conv2d raises its own error
            and (residual is None or (residual.dtype == x.dtype and residual.layout == torch.strided))
            and x.layout == torch.strided
            and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
            and not torch.compiler.is_compiling()
        ):
            return None
        if not torch.is_autocast_enabled("cpu"):
            dtype = torch.float32 if x.dtype == torch.float32 else None
        elif torch.get_autocast_dtype("cpu") == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16):
            dtype = torch.bfloat16
        else:
            dtype = None
        return dtype if dtype is not None and dtype not in self._failed and onednn_available(dtype) else None

    def _packed_weights(self, x: torch.Tensor, dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The weight in oneDNN's blocked layout and ``dtype``, and the bias in ``dtype``, made once per set
        of weights and dtype (after ``.to()`` or an in-place edit, again); the weight split over input
        channels into slices of at most ``SPLIT_BYTES`` (see :func:`input_splits`)."""
        w = self.weight
        key = (w.data_ptr(), w.device, _version(w))
        cached = self._packed.get(dtype)
        if cached is None or cached[0] != key:
            splits = input_splits(w) if not self.residual and self.groups == 1 else 1
            width = w.shape[1] // splits
            packed = [
                torch.ops.mkldnn._reorder_convolution_weight(
                    part.to(dtype).contiguous(), list(self.padding), list(self.stride), list(self.dilation),
                    self.groups, [x.shape[0], width, *x.shape[2:]],
                )
                for part in w.detach().split(width, dim=1)
            ]
            bias = None if self.bias is None else self.bias.detach().to(dtype)
            cached = self._packed[dtype] = (key, (packed, bias))
        return cached[1]

    def _apply(self, fn, recurse=True):
        self._packed = {}
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = {}
        return super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):  # deepcopy and pickle: the packed weight is a cache, rebuilt on first use
        return {**super().__getstate__(), "_packed": {}}


_warned: set[str] = set()  # messages already logged: one line for a failure every layer meets


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def _version(t: torch.Tensor) -> int:
    """The tensor's in-place edit counter (0 for inference tensors, which have none): ``.to()`` and
    ``load_state_dict`` on a fused model repack its weights; writes through ``.data`` are not seen."""
    try:
        return t._version
    except RuntimeError:
        return 0


class FusedBottleneck(nn.Module):
    """timm's ``Bottleneck`` (or ``BasicBlock``, with two convolutions) with BatchNorm folded: the ReLUs and
    the residual addition are post-ops of the convolutions."""

    def __init__(self, convs: list[nn.Conv2d], downsample: nn.Module | None):
        super().__init__()
        self.convs = nn.Sequential(*[ConvAct(c, relu=True) for c in convs[:-1]])
        self.last = ConvAct(convs[-1], relu=True, residual=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.last(self.convs(x), shortcut)


def fold_batchnorm(model: nn.Module) -> None:
    """Replace each eval-mode (conv, BatchNorm) pair by the conv with the BatchNorm folded in, in place."""
    for parent in list(model.modules()):
        children = dict(parent.named_children())
        if isinstance(parent, nn.Sequential):
            pairs = list(itertools.pairwise(children))
        else:  # timm's ResNet blocks and stem: convN followed by bnN
            pairs = [(f"conv{n[2:]}", n) for n in children if n.startswith("bn") and f"conv{n[2:]}" in children]
        for conv_name, bn_name in pairs:
            conv, bn = children[conv_name], children[bn_name]
            if isinstance(conv, nn.Sequential) and len(conv):  # a deep stem: its last layer feeds bn1
                conv_name, parent_of_conv, conv = str(len(conv) - 1), conv, conv[-1]
            else:
                parent_of_conv = parent
            # SyncBatchNorm (multi-GPU training) in eval mode is the same affine map
            if type(conv) is nn.Conv2d and type(bn) in (nn.BatchNorm2d, nn.SyncBatchNorm) and bn.track_running_stats:
                setattr(parent_of_conv, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(parent, bn_name, nn.Identity())


def fuse_activations(model: nn.Module) -> None:
    """After :func:`fold_batchnorm`: make each ReLU, and each ResNet block's residual addition, a post-op of
    the convolution before it, in place."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            block = _as_fused_block(child)
            if block is not None:
                setattr(parent, name, block)
        # nn.Sequential, and timm's feature extractors (a ModuleDict whose forward runs its entries in order)
        if isinstance(parent, nn.Sequential) or type(parent).__name__ in ("FeatureListNet", "FeatureDictNet"):
            _fuse_sequence(parent)


def _as_fused_block(block: nn.Module) -> FusedBottleneck | None:
    """A timm ResNet ``Bottleneck``/``BasicBlock`` whose BatchNorms are folded and that has nothing but
    convolutions and ReLUs on its main path."""
    names = {"Bottleneck": ("conv1", "conv2", "conv3"), "BasicBlock": ("conv1", "conv2")}.get(type(block).__name__)
    if names is None or not type(block).__module__.startswith("timm."):
        return None
    convs = [getattr(block, n, None) for n in names]
    acts = [getattr(block, f"act{i}", None) for i in range(1, len(names) + 1)]
    passive = [getattr(block, n, None) for n in ("bn1", "bn2", "bn3", "drop_block", "aa", "se", "drop_path")]
    if (
        all(type(c) is nn.Conv2d and c.padding_mode == "zeros" for c in convs)
        and all(type(a) is nn.ReLU for a in acts)
        and all(p is None or type(p) is nn.Identity for p in passive)
    ):
        return FusedBottleneck(convs, block.downsample)
    return None


def _fuse_sequence(parent: nn.Module) -> None:
    """In a module that runs its children in order: conv, [Identity...], ReLU -> ConvAct(relu), Identity.
    A child that is a Sequential ending in a conv (timm's deep stem) counts as that conv."""
    children = list(parent.named_children())
    for i, (name, child) in enumerate(children):
        owner, conv_name, conv = parent, name, child
        if isinstance(child, nn.Sequential) and len(child) and type(child[-1]) is nn.Conv2d:
            owner, conv_name, conv = child, str(len(child) - 1), child[-1]
        if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            continue
        j = i + 1
        while j < len(children) and type(children[j][1]) is nn.Identity:
            j += 1
        if j < len(children) and type(children[j][1]) is nn.ReLU:
            setattr(owner, conv_name, ConvAct(conv, relu=True))
            setattr(parent, children[j][0], nn.Identity())
        else:
            setattr(owner, conv_name, ConvAct(conv, relu=False))
