"""FCN: a timm ResNet backbone, an FCN head on its last stage and an auxiliary head on the stage before.

The module layout follows the reference implementation (sssegmentation) so that its checkpoints map onto
this model by renaming keys alone. torchvision's FCN is the same model with ``backbone="resnet50"``,
``num_convs=1`` and ``aux_channels=256``; mmsegmentation's with ``concat_input=True`` and ``aux_channels=256``.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin, constants, hf_hub_download
from torch import nn

from ._files import clear_for_save
from .errors import WeightsError
from .weights import load_weights
from .zoo import DATASETS, IMAGENET_MEAN, IMAGENET_STD, folder_metadata

__all__ = ["FCN", "FCNHead"]


class FCNHead(nn.Sequential):
    """``num_convs`` x (conv3x3 -> BN -> ReLU), Dropout2d, conv1x1 to ``num_classes``.

    With ``num_convs=2`` the layer indices are those of the reference's ``decoder`` (0, 1, 3, 4, 7);
    with ``num_convs=1`` those of torchvision's ``FCNHead`` and of the auxiliary heads (0, 1, 4).
    ``concat_input=True`` (mmsegmentation's head) adds a conv3x3 -> BN -> ReLU over the concatenation of
    the head's input and the convs' output, before the dropout.
    """

    def __init__(
        self, in_channels: int, channels: int, num_classes: int, num_convs: int = 2, dropout: float = 0.1,
        concat_input: bool = False,
    ):
        layers: list[nn.Module] = []
        for i in range(num_convs):
            layers += _conv_bn_relu(in_channels if i == 0 else channels, channels)
        if concat_input:
            layers += _conv_bn_relu(in_channels + channels, channels)
        layers += [nn.Dropout2d(dropout), nn.Conv2d(channels if num_convs else in_channels, num_classes, 1)]
        super().__init__(*layers)
        self.num_convs = num_convs
        self.concat_input = concat_input and num_convs > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.concat_input:
            return super().forward(x)
        layers = list(self)  # slicing the Sequential would build an FCNHead without its arguments
        y = x
        for layer in layers[:3 * self.num_convs]:
            y = layer(y)
        y = torch.cat([x, y], dim=1)
        for layer in layers[3 * self.num_convs:]:
            y = layer(y)
        return y

    @property
    def classifier(self) -> nn.Conv2d:
        """The final 1x1 convolution, the only layer whose shape depends on the number of classes."""
        return self[-1]


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
    return [conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class FCN(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="fcn-zoo",
    pipeline_tag="image-segmentation",
    license="apache-2.0",
    tags=["semantic-segmentation", "fcn", "timm"],
    paper_url="https://arxiv.org/abs/1411.4038",
):
    """Fully convolutional network for semantic segmentation (Long et al., 2015), reference variant.

    Args:
        num_classes: number of output classes.
        backbone: a timm ResNet name (``resnet50c``/``resnet101c`` are the reference's V1c ResNets).
        output_stride: 8 or 16; the last stages are dilated instead of strided.
        head_channels: width of the FCN head's convolutions.
        num_convs: number of conv3x3-BN-ReLU blocks in the head.
        concat_input: mmsegmentation's variant: one more conv3x3-BN-ReLU over [input, convs output].
        aux_channels: width of the auxiliary head on the second-to-last stage; ``None`` for no auxiliary head.
        dropout: Dropout2d probability before each classifier.
        dataset: the dataset the weights were trained on (a key of ``fcn_zoo.zoo.DATASETS``), if any;
            it supplies what the arguments below leave out.
        class_names: one name per class.
        palette: one ``(R, G, B)`` colour per class.
        mean: the per-channel mean of RGB values in 0..255, subtracted first.
        std: the per-channel standard deviation the difference is divided by.
        eval_size: the ``(long, short)`` bound of the evaluation resize (keeping the aspect ratio).
        crop_size: the training crop ``(height, width)``, also the window of sliding-window inference.

    Whatever neither these arguments nor ``dataset`` give has a generic default (``class_<i>`` names, the
    VOC colour map, ImageNet normalisation, ``(2048, 512)``, ``(512, 512)``). ``save_pretrained`` writes
    them all to ``config.json``, so a folder describes its model without the zoo's table.

    ``forward(x)`` takes a normalised float tensor ``(N, 3, H, W)`` and returns logits ``(N, C, H, W)``
    upsampled bilinearly (``align_corners=False``); in training mode it returns ``(logits, aux_logits)``,
    ``aux_logits`` being ``None`` for a model without an auxiliary head. The module is plain in every mode:
    it computes what its layers say, and nothing is cached between calls. :meth:`fuse` is the fast path,
    explicit (see "When is it fast" in the Python API docs, docs/python.md).
    """

    def __init__(
        self,
        num_classes: int = 21,
        backbone: str = "resnet50c",
        output_stride: int = 8,
        head_channels: int = 512,
        num_convs: int = 2,
        concat_input: bool = False,
        aux_channels: int | None = 512,
        dropout: float = 0.1,
        dataset: str | None = None,
        class_names: list[str] | None = None,
        palette: list[list[int]] | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        eval_size: list[int] | None = None,
        crop_size: list[int] | None = None,
    ):
        super().__init__()
        import timm  # deferred: timm takes seconds to import and `import fcn_zoo` must stay fast

        if not whole_number(num_classes, 1, MAX_CLASSES):
            raise ValueError(f"num_classes must be an integer from 1 to {MAX_CLASSES}, got {num_classes!r}")
        for name, value in (("head_channels", head_channels), ("aux_channels", aux_channels)):
            if not (whole_number(value, 1) or (name == "aux_channels" and value is None)):
                raise ValueError(f"{name} must be a positive integer{' or None' if name == 'aux_channels' else ''}, got {value!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
        if dataset is not None and dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)} (or None)")
        if not isinstance(num_convs, int) or num_convs < 0 or (concat_input and num_convs == 0):
            raise ValueError(f"num_convs must be an integer >= 0 (>= 1 with concat_input=True, which joins the head's "
                             f"input to its convolutions' output), got {num_convs!r}")
        if not isinstance(backbone, str) or not timm.is_model(backbone):
            raise ValueError(f"unknown timm backbone {backbone!r}; use a timm ResNet such as 'resnet50c'")
        self.num_classes = num_classes
        self.output_stride = output_stride
        self.dataset = dataset
        known = DATASETS[dataset] if dataset is not None else None
        same_classes = known is not None and known.num_classes == num_classes
        self.class_names = _names(class_names, num_classes) if class_names is not None else (
            list(known.classes) if same_classes else [f"class_{i}" for i in range(num_classes)]
        )
        self.palette = _colours(palette, num_classes) if palette is not None else (
            list(known.palette) if same_classes else [_bit_palette(i) for i in range(num_classes)]
        )
        self.mean = _floats(mean, "mean") if mean is not None else (known.mean if known else IMAGENET_MEAN)
        self.std = _floats(std, "std") if std is not None else (known.std if known else IMAGENET_STD)
        self.eval_size = _pair(eval_size, "eval_size") if eval_size is not None else (known.eval_size if known else (2048, 512))
        self.crop_size = _pair(crop_size, "crop_size") if crop_size is not None else (known.crop_size if known else (512, 512))
        self.backbone = timm.create_model(
            backbone, pretrained=False, features_only=True, output_stride=output_stride, out_indices=(3, 4)
        )
        aux_in, in_channels = self.backbone.feature_info.channels()
        self.decode_head = FCNHead(in_channels, head_channels, num_classes, num_convs, dropout, concat_input)
        self.auxiliary_head = (
            FCNHead(aux_in, aux_channels, num_classes, 1, dropout) if aux_channels is not None else None
        )

    def hub_config(self) -> dict:
        """What ``save_pretrained`` writes to ``config.json``: the architecture, and the class names, palette,
        normalisation and evaluation sizes, so that the folder is read the same way without the zoo's table."""
        return {
            **(self._hub_mixin_config or {}),
            "num_classes": self.num_classes,
            "output_stride": self.output_stride,
            "dataset": self.dataset,
            **folder_metadata(self.class_names, self.palette, self.mean, self.std, self.eval_size, self.crop_size),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        size = x.shape[-2:]
        aux_features, features = self.backbone(x)
        logits = F.interpolate(self.decode_head(features), size=size, mode="bilinear", align_corners=False)
        if not self.training:
            return logits
        if self.auxiliary_head is None:
            return logits, None
        return logits, F.interpolate(self.auxiliary_head(aux_features), size=size, mode="bilinear", align_corners=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the backbone's resolution ``(N, C, H / output_stride, W / output_stride)``, no auxiliary head."""
        return self.decode_head(self.backbone(x)[-1])

    def __getstate__(self) -> dict:
        # an onnxruntime session (fcn_zoo.export.onnx_session) is not part of the model
        return {k: v for k, v in self.__dict__.items() if k != "_onnx_session"}

    def fuse(self, *, inplace: bool = True, device: str | torch.device | None = None) -> "FCN":
        """Prepare this model for fast inference: fold every BatchNorm into the convolution before it, and (on
        CPU) run each convolution with its ReLU and residual addition as one oneDNN kernel.

        BatchNorm in eval mode is an affine map that costs a full pass over memory; folded into the
        convolution's weights and bias it costs nothing. The ReLUs and residual additions then become
        post-ops of the convolutions (see ``fcn_zoo._fusion``), in bf16 under CPU bf16 autocast; on other
        devices, and under autograd, those layers run as plain ``conv2d`` + ``relu``. On CPU an R-50 OS8
        forward gets 7-18% faster in fp32 (benchmarks/RESULTS.md); outputs change by float rounding only.

        A fused model is for inference with weights that are final: it cannot be trained or saved (save it
        first), its parameters no longer require gradients, and its convolutions keep their weights packed
        for oneDNN, so edit or load weights before fusing, never after.

        Args:
            inplace: ``True`` (default) rewrites this model and returns it; ``False`` leaves it untouched and
                returns a fused copy without the training-only auxiliary head (an inference snapshot).
            device: with ``inplace=False``, the device of the copy (default this model's).
        """
        from ._fusion import fuse

        return fuse(self, inplace=inplace, device=device)

    def train(self, mode: bool = True) -> "FCN":
        if mode and getattr(self, "_fused", False):
            raise RuntimeError("this FCN was fuse()d for inference and cannot be trained; load it again to train")
        return super().train(mode)

    def save_pretrained(
        self, save_directory: str | Path, *, mean_iou: float | None = None, eval_dataset: str | None = None,
        eval_split: str = "val", config: dict | None = None, model_card_kwargs: dict | None = None, **kwargs: Any,
    ):
        """Write ``config.json`` (architecture, class names, palette, normalisation, evaluation sizes),
        ``model.safetensors`` and a model card (``README.md``) to ``save_directory``.

        Args:
            mean_iou: the mIoU (%) you measured with these weights; it goes into the card's ``model-index``.
            eval_dataset: the dataset it was measured on (a Hub dataset id or a name), and ``eval_split`` its
                split; default the model's own dataset, if it has one.
            **kwargs: as ``huggingface_hub.ModelHubMixin.save_pretrained`` (``push_to_hub``, ``repo_id``, ...).
        """
        if getattr(self, "_fused", False):
            raise RuntimeError("this FCN was fuse()d for inference and cannot be saved; save it before fuse()")
        card = {"mean_iou": mean_iou, "eval_dataset": eval_dataset, "eval_split": eval_split, **(model_card_kwargs or {})}
        if kwargs.get("repo_id"):
            card.setdefault("repo_id", kwargs["repo_id"])
        self.generate_model_card(**card)  # a bad argument fails here, before anything is written
        return super().save_pretrained(save_directory, config=config or self.hub_config(), model_card_kwargs=card, **kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        from safetensors.torch import save_file

        path = Path(save_directory) / constants.SAFETENSORS_SINGLE_FILE
        clear_for_save(path.parent, (path.name,))
        # contiguous copies of the tensors that are not (a channels_last model, as GPUs train and run it): some
        # safetensors versions refuse strided tensors; the model itself keeps its memory format
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path), metadata={"format": "pt"})
        # safetensors creates the file readable by its owner only; give it the mode of the config and card
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(path, 0o666 & ~mask)

    def push_to_hub(
        self, repo_id: str, *, mean_iou: float | None = None, eval_dataset: str | None = None, eval_split: str = "val",
        model_card_kwargs: dict | None = None, **kwargs: Any,
    ) -> str:
        """Upload ``config.json``, ``model.safetensors`` and the model card to the Hub repo ``repo_id`` in one
        commit; ``mean_iou``, ``eval_dataset`` and ``eval_split`` as in :meth:`save_pretrained`."""
        card = {"mean_iou": mean_iou, "eval_dataset": eval_dataset, "eval_split": eval_split, "repo_id": repo_id,
                **(model_card_kwargs or {})}
        return super().push_to_hub(repo_id, model_card_kwargs=card, **kwargs)

    def generate_model_card(self, *args: Any, **kwargs: Any):
        """This model's card (:func:`fcn_zoo.cards.model_card`): usage, classes, architecture, results, provenance."""
        from .cards import model_card

        return model_card(self.hub_config(), num_params=_inference_params(self), **kwargs)

    def predict(self, images, **kwargs):
        """Segment one image or a list of them; see :func:`fcn_zoo.predict.predict` for the options.

        An image is a path, a PIL image, an RGB uint8 ``(H, W, 3)`` array or a ``(3, H, W)`` tensor. Arrays
        are read as RGB: an OpenCV ``cv2.imread`` array is BGR and silently gives worse masks; pass
        ``img[..., ::-1]``."""
        from .predict import predict

        return predict(self, images, **kwargs)

    def predict_iter(self, images, **kwargs):
        """Segment an iterable of images lazily, in order, reading ahead while the network runs: yields
        ``(image, Segmentation)``; see :func:`fcn_zoo.predict.predict_iter` for the options."""
        from .predict import predict_iter

        return predict_iter(self, images, **kwargs)

    # --- Hub mixin: strict loading, no prints -------------------------------------------------------

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        strict: bool = True,
        new_classes: bool = False,
        proxies: Any = None,  # what huggingface_hub 0.x passes on (1.0 dropped both); not model arguments
        resume_download: Any = None,
        **model_kwargs: Any,
    ) -> "FCN":
        if Path(model_id).is_dir():
            model_file = Path(model_id) / constants.SAFETENSORS_SINGLE_FILE
        else:
            model_file = hf_hub_download(
                repo_id=model_id,
                filename=constants.SAFETENSORS_SINGLE_FILE,
                revision=revision,
                cache_dir=cache_dir,
                force_download=force_download,
                token=token,
                local_files_only=local_files_only,
            )
        try:
            with torch.device("meta"):  # no random initialisation of weights the file replaces at once
                model = cls(**model_kwargs)
        except (ValueError, TypeError, RuntimeError) as e:
            raise WeightsError(f"{model_id}: config.json does not describe a valid FCN: {e}") from e
        load_weights(model, model_file, strict=strict, map_location=map_location, new_classes=new_classes)
        return model.eval()


def _inference_params(model: FCN) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith("auxiliary_head."))


def _names(names, num_classes: int) -> list[str]:
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"class_names must be a list of strings, got {names!r:.80}")
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} names but num_classes is {num_classes}")
    return list(names)


