"""Fine-tuning on a generated Hugging Face dataset: the time of ``fcn-zoo train --dataset-name`` and the mIoU
it reaches, for the two datasets the tests use.

    python benchmarks/finetune_hub.py

- A dataset-repo folder (parquet under ``data/``, ``id2label.json``): 32 train and 8 validation rows of
  64x80 shapes, 40 iterations of batch 8.
- A ``save_to_disk`` folder with ``pixel_values``/``label`` columns and no validation split: 30 rows,
  ``--val-fraction 0.25``, ``--max-train-samples 20``, 30 iterations of batch 4.

Both from a 21-class resnet10t FCN (128-channel heads), on the CPU, no loader processes. The time covers
the whole command: loading and checking every row, training, both evaluations and writing ``best/``.
Needs the test, train and datasets extras.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

import datasets  # noqa: E402
import torch  # noqa: E402

import fcn_zoo  # noqa: E402
from sample_data import make_hub_dataset  # noqa: E402
from training import train  # noqa: E402

QUICK = ["--device", "cpu", "--num-workers", "0", "--no-progress", "--log-interval", "10"]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        datasets.config.HF_DATASETS_CACHE = work / "datasets_cache"
        torch.manual_seed(0)
        fcn_zoo.FCN(num_classes=21, backbone="resnet10t", head_channels=128, aux_channels=128, dataset="voc").save_pretrained(work / "src")
        (work / "classes.txt").write_text("background 0 0 0\nbox 200 40 40\nellipse 40 200 40\n")
        runs = {
            "parquet folder, 32 + 8 rows, 40 iterations": (
                make_hub_dataset(work / "parquet", {"train": 32, "validation": 8}),
                ["--max-iters", "40", "--batch-size", "8"]),
            "save_to_disk, 20 + held-out rows, 30 iterations": (
                make_hub_dataset(work / "disk", {"train": 30}, columns=("pixel_values", "label"), form="disk", id2label=None),
                ["--classes", str(work / "classes.txt"), "--val-fraction", "0.25", "--max-train-samples", "20",
                 "--max-iters", "30", "--batch-size", "4"]),
        }
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        for label, (data, extra) in runs.items():
            out = work / data.name / "run"
            start = time.perf_counter()
            train.main(["--init", str(work / "src"), "--dataset-name", str(data), "--output-dir", str(out), "--lr", "0.05",
                        *extra, *QUICK])
            seconds = time.perf_counter() - start
            miou = json.loads((out / "best" / "provenance.json").read_text())["measured_miou"]
            print(f"  {label:48s} {seconds:5.1f} s, best/ val mIoU {miou:.1f}")


if __name__ == "__main__":
    main()
