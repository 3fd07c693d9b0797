"""int8 and bf16 on the CPU: ``fcn_zoo.quantize`` against OpenVINO + NNCF and onnxruntime run by hand.

    python benchmarks/int8_cpu.py [--models fcn_resnet50os8_voc ...] [--size 512 683] [--rounds 7]

For each model (random weights with non-trivial BatchNorm statistics: speed only), one normalised
``(1, 3, H, W)`` input, the seconds of one call that returns logits, for:

- the reference implementation (sssegmentation) in fp32, its logits upsampled as it does;
- fcn_zoo ``fuse()``d fp32 ``model(x)`` (what ``fcn-zoo predict`` runs) and the same under bf16 autocast;
- OpenVINO by hand on ``openvino.convert_model`` of the model: fp32 (``INFERENCE_PRECISION_HINT`` f32) and bf16;
- OpenVINO + NNCF int8 by hand (``nncf.quantize``, preset performance, on the calibration tensors below),
  compiled with OpenVINO's default precision for what is not int8 and with f32 forced: "int8" and
  "int8 weights + bf16" where bf16 is native;
- onnxruntime int8 by hand: fcn_zoo's ONNX export, ``quant_pre_process``, ``quantize_static`` (QDQ, per-channel,
  u8 activations / s8 weights) on the same calibration tensors;
- ``fcn_zoo.quantize(model, calibration)`` called as ``q(x)``: the package's int8 model (and
  ``q.forward_features(x)``, its low-resolution logits alone).

Every contender returns logits at the input's size: the runtimes run by hand give theirs at the network's
resolution, upsampled by ``F.interpolate`` as ``model(x)`` and ``q(x)`` do.

Calibration: 3 generated photos read and resized as the model evaluates them. Every contender's first call is
made before timing; then in each round every contender runs once, the order rotating from round to round
(drift in the machine's speed touches all alike), and the median over rounds is printed with its range and
the ratio to the fused fp32 model. One process, torch's default threads.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import fcn_zoo  # noqa: E402
from conftest import randomize_batchnorm  # noqa: E402
from fcn_zoo.protocol import prepare  # noqa: E402
from fcn_zoo._inference import inference_copy  # noqa: E402
from fcn_zoo.quantization import _cpu_name, _Features, quantize  # noqa: E402
from reference import build_reference_fcn, reference_logits  # noqa: E402


def photos(n: int = 3) -> list[np.ndarray]:
    """Smooth generated photos (gradients and blobs), 375x500 like VOC's: closer to real activations than noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500] / 500.0
    out = []
    for _ in range(n):
        base = np.stack([np.sin(xx * rng.uniform(2, 9) + rng.uniform(0, 6)) * np.cos(yy * rng.uniform(2, 9))
                         for _ in range(3)], -1)
        noise = rng.normal(0, 0.08, base.shape)
        out.append(((base * 0.5 + 0.5 + noise).clip(0, 1) * 255).astype(np.uint8))
    return out


