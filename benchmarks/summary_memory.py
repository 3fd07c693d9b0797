"""Memory the first process of ``fcn-zoo predict`` keeps for ``summary.csv``: every input's newest journal row
(:class:`fcn_zoo.records.Rows`), read back from a journal of ADE20K-like rows.

    python benchmarks/summary_memory.py [INPUTS]        # default 20000 inputs

Each row names a photo two folders deep with its identity (real path, size, mtime) and eight ADE20K classes'
shares, as ``fcn-zoo predict`` writes them. Printed: the rows' memory (tracemalloc), per row and scaled to a
million inputs. The journal is made in a temporary folder and removed.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import tracemalloc
from pathlib import Path

from fcn_zoo.records import JOURNAL_DIR, Journal
from fcn_zoo.zoo import ADE20K_CLASSES

inputs = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
random.seed(0)
with tempfile.TemporaryDirectory() as tmp:
    journal_dir = Path(tmp) / JOURNAL_DIR
    journal_dir.mkdir()
    with open(journal_dir / "journal-0.jsonl", "w", encoding="utf-8") as f:
        for i in range(inputs):
            name = f"city{i // 1000:03d}/street/photo_{i:07d}"
            row = {"name": name, "input": [f"/data/photos/{name}.jpg", 183_211, 1_733_400_000_000_000_000 + i],
                   "path": f"{name}.jpg", "kind": "image", "width": 683, "height": 512, "frames": None,
                   "status": "ok", "error": "", "stamp": [1_733_400_000_000_000_000, i],
                   "shares": {c: random.random() for c in random.sample(ADE20K_CLASSES, 8)}}
            f.write(json.dumps(row, sort_keys=True) + "\n")
    tracemalloc.start()
    rows = Journal(Path(tmp), 0).read()
    held, _ = tracemalloc.get_traced_memory()
print(f"{len(rows)} rows: {held / 2**20:.1f} MiB ({held / len(rows):.0f} B per row); "
      f"a million inputs: {held / len(rows) * 1e6 / 2**30:.2f} GiB")
