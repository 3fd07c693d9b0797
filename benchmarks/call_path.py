"""How a reader follows ``fcn-zoo predict DIR`` from the command line down to the network: the package's
modules in the order the first image's path enters them, and how often it goes back to a module it had left.

    python benchmarks/call_path.py

A tiny model segments two generated photos through ``fcn_zoo.cli.main`` in this process, with a profiler
hook that records each call into a function of ``fcn_zoo`` made from another ``fcn_zoo`` module (or from
outside the package), on the main thread, from the start of ``cmd_predict`` until the network's
``forward_features`` first runs. Printed: the sequence of modules entered, the number of entries, of distinct
modules, and two counts of going back:

- along the call chain: a call into a module that is already on the stack below its caller (A calls B,
  which calls back into A): what a reader following the code downwards meets as a return to a module left;
- in sequence: an entry into a module seen before, not the one the call came from (a helper called twice
  from one function counts here, though the reader never left that function).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

import fcn_zoo
from fcn_zoo.cli import main


def _chain(frame) -> list[str]:
    """The package's modules on the stack, outermost first, runs of one module counted once."""
    chain: list[str] = []
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.startswith("fcn_zoo") and (not chain or chain[-1] != module):
            chain.append(module)
        frame = frame.f_back
    return chain[::-1]


def trace_predict() -> tuple[list[str], list[str]]:
    """The entries in order, and the calls that go back up the chain (``a > b > a :function``)."""
    entered: list[str] = []
    upward: list[str] = []
    state = {"on": False, "done": False}

    def hook(frame, event, arg):
        if event != "call" or state["done"]:
            return
        module = frame.f_globals.get("__name__", "")
        name = frame.f_code.co_name
        if module == "fcn_zoo.cli" and name == "cmd_predict":
            state["on"] = True
        if not state["on"] or not module.startswith("fcn_zoo") or name.startswith(("<", "__create_fn__")):
            return
        caller = frame.f_back.f_globals.get("__name__", "") if frame.f_back else ""
        if caller != module:
            entered.append(f"{module.removeprefix('fcn_zoo.')}.{name}")
            chain = _chain(frame)
            if chain[-1] in chain[:-1]:
                upward.append(" > ".join(m.removeprefix("fcn_zoo.") for m in chain) + f" :{name}")
        if name == "forward_features":
            state["done"] = True

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = fcn_zoo.FCN(num_classes=3, backbone="resnet18d", head_channels=8, aux_channels=None)
        model.eval_size = (64, 48)
        model.save_pretrained(tmp / "m")
        (tmp / "photos").mkdir()
        for i in range(2):
            Image.fromarray(np.full((48, 64, 3), 60 * i, np.uint8)).save(tmp / "photos" / f"{i}.jpg")
        sys.setprofile(hook)
        try:
            main(["predict", str(tmp / "m"), str(tmp / "photos"), "--out", str(tmp / "out"), "--quiet", "--workers", "0"])
        finally:
            sys.setprofile(None)
    return entered, upward


#: helpers every layer may call (the table, device strings, atomic files, copies and modes): a call into one
#: and back is not a reader going back up the path
LEAVES = {"zoo", "devices", "_files", "errors", "console", "_inference"}


def returns(modules: list[str], skip: set[str] = frozenset()) -> int:
    """Entries into a module seen before, other than the one just left (``skip``: modules not counted)."""
    seen, count, last = set(), 0, None
    for m in (m for m in modules if m not in skip):
        count += m in seen and m != last
        seen.add(m)
        last = m
    return count


if __name__ == "__main__":
    entered, upward = trace_predict()
    modules = [e.split(".")[0] for e in entered]
    print(" -> ".join(entered))
    print(f"{len(modules)} entries into {len(set(modules))} modules; {returns(modules)} returns to a module that had "
          f"been left in sequence, {returns(modules, LEAVES)} not counting the helpers {', '.join(sorted(LEAVES))}; "
          f"{len(upward)} calls back up the call chain")
    for call in upward:
        print("  up:", call)