def contenders_for(name: str, x: torch.Tensor, workdir: Path) -> dict:
    import nncf
    import openvino as ov

    row = fcn_zoo.CHECKPOINTS[name]
    model = randomize_batchnorm(fcn_zoo.FCN(**row.model_config())).eval()
    calibration = photos()
    tensors = [prepare(model, p).contiguous().numpy() for p in calibration]
    fused = model.fuse(inplace=False)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    feed = x.numpy()
    core = ov.Core()
    with torch.no_grad():
        network = ov.convert_model(_Features(inference_copy(model)), example_input=x,
                                   input=[ov.PartialShape([-1, 3, -1, -1])])
    int8_network = nncf.quantize(network, nncf.Dataset(tensors), subset_size=len(tensors),
                                 preset=nncf.QuantizationPreset.PERFORMANCE)
    ov_f32 = core.compile_model(network, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    ov_bf16 = core.compile_model(network, "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
    ov_int8 = core.compile_model(int8_network, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    ov_int8_default = core.compile_model(int8_network, "CPU")
    ours = quantize(model, calibration, progress=False)

    def autocast_bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fused(x_cl)

    def upsampled(run):
        """A runtime's low-resolution logits upsampled to the input, as model(x) and q(x) return them."""
        return lambda: F.interpolate(torch.from_numpy(run()), size=x.shape[-2:], mode="bilinear", align_corners=False)

    reference = build_reference_fcn(row.depth, row.output_stride, row.num_classes)
    out = {
        "reference (sssegmentation) fp32": lambda: reference_logits(reference, x),
        "fcn_zoo fuse() fp32": lambda: fused(x_cl),
        "fcn_zoo fuse() bf16 autocast": autocast_bf16,
        "OpenVINO fp32": upsampled(lambda: ov_f32(feed)[0]),
        f"OpenVINO bf16 (runs {ov_bf16.get_property('INFERENCE_PRECISION_HINT')})": upsampled(lambda: ov_bf16(feed)[0]),
        "OpenVINO+NNCF int8, f32 rest": upsampled(lambda: ov_int8(feed)[0]),
        f"OpenVINO+NNCF int8, default ({ov_int8_default.get_property('INFERENCE_PRECISION_HINT')} rest)":
            upsampled(lambda: ov_int8_default(feed)[0]),
        "fcn_zoo.quantize q(x)": lambda: ours(x),
        "fcn_zoo.quantize q.forward_features(x)": lambda: ours.forward_features(x),
    }
    try:
        run = onnxruntime_int8(model, tensors, workdir / f"{name}.onnx", feed)
        out["onnxruntime int8 QDQ per-channel"] = upsampled(lambda: run()[0])
    except ImportError as e:
        print(f"onnxruntime int8 left out: {e}")
    return out


def onnxruntime_int8(model, tensors: list[np.ndarray], path: Path, feed: np.ndarray):
    import onnxruntime
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from fcn_zoo.export import export

    export(model, path, features=True)
    pre = path.with_name(path.stem + ".pre.onnx")
    quant_pre_process(str(path), str(pre))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter({"image": t} for t in tensors)

        def get_next(self):
            return next(self.items, None)

    q = path.with_name(path.stem + ".int8.onnx")
    quantize_static(str(pre), str(q), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    session = onnxruntime.InferenceSession(str(q), providers=["CPUExecutionProvider"])
    return lambda: session.run(None, {"image": feed})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["fcn_resnet50os8_voc"], choices=fcn_zoo.list_models())
    parser.add_argument("--size", type=int, nargs=2, default=(512, 683), metavar=("H", "W"))
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    import openvino

    x = torch.randn(1, 3, *args.size)
    print(f"{_cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads; OpenVINO {openvino.__version__}; "
          f"native bf16 {torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()}, "
          f"VNNI {torch.cpu._is_vnni_supported()}; input 1x3x{args.size[0]}x{args.size[1]}")
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for name in args.models:
            contenders = contenders_for(name, x, Path(tmp))
            for fn in contenders.values():
                fn()
            times = {k: [] for k in contenders}
            names = list(contenders)
            for r in range(args.rounds):
                for k in names[r % len(names):] + names[:r % len(names)]:
                    t = time.perf_counter()
                    contenders[k]()
                    times[k].append(time.perf_counter() - t)
            base = statistics.median(times["fcn_zoo fuse() fp32"])
            print(f"\n{name}, median of {args.rounds} rounds")
            print(f"{'':52s} {'median s':>9s} {'(range)':>15s} {'x fused fp32':>12s}")
            for k, ts in times.items():
                t = statistics.median(ts)
                print(f"{k:52s} {t:9.3f} ({min(ts):.3f}-{max(ts):.3f}) {base / t:12.2f}")


if __name__ == "__main__":
    main()