def _colours(palette, num_classes: int) -> list[tuple[int, int, int]]:
    colours = [tuple(c) for c in palette]
    if len(colours) != num_classes:
        raise ValueError(f"palette has {len(colours)} colours but num_classes is {num_classes}")
    for c in colours:
        if len(c) != 3 or not all(whole_number(v, 0, 255) for v in c):
            raise ValueError(f"palette colours must be three integers in 0..255, got {list(c)}")
    return colours


def _floats(values, what: str) -> tuple[float, float, float]:
    if len(values) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{what} must be three numbers (R, G, B), got {values!r}")
    if what == "std" and min(values) <= 0:
        raise ValueError(f"std must be positive, got {values!r}")
    return tuple(float(v) for v in values)


#: The most classes a model may have: a label map's 16-bit PNG (Segmentation.save) holds 65,536.
MAX_CLASSES = 65536


def whole_number(value, least: int = 0, most: int | None = None) -> bool:
    """Whether ``value`` is an integer (not a bool) from ``least`` to ``most``: what a count or a size must be."""
    return (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= least
            and (most is None or value <= most))


#: The largest eval_size or crop_size side a config may ask for: 8192 x 8192 already needs tens of GB of
#: activations, and every photo is resized to the eval size, so a larger one only runs out of memory.
MAX_SIDE = 8192


def _pair(values, what: str) -> tuple[int, int]:
    if len(values) != 2 or not all(whole_number(v, 1, MAX_SIDE) for v in values):
        raise ValueError(f"{what} must be two integers from 1 to {MAX_SIDE}, got {values!r}")
    return int(values[0]), int(values[1])


def _bit_palette(i: int) -> tuple[int, int, int]:
    """The PASCAL VOC colour map: class bits spread over the high bits of R, G and B."""
    r = g = b = 0
    for shift in range(7, -1, -1):
        r |= ((i >> 0) & 1) << shift
        g |= ((i >> 1) & 1) << shift
        b |= ((i >> 2) & 1) << shift
        i >>= 3
    return r, g, b
