"""Peak memory for one large image (a full Cityscapes frame, a 12 MP photo), and time to the first prediction
from a cold process.

    python benchmarks/memory_cpu.py [--model fcn_resnet101os8_cityscapes] [--size 1024 2048]
    python benchmarks/memory_cpu.py --model fcn_resnet50os16_ade20k --size 3000 4000

Each contender runs in a fresh process (so that peak RSS is its own): it loads the same weights, segments
one frame of the given size, and reports its peak RSS (``ru_maxrss``), the RSS before the frame, and the
time from process start to the label map, and the time for the frame alone (weights loaded):

- ``fcn_zoo predict``: ``model.predict(frame)``: labels only, upsampled and arg-maxed in bands;
- ``fcn_zoo full upsample``: resize to the evaluation size, forward, the logits upsampled to a full-size
  score map, argmax: the protocol as most implementations (and the reference's test script) write it;
- ``reference``: the same steps with sssegmentation's model.

The score map is ``classes x H x W`` floats: 160 MB for a Cityscapes frame, 7.2 GB for a 12-megapixel
photo with the 150 ADE20K classes (``--model fcn_resnet50os16_ade20k --size 3000 4000``).

Needs the test extra (``pip install -e ".[test]"``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START = time.perf_counter()
HERE = Path(__file__).resolve()


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(contender: str, weights: str, name: str, size: tuple[int, int]) -> dict:
    import torch
    import torch.nn.functional as F

    import fcn_zoo

    torch.manual_seed(0)
    frame = torch.randint(0, 256, (3, *size), dtype=torch.uint8)
    row = fcn_zoo.CHECKPOINTS[name]
    if contender == "reference":
        from ssseg.modules.utils import SSSegInputStructure

        from fcn_zoo.parity import build_reference_segmentor

        model = build_reference_segmentor(row.model_config())
        model.load_state_dict(torch.load(weights, weights_only=True)["model"])
    else:
        model = fcn_zoo.from_pretrained(weights)
    before = rss_mb()
    frame_start = time.perf_counter()
    with torch.inference_mode():
        if contender == "fcn_zoo predict":
            labels = model.predict(frame).labels
        else:  # the protocol as most implementations write it: resize, forward, full-size score map, argmax
            from fcn_zoo.zoo import eval_resize_shape

            mean = torch.tensor(row.data.mean).view(1, 3, 1, 1)
            std = torch.tensor(row.data.std).view(1, 3, 1, 1)
            x = (frame[None].float() - mean) / std
            eval_shape = eval_resize_shape(*size, row.data.eval_size)  # Cityscapes 1024x2048: unchanged
            if eval_shape != tuple(size):
                x = F.interpolate(x, size=eval_shape, mode="bilinear", align_corners=False)
            if contender == "fcn_zoo full upsample":
                low = model.forward_features(x)
            else:
                low = model(SSSegInputStructure(images=x, mode="TEST")).seg_logits
            labels = F.interpolate(low, size=size, mode="bilinear", align_corners=False).argmax(1)
    return {"peak_rss_mb": rss_mb(), "rss_before_frame_mb": before, "seconds_to_labels": time.perf_counter() - START,
            "seconds_for_the_frame": time.perf_counter() - frame_start,
            "labels_shape": list(labels.shape[-2:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="fcn_resnet101os8_cityscapes")
    parser.add_argument("--size", type=int, nargs=2, default=(1024, 2048), metavar=("H", "W"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.weights, args.model, tuple(args.size))))
        return

    sys.path.insert(0, str(HERE.parents[1] / "tests"))
    import fcn_zoo
    from fcn_zoo.hub import resolve
    from reference import build_reference_fcn, save_reference_checkpoint

    row = fcn_zoo.CHECKPOINTS[args.model]
    with tempfile.TemporaryDirectory() as tmp:
        pth = save_reference_checkpoint(build_reference_fcn(row.depth, row.output_stride, row.num_classes), Path(tmp) / f"{row.name}.pth")
        folder = resolve(pth, cache_dir=Path(tmp) / "cache")  # converted once: the weights are cached
        print(f"{row.name}, one {args.size[0]}x{args.size[1]} frame on CPU, each contender in a fresh process")
        print(f"{'':24s} {'peak RSS MB':>12s} {'RSS before frame':>17s} {'s to labels':>12s} {'s for the frame':>16s}")
        for contender in ("fcn_zoo predict", "fcn_zoo full upsample", "reference"):
            weights = str(pth if contender == "reference" else folder)
            out = subprocess.run(
                [sys.executable, str(HERE), "--worker", contender, "--weights", weights, "--model", args.model,
                 "--size", *map(str, args.size)], capture_output=True, text=True, check=True,
            ).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{contender:24s} {r['peak_rss_mb']:12.0f} {r['rss_before_frame_mb']:17.0f} {r['seconds_to_labels']:12.1f} {r['seconds_for_the_frame']:16.1f}")


if __name__ == "__main__":
    main()
