"""CPU forward-pass benchmark: fcn_zoo vs the reference implementation (sssegmentation) and torchvision.

    python benchmarks/forward_cpu.py [--models fcn_resnet50os8_voc ...] [--size 512 683] [--runs 5] [--onnx]
        [--openvino] [--bf16]

For each model, one input of the given size, the median time of a forward pass that returns logits at the
input's size, for:

- fcn_zoo ``model(x)`` as a user calls it under ``torch.inference_mode()`` on a model as ``from_pretrained``
  returns it: the plain module, on an NCHW input and on a channels_last input (what ``model.predict``
  feeds it); with BatchNorm folded only; and the explicit fast path, ``model.fuse()`` (BatchNorm folded,
  ReLU and residual additions fused into the convolutions; what ``fcn-zoo predict``, ``predict_iter`` and
  ``predict(fuse=True)`` run), on NCHW and channels_last inputs and as a channels_last model, on the
  reference's weights;
- the reference model on the same weights (its forward plus the same bilinear upsampling);
- for OS8 models, torchvision's ``fcn_resnet50/101`` and fcn_zoo on the same torchvision weights (the
  7x7-stem, one-conv-head architecture: a different model from the reference rows, compared with itself);
- with ``--onnx``, onnxruntime on fcn_zoo's ONNX export;
- with ``--openvino``, OpenVINO's CPU plugin on the same ONNX file, in fp32 (``INFERENCE_PRECISION_HINT``
  ``f32``) and, with ``--bf16``, in bf16 (``pip install openvino``: not a dependency of the package);
- at 512x683, the whole door on the fused model: ``.predict(photo)`` of a 500x375 uint8 photo (read, resized
  to 683x512, normalised, the forward pass, labels at 500x375): what the engine adds to the network;
- with ``--bf16``, fcn_zoo under bf16 autocast (what ``predict(precision="bf16")`` runs), unfused and fused,
  its share taken of a bf16 matmul. On a CPU without bf16 instructions (no AVX512_BF16 or AMX) oneDNN and
  OpenVINO emulate or fall back, so these rows say nothing about bf16 hardware there.

FLOPs are counted by ``torch.utils.flop_counter`` and the GFLOP/s is also given as a fraction of a 4096x4096
fp32 matmul measured in the same run: in each round the matmul is timed and then every contender once, the
fraction is taken within the round (so drift in the machine's speed cancels; the contenders' order rotates
from round to round, so that none always runs first), and the median over rounds is printed with its range. Needs the test extra (``pip install -e ".[test]"``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import fcn_zoo  # noqa: E402
from _common import count_flops, matmul_rate  # noqa: E402
from conftest import randomize_batchnorm  # noqa: E402
from fcn_zoo._fusion import fold_batchnorm  # noqa: E402
from fcn_zoo.convert import convert_state_dict  # noqa: E402
from fcn_zoo.weights import load_state_dict  # noqa: E402
from reference import build_reference_fcn, reference_logits, save_reference_checkpoint  # noqa: E402


def contenders_for(name: str, x: torch.Tensor, workdir: Path, onnx: bool, openvino: bool, bf16: bool) -> dict:
    """name -> (callable, FLOPs); every callable returns logits at x's size."""
    row = fcn_zoo.CHECKPOINTS[name]
    reference = build_reference_fcn(row.depth, row.output_stride, row.num_classes)
    pth = save_reference_checkpoint(reference, workdir / f"{row.name}.pth")
    plain = fcn_zoo.from_pretrained(pth, cache_dir=workdir / "cache")
    folded = copy.deepcopy(plain)
    fold_batchnorm(folded)
    fused = plain.fuse(inplace=False)
    fused_cl = plain.fuse(inplace=False).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    flops = count_flops(lambda: plain(x))
    out = {
        "fcn_zoo model(x), NCHW input": (lambda: plain(x), flops),
        "fcn_zoo model(x), ch_last input": (lambda: plain(x_cl), flops),
        "fcn_zoo BN folded only, ch_last in": (lambda: folded(x_cl), flops),
        "fcn_zoo fuse(), NCHW input": (lambda: fused(x), flops),
        "fcn_zoo fuse(), ch_last input": (lambda: fused(x_cl), flops),
        "fcn_zoo fuse(), ch_last model": (lambda: fused_cl(x_cl), flops),
        "reference (sssegmentation)": (lambda: reference_logits(reference, x), flops),
    }
    if tuple(x.shape[-2:]) == (512, 683):  # the whole door: a 500x375 photo (VOC's size) through the engine
        photo = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
        out["fcn_zoo fuse()d .predict(photo)"] = (lambda: fused.predict(photo), flops)
    if row.output_stride == 8:
        import torchvision

        tv = getattr(torchvision.models.segmentation, f"fcn_resnet{row.depth}")(
            weights=None, weights_backbone=None, num_classes=row.num_classes, aux_loss=True
        )
        randomize_batchnorm(tv).eval()
        config, state_dict = convert_state_dict(tv.state_dict(), "torchvision")
        ours = fcn_zoo.FCN(**config)
        load_state_dict(ours, state_dict, source="torchvision")
        ours = ours.eval()
        ours_flops = count_flops(lambda: ours(x))  # the counter cannot see oneDNN's fused kernels
        ours = ours.fuse()
        # torchvision runs its auxiliary head in eval mode too; fcn_zoo does not: each is credited its own work
        out["torchvision fcn_resnet (its weights)"] = (lambda: tv(x)["out"], count_flops(lambda: tv(x)))
        out["fcn_zoo fuse(), same tv weights"] = (lambda: ours(x_cl), ours_flops)
    if onnx or openvino:
        from fcn_zoo.export import export

        path = export(plain, workdir / f"{row.name}.onnx")
        feed = {"image": x.numpy()}
    if onnx:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out["onnxruntime (fcn_zoo export)"] = (lambda: session.run(None, feed), flops)
    if openvino:
        import openvino

        core = openvino.Core()
        threads = {"INFERENCE_NUM_THREADS": torch.get_num_threads()}
        ov_fp32 = core.compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32", **threads})
        out["OpenVINO fp32 (same ONNX)"] = (lambda: ov_fp32(feed), flops)
        if bf16:
            ov_bf16 = core.compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "bf16", **threads})
            out[BF16[2]] = (lambda: ov_bf16(feed), flops)
    if bf16:
        def run_bf16(model):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(x_cl)

        out[BF16[0]] = (lambda: run_bf16(plain), flops)
        out[BF16[1]] = (lambda: run_bf16(fused), flops)
    return out


