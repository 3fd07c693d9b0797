"""The package's modules import in one direction, from entry points down to data, with no cycle, even
through imports inside functions; and no module grows past what a reader takes in at once."""

from __future__ import annotations

import ast
from pathlib import Path

import fcn_zoo

PACKAGE = Path(fcn_zoo.__file__).parent

# Higher imports lower (or its own level), never the other way.
LAYERS = {
    "cli": 14, "publish": 14,                   # entry points: parse, call the API, one line per error
    "runner": 13, "demo": 13, "about": 13,      # fcn-zoo predict DIR: inputs into --out; the demo page; info
    "records": 12, "ranks": 12,                 # --out's outputs and records; the processes of a torchrun
    "video": 12,                                # frames in, overlay video out
    "ray": 11,                                  # the Segmenter for Ray Data's map_batches
    "predict": 10,                              # predict, predict_iter, preprocess: doors over the engine
    "quantization": 10,                         # an FCN's int8 version, calibrated through the engine's protocol
    "engine": 9,                                # the one engine: items in, (item, result or error) out
    "protocol": 8, "segmentation": 8, "labels": 8,  # resize, normalise, forward; the result; labels from logits
    "images": 7, "inputs": 7,                   # the one reader of images and masks; what a command line names
    "export": 5,                                # a model as ONNX, and the sessions that run it
    "hub": 4, "downloads": 4,                   # a name, repo id, folder or .pth becomes a local folder
    "convert": 3, "parity": 3,                  # other layouts' state dicts become FCN's
    "int8": 3,                                  # an int8 model run by OpenVINO, its folder and card
    "model": 2, "weights": 2, "_fusion": 2, "_inference": 2, "cards": 2,  # the nn.Module, loading it, its
                                                #   kernels, running it without changing it, its card
    "__init__": 1, "zoo": 1, "errors": 1, "_files": 1, "devices": 1, "console": 1,  # data and small helpers
    "metrics": 1,                               # mIoU: one confusion matrix over a dataset
}
# FCN.predict, FCN.predict_iter: one-line conveniences that call upward lazily, as STYLE.md allows
ALLOWED_UPWARD = {("model", "predict"), ("int8", "predict")}


TRAINING = PACKAGE.parent / "training"
# training/: where data comes from, one module per source behind data.py's interface; sources.py picks one
DATA_SOURCES = {"layouts", "generic", "hubdata"}


def imports(package: Path = PACKAGE, name: str = "fcn_zoo") -> set[tuple[str, str]]:
    """(importer, imported) for every import of one module of ``package`` by another, wherever it is written."""
    edges = set()
    for path in package.glob("*.py"):
        for node in _executed(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                targets = [node.module] if node.module else [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(name):
                targets = [node.module.removeprefix(name).lstrip(".") or "__init__"]
            elif isinstance(node, ast.Import):
                targets = [a.name.removeprefix(f"{name}.") for a in node.names if a.name.startswith(f"{name}.")]
            else:
                continue
            for target in targets:
                target = target.split(".")[0]
                if not (package / f"{target}.py").is_file():  # `from . import list_models`
                    target = "__init__"
                if target != path.stem:
                    edges.add((path.stem, target))
    return edges


def _executed(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (read by type checkers, never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            yield from (n for child in node.orelse for n in _executed_with(child))
            continue
        yield from _executed_with(node)


def _executed_with(node: ast.AST):
    yield node
    yield from _executed(node)


def test_every_module_has_a_layer():
    assert sorted(p.stem for p in PACKAGE.glob("*.py")) == sorted(LAYERS)


def test_imports_point_down_only():
    upward = {(a, b) for a, b in imports() if LAYERS[b] > LAYERS[a]}
    assert upward == ALLOWED_UPWARD


def test_training_data_sources_sit_behind_one_interface():
    """data.py imports no source; a source imports no other source (a shared parser excepted); only
    sources.py chooses among them."""
    edges = imports(TRAINING, "training")
    assert not {b for a, b in edges if a == "data"} & (DATA_SOURCES | {"sources"})
    assert {(a, b) for a, b in edges if a in DATA_SOURCES and b in DATA_SOURCES} <= {("hubdata", "generic")}
    assert {a for a, b in edges if b in DATA_SOURCES} <= DATA_SOURCES | {"sources"}
    _no_cycle(edges)


def test_there_is_no_import_cycle():
    _no_cycle(imports() - ALLOWED_UPWARD)


def _no_cycle(edges: set[tuple[str, str]]) -> None:
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    done, path = set(), []

    def visit(node):
        assert node not in path, f"import cycle: {' -> '.join(path[path.index(node):] + [node])}"
        if node in done:
            return
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)


def test_no_module_is_over_400_lines():
    long = {p.name: n for p in PACKAGE.glob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}
