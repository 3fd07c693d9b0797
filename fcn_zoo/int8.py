"""An FCN quantized to int8 (:func:`fcn_zoo.quantization.quantize` makes one): an OpenVINO model run on the CPU,
called, predicted with, saved and shared like :class:`fcn_zoo.FCN`.

A folder holds ``config.json`` (the fp32 model's, plus a ``quantization`` entry: the engine and its
version, what it was calibrated on, the agreement measured with the fp32 model), ``openvino_model.xml`` +
``openvino_model.bin`` (the int8 network: ``forward_features``) and a model card. OpenVINO's IR runs on any
x86 CPU; int8 is fastest where the CPU has int8 dot products (AVX512-VNNI, AVX-VNNI or AMX); on the others
it runs with less speed-up, and a warning says so.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import ModelHubMixin, snapshot_download
from torch import nn

from ._files import INT8_FILES, clear_for_save, is_quantized_config
from .errors import FCNZooError, WeightsError

__all__ = ["QuantizedFCN", "INT8_FILES", "is_quantized_config", "openvino_or_error", "cpu_has_int8_dot"]

logger = logging.getLogger(__name__)

def openvino_or_error(what: str):
    """The ``openvino`` module, or one line saying how to install it."""
    try:
        import openvino
    except ImportError as e:
        raise FCNZooError(f"{what} needs OpenVINO: pip install 'fcn-zoo[int8]'") from e
    return openvino


def cpu_has_int8_dot() -> bool:
    """Whether this CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX), where int8 is fastest."""
    try:
        found = torch.cpu.get_capabilities()  # cpuinfo's flags; torch.cpu._is_vnni_supported() sees AVX512-VNNI only
    except AttributeError:  # an older torch: its own queries
        try:
            return bool(torch.cpu._is_vnni_supported() or torch.cpu._is_amx_tile_supported())
        except AttributeError:  # none at all: say nothing rather than guess
            return True
    return any(found.get(flag) for flag in ("avx512_vnni", "avx_vnni", "avx_vnni_int8", "amx_int8"))


class QuantizedFCN(
    nn.Module,
    ModelHubMixin,
    library_name="fcn-zoo",
    pipeline_tag="image-segmentation",
    license="apache-2.0",
    tags=["semantic-segmentation", "fcn", "int8", "openvino"],
):
    """An FCN's int8 version, run by OpenVINO on the CPU.

    Called like the model: ``q(x)`` takes a normalised float tensor ``(N, 3, H, W)`` and returns logits
    ``(N, C, H, W)`` (``q.forward_features(x)``: at the backbone's resolution); ``predict``,
    ``predict_iter``, ``save_pretrained`` and ``push_to_hub`` as :class:`fcn_zoo.FCN`'s, and
    :func:`fcn_zoo.from_pretrained` loads its folder. It has the model's ``num_classes``, ``class_names``,
    ``palette``, ``mean``, ``std``, ``eval_size`` and ``crop_size``; it has no weights to train or edit.

    Args:
        network: an ``openvino.Model`` (the int8 ``forward_features``) or the path of its ``.xml``.
        config: the fp32 model's ``config.json`` with a ``quantization`` entry.
    """

    _fused = True  # its own fast form already: fuse() and the engine leave it as it is

    def __init__(self, network, config: dict):
        super().__init__()
        from .model import FCN

        if not is_quantized_config(config):
            raise ValueError("config has no 'quantization' entry: not an int8 model's config")
        openvino = openvino_or_error("an int8 model")
        architecture = {k: v for k, v in config.items() if k != "quantization"}
        with torch.device("meta"):  # the fp32 model's reading of its config, without its weights
            spec = FCN(**architecture)
        self.config = config
        self.num_classes, self.output_stride, self.dataset = spec.num_classes, spec.output_stride, spec.dataset
        self.class_names, self.palette, self.mean, self.std = spec.class_names, spec.palette, spec.mean, spec.std
        self.eval_size, self.crop_size = spec.eval_size, spec.crop_size
        core = openvino.Core()
        self.network = core.read_model(str(network)) if isinstance(network, (str, Path)) else network
        self._compiled = core.compile_model(self.network, "CPU", {"PERFORMANCE_HINT": "LATENCY"})
        self._requests = threading.local()  # an infer request serves one thread at a time
        self.weights_sha256 = _network_sha256(self.network)

    @property
    def quantization(self) -> dict:
        """What ``config.json`` says of the quantization: engine, versions, calibration, agreement."""
        return self.config["quantization"]

    @property
    def inference_precision(self) -> str:
        """The precision OpenVINO runs what is not int8 in on this CPU (``f32``, or ``bf16`` where it is native)."""
        return self._compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()

    def hub_config(self) -> dict:
        """What ``save_pretrained`` writes to ``config.json``."""
        return self.config

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the backbone's resolution ``(N, C, H / output_stride, W / output_stride)``, float32."""
        if x.device.type != "cpu":
            raise ValueError(f"an int8 model runs on the CPU; the input is on {x.device}")
        request = getattr(self._requests, "request", None)
        if request is None:
            request = self._requests.request = self._compiled.create_infer_request()
        request.infer({0: x.detach().float().contiguous().numpy()}, share_inputs=True)  # read in place: no copy
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.forward_features(x), size=x.shape[-2:], mode="bilinear", align_corners=False)

    def __reduce__(self):
        # Ray and multiprocessing pickle their arguments: the network goes as its IR (xml and weights), compiled anew
        openvino = openvino_or_error("pickling an int8 model")
        with tempfile.TemporaryDirectory() as tmp:
            openvino.save_model(self.network, str(Path(tmp) / INT8_FILES[0]), compress_to_fp16=False)
            files = tuple((Path(tmp) / name).read_bytes() for name in INT8_FILES)
        return _unpickled, (files, self.config)

    def __deepcopy__(self, memo) -> "QuantizedFCN":
        # OpenVINO's compiled model does not copy: the copy compiles its own from the same network and config
        return QuantizedFCN(self.network.clone(), copy.deepcopy(self.config, memo)).train(False)

    def train(self, mode: bool = True) -> "QuantizedFCN":
        if mode:
            raise RuntimeError("an int8 model is for inference; train the fp32 model, then quantize it")
        return super().train(False)

    def fuse(self, *, inplace: bool = True, device: str | torch.device | None = None) -> "QuantizedFCN":
        """Itself: an int8 model is its own fast form (and is only ever read, so it serves as its own copy)."""
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(f"an int8 model runs on the CPU, not {device}")
        return self

    def predict(self, images, **kwargs):
        """Segment one image or a list of them; see :func:`fcn_zoo.predict.predict`."""
        from .predict import predict

        return predict(self, images, **kwargs)

    def predict_iter(self, images, **kwargs):
        """Segment an iterable of images lazily; see :func:`fcn_zoo.predict.predict_iter`."""
        from .predict import predict_iter

        return predict_iter(self, images, **kwargs)

    def generate_model_card(self, *args: Any, repo_id: str | None = None, **kwargs: Any):
        """The card of the int8 folder: what it was made from and calibrated on, its measured agreement."""
        return int8_card(self.config, repo_id)

    def _save_pretrained(self, save_directory: Path) -> None:
        openvino = openvino_or_error("saving an int8 model")
        clear_for_save(Path(save_directory), INT8_FILES)
        # weights stay int8 as they are; compressing the rest to fp16 would change the answers
        openvino.save_model(self.network, str(Path(save_directory) / INT8_FILES[0]), compress_to_fp16=False)

    def save_pretrained(self, save_directory, *, config: dict | None = None, **kwargs: Any):
        """Write ``config.json``, the OpenVINO int8 network and a model card to ``save_directory``;
        ``**kwargs`` as ``huggingface_hub.ModelHubMixin.save_pretrained`` (``push_to_hub``, ``repo_id``...)."""
        return super().save_pretrained(save_directory, config=config or self.config, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Upload the folder :meth:`save_pretrained` writes to the Hub repo ``repo_id`` in one commit."""
        kwargs.setdefault("model_card_kwargs", {}).setdefault("repo_id", repo_id)
        kwargs.setdefault("config", self.config)  # save_pretrained(push_to_hub=True) passes its own
        return super().push_to_hub(repo_id, **kwargs)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision=None, cache_dir=None, force_download=False,
                         local_files_only=False, token=None, config: dict | None = None, **kwargs: Any):
        if Path(model_id).is_dir():
            folder = Path(model_id)
        else:
            folder = Path(snapshot_download(
                model_id, revision=revision, cache_dir=cache_dir, force_download=force_download, token=token,
                local_files_only=local_files_only, allow_patterns=["config.json", *INT8_FILES, "README.md"],
            ))
        if config is None:
            config = json.loads((folder / "config.json").read_text())
        return load_int8(folder, config)


def _unpickled(files: tuple[bytes, bytes], config: dict) -> QuantizedFCN:
    with tempfile.TemporaryDirectory() as tmp:  # the network is read and compiled before the files go
        for name, data in zip(INT8_FILES, files):
            (Path(tmp) / name).write_bytes(data)
        return QuantizedFCN(Path(tmp) / INT8_FILES[0], config).train(False)


def load_int8(folder: Path, config: dict) -> QuantizedFCN:
    """The int8 model of ``folder``, or one line saying what to do when this OpenVINO cannot read it."""
    openvino = openvino_or_error(f"{folder} (an int8 model)")
    made_with = config["quantization"].get("openvino", "?")
    missing = [name for name in INT8_FILES if not (folder / name).is_file()]
    if missing:
        raise WeightsError(f"{folder}: an int8 model's folder, but {' and '.join(missing)} is missing")
    from .model import FCN

    try:
        with torch.device("meta"):
            FCN(**{k: v for k, v in config.items() if k != "quantization"})
    except (ValueError, TypeError) as e:
        raise WeightsError(f"{folder}: config.json does not describe a valid FCN: {e}") from e
    try:
        model = QuantizedFCN(folder / INT8_FILES[0], config)
    except (RuntimeError, ValueError, TypeError) as e:  # OpenVINO's read and compile errors are RuntimeErrors
        # OpenVINO's message ends with the reason, after the lines that say where in its sources it was found
        why = next((line.strip() for line in reversed(str(e).splitlines()) if line.strip()), type(e).__name__)
        installed = openvino.__version__.split("-")[0]
        if _version(made_with) > _version(installed):
            raise WeightsError(f"{folder}: this OpenVINO ({installed}) cannot run the int8 model made with OpenVINO "
                               f"{made_with} ({why}); install openvino>={made_with}, or quantize the fp32 model "
                               "again with this one") from e
        raise WeightsError(f"{folder}: OpenVINO cannot read its int8 network ({why}); the files may be damaged: "
                           "download or copy the folder again, or quantize the fp32 model again") from e
    if not cpu_has_int8_dot():
        logger.warning("this CPU has no int8 dot-product instructions (VNNI, AMX): %s runs with less speed-up than "
                       "where it was measured, and its 8-bit sums may saturate (answers further from fp32's than its "
                       "card says); compare it with the fp32 model here", folder)
    return model.eval()


def _version(text) -> tuple[int, ...]:
    """``"2025.1.0"`` as ``(2025, 1, 0)``; what is not a number counts as 0."""
    return tuple(int(part) if part.isdigit() else 0 for part in str(text).split("-")[0].split("."))


def int8_card(config: dict, repo_id: str | None = None):
    """A ``huggingface_hub.ModelCard``: the model, how it was quantized and calibrated, what it agrees with."""
    from huggingface_hub import ModelCard, ModelCardData

    q = config["quantization"]
    calibration, agreement = q.get("calibration", {}), q.get("agreement", {})
    name = repo_id or "FOLDER"
    data = ModelCardData(library_name="fcn-zoo", pipeline_tag="image-segmentation", license="apache-2.0",
                         tags=["semantic-segmentation", "fcn", "int8", "openvino"])
    lines = [
        f"# {q.get('source', 'FCN')}, int8",
        "",
        f"The int8 version of `{q.get('source', 'an FCN')}` ({config.get('num_classes')} classes), quantized by "
        f"NNCF {q.get('nncf', '?')} post-training quantization (preset {q.get('preset', 'performance')}) and run by "
        f"OpenVINO {q.get('openvino', '?')} on the CPU.",
        "",
        "## Calibration",
        "",
        f"{calibration.get('images', '?')} images from {calibration.get('source', '?')}, each resized and normalised "
        "as the model evaluates it" + (f"; {calibration['skipped']} unreadable images skipped." if calibration.get("skipped") else "."),
        "",
        "## Agreement with the fp32 model",
        "",
    ]
    if agreement:
        where = "held-out images" if agreement.get("held_out") else "its calibration images (none held out)"
        lines.append(f"On {agreement['images']} {where}: the int8 labels agree with the fp32 model's on "
                     f"{100 * agreement['pixels']:.2f}% of pixels.")
        if agreement.get("miou_fp32") is not None:
            lines.append(f"mIoU against their masks: fp32 {agreement['miou_fp32']:.2f}, int8 {agreement['miou_int8']:.2f} "
                         f"({agreement['miou_int8'] - agreement['miou_fp32']:+.2f} points).")
        lines.append(f"Measured on {agreement.get('cpu', 'a CPU')}, OpenVINO inference precision "
                     f"{agreement.get('inference_precision', '?')}.")
    else:
        lines.append("Not measured.")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import fcn_zoo  # pip install 'fcn-zoo[int8]'",
        "",
        f'model = fcn_zoo.from_pretrained("{name}")',
        'segmentation = model.predict("photo.jpg")',
        "```",
        "",
        f"or `fcn-zoo predict {name} photos/ --out masks/`. int8 is fast on CPUs with VNNI or AMX; on others "
        "the fp32 model is as fast.",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def _network_sha256(network) -> str:
    """A digest of the int8 network's graph and constants: what tells one int8 model from another."""
    digest = hashlib.sha256()
    for op in network.get_ordered_ops():
        digest.update(op.get_type_name().encode())
        if op.get_type_name() == "Constant":
            digest.update(op.get_data().tobytes())
    return digest.hexdigest()
