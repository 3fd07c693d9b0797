"""The package stays lean, and the table of twelve rows is consistent."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import fcn_zoo


def test_import_is_lean():
    code = "import sys, fcn_zoo; fcn_zoo.list_models(); print(__import__('json').dumps(sorted(sys.modules)))"
    modules = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    heavy = [m for m in modules if m.split(".")[0] in ("torch", "timm", "huggingface_hub", "training", "fcn_zoo_training", "PIL", "numpy")]
    assert heavy == []


def test_the_table_has_twelve_consistent_rows():
    rows = list(fcn_zoo.CHECKPOINTS.values())
    assert len(rows) == 12 and len({r.name for r in rows}) == 12
    for r in rows:
        assert r.name == f"fcn_resnet{r.depth}os{r.output_stride}_{r.dataset}"
        assert r.backbone == f"resnet{r.depth}c"
        assert r.reference_url.endswith(f"/ssseg_fcn/{r.name}.pth")
        assert r.hub_repo_id.endswith(f"/{r.name}")
        assert r.hub_revision == "" or len(r.hub_revision) == 40  # empty until published, then a pinned commit
        assert (r.batch_size, r.epochs) == {"voc": (16, 60), "ade20k": (16, 130), "cityscapes": (8, 220)}[r.dataset]
        assert 30 < r.miou < 80
    assert {d: fcn_zoo.DATASETS[d].num_classes for d in fcn_zoo.DATASETS} == {"voc": 21, "ade20k": 150, "cityscapes": 19}
    for d in fcn_zoo.DATASETS.values():
        assert len(d.palette) == d.num_classes and len(set(d.classes)) == d.num_classes


@pytest.mark.parametrize("name", fcn_zoo.list_models())
def test_the_tables_figures_are_those_of_the_architecture(name):
    """Parameters, GFLOPs at a typical image's evaluation size and the safetensors size, recounted (on the
    meta device: no memory, no time)."""
    from torch.utils.flop_counter import FlopCounterMode

    row = fcn_zoo.CHECKPOINTS[name]
    with torch.device("meta"):
        model = fcn_zoo.FCN(**row.model_config()).eval()
        x = torch.empty(1, 3, *row.data.typical_eval_shape)
    inference = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.auxiliary_head.parameters())
    assert round(inference / 1e6, 2) == row.params_m
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    assert round(counter.get_total_flops() / 1e9, 1) == row.gflops
    tensor_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert abs(tensor_bytes / 1e6 - row.weights_mb) < 0.1  # + the safetensors header, a few tens of kB


def test_the_safetensors_size_in_the_table_is_the_files(tmp_path):
    row = fcn_zoo.CHECKPOINTS["fcn_resnet50os16_voc"]
    fcn_zoo.FCN(**row.model_config()).save_pretrained(tmp_path)
    assert round((tmp_path / "model.safetensors").stat().st_size / 1e6, 1) == row.weights_mb


def test_the_readme_table_shows_each_rows_figures():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = {line.split("|")[1].strip(" `"): line for line in readme.splitlines() if line.startswith("| `fcn_") and line.count("|") == 10}
    assert sorted(lines) == sorted(fcn_zoo.list_models())
    for name, row in fcn_zoo.CHECKPOINTS.items():
        miou = f"{row.miou:.2f}" + (f" / **{row.miou_newest:.2f}**" if row.miou_newest is not None else "")
        assert lines[name].endswith(f"| {miou} | {row.params_m:.1f} M | {row.gflops:.1f} | {row.weights_mb:.1f} MB |"), name


@pytest.mark.slow  # several processes: run after the suite (python -m pytest -q -m slow)
def test_the_wheel_holds_the_training_code_and_fine_tuning_runs_from_it_outside_a_checkout(tmp_path, tiny_folder):
    """What `pip install fcn-zoo` gives, without a venv of its own: the wheel built once, installed with
    --target, and `fcn-zoo train` / `fcn-zoo evaluate` run from a folder outside the repository."""
    import os
    import shutil
    import zipfile
    from pathlib import Path

    from sample_data import make_generic

    repo = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"  # a copy, so that building leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, source / name)
    for folder in ("fcn_zoo", "training"):
        shutil.copytree(repo / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)], check=True)
    (wheel,) = (tmp_path / "dist").glob("fcn_zoo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"fcn_zoo/cli.py", "fcn_zoo_training/train.py", "fcn_zoo_training/evaluate.py", "fcn_zoo_training/generic.py"} <= set(names)
    assert not [n for n in names if n.startswith(("training/", "tests/", "benchmarks/"))]
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], check=True)

    elsewhere = tmp_path / "elsewhere"  # no checkout here, and the installed copy comes first on the path
    make_generic(elsewhere / "data", n_train=2, n_val=1)
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import fcn_zoo, fcn_zoo_training; print(fcn_zoo.__file__, fcn_zoo_training.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(path.startswith(str(site)) for path in where)
    cli = [sys.executable, "-m", "fcn_zoo.cli"]
    train = subprocess.run([*cli, "train", "--init", str(tiny_folder), "--data-root", "data", "--output-dir", "runs/mine",
                            "--max-iters", "1", "--batch-size", "2", "--crop-size", "32", "--device", "cpu", "--no-progress"],
                           cwd=elsewhere, env=env, capture_output=True, text=True)
    assert train.returncode == 0, train.stderr[-2000:]
    assert "final mIoU" in train.stdout and (elsewhere / "runs" / "mine" / "best" / "model.safetensors").is_file()
    evaluate = subprocess.run([*cli, "evaluate", "runs/mine/best", "--data-root", "data", "--device", "cpu"],
                              cwd=elsewhere, env=env, capture_output=True, text=True)
    assert evaluate.returncode == 0, evaluate.stderr[-2000:]
    assert "mIoU" in evaluate.stdout and (elsewhere / "runs" / "mine" / "eval-best-val" / "eval.json").is_file()
    bad = subprocess.run([*cli, "train", "--init", str(tiny_folder), "--data-root", "nowhere", "--output-dir", "x"],
                         cwd=elsewhere, env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.strip().startswith("fcn-zoo train: ") and "Traceback" not in bad.stderr