BF16 = ("fcn_zoo bf16 autocast, model(x) *", "fcn_zoo bf16 autocast, fuse() *", "OpenVINO bf16 (same ONNX) *")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["fcn_resnet50os8_voc"], choices=fcn_zoo.list_models())
    parser.add_argument("--size", type=int, nargs=2, default=(512, 683), metavar=("H", "W"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--onnx", action="store_true", help="also time onnxruntime (needs the export extra)")
    parser.add_argument("--openvino", action="store_true", help="also time OpenVINO (pip install openvino)")
    parser.add_argument("--bf16", action="store_true",
                        help="also time bf16 autocast (CPUs with AMX), its share taken of a bf16 matmul")
    args = parser.parse_args()

    x = torch.randn(1, 3, *args.size)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, input 1x3x{args.size[0]}x{args.size[1]}")
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for name in args.models:
            contenders = contenders_for(name, x, Path(tmp), args.onnx, args.openvino, args.bf16)
            for fn, _ in contenders.values():  # warm-up
                fn()
            times = {k: [] for k in contenders}
            shares = {k: [] for k in contenders}
            peaks, bf16_peaks = [], []
            names = list(contenders)
            for r in range(args.runs):
                peaks.append(matmul_rate() / 1e9)
                if args.bf16:
                    bf16_peaks.append(matmul_rate(dtype=torch.bfloat16) / 1e9)
                for k in names[r % len(names):] + names[:r % len(names)]:  # each round starts one further on
                    fn, flops = contenders[k]
                    t = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t)
                    shares[k].append(flops / times[k][-1] / 1e9 / (bf16_peaks if k in BF16 else peaks)[-1])
            peak = statistics.median(peaks)
            print(f"\n{name}: {contenders['reference (sssegmentation)'][1] / 1e9:.1f} GFLOP; "
                  f"4096^2 fp32 matmul {peak:.1f} GFLOP/s (median of {args.runs}, range {min(peaks):.0f}-{max(peaks):.0f})")
            print(f"{'':38s} {'median s':>9s} {'img/s':>6s} {'GFLOP/s':>8s} {'of matmul':>9s} {'(range)':>13s}")
            for k, ts in times.items():
                t, flops, share = statistics.median(ts), contenders[k][1], shares[k]
                print(f"{k:38s} {t:9.3f} {1 / t:6.2f} {flops / t / 1e9:8.1f} {statistics.median(share):9.1%} "
                      f"({min(share):.0%}-{max(share):.0%})")
            if args.bf16:
                print(f"* of a 4096^2 bf16 matmul: {statistics.median(bf16_peaks):.1f} GFLOP/s")

if __name__ == "__main__":
    main()
