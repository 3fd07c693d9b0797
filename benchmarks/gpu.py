"""GPU throughput: fcn_zoo batched bf16/fp16 channels_last (optionally compiled) vs the reference at fp32, batch 1.

    python benchmarks/gpu.py [--model fcn_resnet50os8_voc] [--size 512 512] [--batch 32] [--precision bf16] [--compile]

Prints, on the same GPU, same weights (random; speed does not depend on them):

- the reference (sssegmentation) forward at fp32, batch 1, one image at a time: its own protocol;
- fcn_zoo fp32 batch 1, and fcn_zoo at ``--precision`` autocast with channels_last at ``--batch``
  (``fuse()``d, and ``torch.compile``d with ``--compile``);
- img/s, GFLOP/s (FLOPs from ``torch.utils.flop_counter``), the fraction of a same-run dense matmul
  (bf16/fp16 8192^3 for half precision, fp32 otherwise), ``torch.cuda.max_memory_allocated``;
- the share of pixels whose label under half precision equals fp32's (the goal is >= 99.5%): with
  ``--weights`` (trained weights) through ``predict()`` on the photos in tests/data, else with the random
  weights over ``--agreement-images`` random inputs (a check of the code path, not of the precision).

Runs on CPU too (``--device cpu --precision fp32``), which is how it is checked without a GPU.
Needs the test extra (sssegmentation).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import fcn_zoo  # noqa: E402
from _common import count_flops, matmul_rate, timed  # noqa: E402
from reference import build_reference_fcn, reference_logits  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="fcn_resnet50os8_voc", choices=fcn_zoo.list_models())
    parser.add_argument("--size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--precision", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--agreement-images", type=int, default=8)
    parser.add_argument("--weights", help="trained weights (anything fcn_zoo.from_pretrained takes, e.g. the row's "
                        "name) for the label agreement, measured through predict() on the photos in tests/data; "
                        "default: the random weights on random inputs")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = DTYPES[args.precision]
    row = fcn_zoo.CHECKPOINTS[args.model]
    reference = build_reference_fcn(row.depth, row.output_stride, row.num_classes).to(device)
    model = fcn_zoo.FCN(**row.model_config())
    from fcn_zoo.convert import convert_state_dict
    from fcn_zoo.weights import load_state_dict

    _, state_dict = convert_state_dict(reference.state_dict(), "reference", name=f"{row.name}.pth")
    load_state_dict(model, state_dict, source="reference")
    model = model.to(device).eval()
    fast = copy.deepcopy(model).fuse().to(memory_format=torch.channels_last)
    if args.compile:
        fast = torch.compile(fast)

    x1 = torch.randn(1, 3, *args.size, device=device)
    xb = torch.randn(args.batch, 3, *args.size, device=device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        flops = count_flops(lambda: model(x1))

        def run_fast():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                return fast(xb)

        rows = []
        for name, fn, images in (
            ("reference fp32, batch 1", lambda: reference_logits(reference, x1), 1),
            ("fcn_zoo fp32, batch 1", lambda: model(x1), 1),
            (f"fcn_zoo {args.precision} ch_last{' compiled' if args.compile else ''}, batch {args.batch}", run_fast, args.batch),
        ):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t = timed(fn, device, args.runs)
            memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
            rows.append((name, images / t, flops * images / t / 1e12, memory))
        peak = matmul_rate(4096 if device.type == "cpu" else 8192, dtype, device, runs=5) / 1e12

        agree = []
        for i in range(0 if args.weights else args.agreement_images):
            x = torch.randn(1, 3, *args.size, device=device) * (1 + i % 3)
            full = model(x).argmax(1)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                half = fast(x.contiguous(memory_format=torch.channels_last)).argmax(1)
            agree.append((full == half).float().mean().item())

    if args.weights:  # what users get: predict() at fp32 and at --precision, on real photos
        trained = fcn_zoo.from_pretrained(args.weights, device=device)
        photos = sorted((Path(__file__).resolve().parents[1] / "tests" / "data").glob("*.jpg"))
        for photo in photos:
            full = trained.predict(photo).labels
            half = trained.predict(photo, precision=args.precision, compile=args.compile).labels
            agree.append(float((full == half).mean()))
        args.agreement_images = f"{len(photos)} photos, trained weights"

    print(f"{row.name}, {args.size[0]}x{args.size[1]}, {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
          f"torch {torch.__version__}; {flops / 1e9:.1f} GFLOP per image; {args.precision} matmul {peak:.1f} TFLOP/s")
    print(f"{'':44s} {'img/s':>8s} {'TFLOP/s':>8s} {'of peak':>8s} {'GiB':>6s}")
    for name, rate, tflops, memory in rows:
        print(f"{name:44s} {rate:8.1f} {tflops:8.2f} {tflops / peak:8.1%} {memory:6.2f}")
    print(f"speed-up over the reference: {rows[2][1] / rows[0][1]:.1f}x; labels equal to fp32 on "
          f"{100 * min(agree):.3f}% of pixels at worst ({args.agreement_images})")


if __name__ == "__main__":
    main()
