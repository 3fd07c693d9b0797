"""Peak memory and time of turning a TTA's twelve sets of logits into labels and a confidence map at Cityscapes'
size.

    python benchmarks/labels_memory.py                    # fcn_zoo.labels
    python benchmarks/labels_memory.py old_labels.py      # another version of it (git show REV:fcn_zoo/labels.py)

Twelve sets (six scales, flipped and not) of 19-class logits at output stride 8 of a 1024x2048 frame, as
``predict(tta=True)`` makes them; the labels (``upsample_argmax``) and the confidence (``upsample_softmax``) at
1024x2048. Printed: how far the process's peak resident memory grew, the labels' median time over 3 runs, and a
checksum of the labels. Run each version in a process of its own (the peak only grows), alternating.
"""

from __future__ import annotations

import importlib.util
import resource
import statistics
import sys
import time

import torch

if len(sys.argv) > 1:
    spec = importlib.util.spec_from_file_location("labels_under_test", sys.argv[1])
    labels_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(labels_module)
else:
    import fcn_zoo.labels as labels_module

torch.manual_seed(0)
sizes = [(int(128 * s), int(256 * s)) for s in (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)]
logits = [torch.randn(1, 19, h, w) for h, w in sizes for _ in (0, 1)]
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
labels = labels_module.upsample_argmax(logits, (1024, 2048))
confidence = labels_module.upsample_softmax(logits, (1024, 2048))
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) / 1024
times = []
for _ in range(3):
    began = time.perf_counter()
    labels_module.upsample_argmax(logits, (1024, 2048))
    times.append(time.perf_counter() - began)
print(f"{sys.argv[1] if len(sys.argv) > 1 else 'fcn_zoo.labels'}: peak grew {grown:.0f} MB; labels "
      f"{statistics.median(times):.2f} s (median of 3); checksum {int(labels.sum())}")
