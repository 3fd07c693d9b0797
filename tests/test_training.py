"""training/: short CPU runs of every recipe family, resume after a kill, evaluation, export, learning."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fcn_zoo
from sample_data import make_ade20k, make_cityscapes, make_generic, make_voc
from training import train as train_module
from training.sources import build_dataset
from fcn_zoo.metrics import ConfusionMatrix
from training.evaluate import evaluate

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--device", "cpu", "--backbone-weights", "none", "--backbone", "resnet10t", "--num-workers", "0",
         "--crop-size", "48", "--scale", "256", "64", "--no-progress", "--log-interval", "1"]


def run_train(*args: str) -> None:
    assert train_module.main(list(args)) == 0


@pytest.mark.parametrize("recipe,make", [
    ("fcn_resnet50os8_voc", lambda root: make_voc(root)),
    ("fcn_resnet50os16_voc", lambda root: make_voc(root, layout="mmseg")),
    ("fcn_resnet101os8_ade20k", make_ade20k),
    ("fcn_resnet50os16_cityscapes", make_cityscapes),
], ids=["voc", "voc-aug", "ade20k", "cityscapes"])
def test_two_iterations_per_recipe_family_then_resume(tmp_path, recipe, make):
    make(tmp_path / "data")
    out = tmp_path / "run"
    run_train("--recipe", recipe, "--data-root", str(tmp_path / "data"), "--output-dir", str(out),
              "--max-iters", "2", "--batch-size", "2", "--checkpoint-interval", "1", *QUICK)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert [r["iter"] for r in steps] == [1, 2]
    assert all(r["loss"] > 0 and r["images_per_s"] > 0 and r["memory_mb"] > 0 for r in steps)
    assert steps[1]["lr"] < steps[0]["lr"]  # poly decay per iteration
    assert sorted(p.name for p in out.glob("ckpt-*.pt")) == ["ckpt-00000001.pt", "ckpt-00000002.pt"]
    assert (out / "curves.png").stat().st_size > 0
    best = fcn_zoo.from_pretrained(out / "best")
    assert best.num_classes == fcn_zoo.CHECKPOINTS[recipe].num_classes
    assert "mIoU" in log[-1]
    data = fcn_zoo.CHECKPOINTS[recipe].data
    config = json.loads((out / "best" / "config.json").read_text())  # the folder describes itself
    assert config["class_names"] == list(data.classes) and len(config["palette"]) == data.num_classes
    assert config["eval_size"] == [256, 64] and config["crop_size"] == [48, 48] and config["mean"] == list(data.mean)
    card = (out / "best" / "README.md").read_text()
    assert f"{json.loads((out / 'best' / 'provenance.json').read_text())['measured_miou']:.2f} (measured" in card
    # these weights are this run's (resnet10t): the card's usage does not load the row's published ones
    assert f'from_pretrained("{recipe}")' not in card and f"name: {recipe}" not in card

    run_train("--recipe", recipe, "--data-root", str(tmp_path / "data"), "--output-dir", str(out),
              "--max-iters", "3", "--batch-size", "2", "--checkpoint-interval", "1", "--resume", *QUICK)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log if "loss" in r] == [1, 2, 3]  # resumed at 3, not from scratch
    # last/ is the final evaluation's (what the reference reports), best/ the best one's; each card says which
    last = json.loads((out / "last" / "provenance.json").read_text())["run"]
    assert (last["selected"], last["iteration"]) == ("last", 3)
    assert "weights of the last evaluation (iteration 3 of 3)" in (out / "last" / "README.md").read_text()
    assert json.loads((out / "best" / "provenance.json").read_text())["run"]["selected"] == "best"


def test_the_total_batch_is_split_over_devices_and_accumulation(tmp_path, capsys):
    make_voc(tmp_path / "data")
    out = tmp_path / "run"
    run_train("--recipe", "fcn_resnet50os8_voc", "--data-root", str(tmp_path / "data"),
              "--output-dir", str(out), "--max-iters", "1", "--batch-size", "4", *QUICK)
    run = json.loads((out / "run.json").read_text())
    assert (run["total_batch"], run["per_device_batch"], run["accumulation"], run["batchnorm_batch"]) == (4, 4, 1, 4)
    assert "batchnorm_caveat" not in run and "BatchNorm" not in capsys.readouterr().err

    out = tmp_path / "accumulated"
    run_train("--recipe", "fcn_resnet50os8_voc", "--data-root", str(tmp_path / "data"),
              "--output-dir", str(out), "--max-iters", "1", "--batch-size", "4", "--per-device-batch", "1", *QUICK)
    run = json.loads((out / "run.json").read_text())
    assert (run["total_batch"], run["per_device_batch"], run["accumulation"], run["world_size"]) == (4, 1, 4, 1)
    caveat = "BatchNorm statistics differ from the reference's: each BatchNorm sees 1 image(s) per step"
    assert run["batchnorm_caveat"].startswith(caveat) and caveat in capsys.readouterr().err
    with pytest.raises(SystemExit, match="not a multiple"):
        train_module.main(["--recipe", "fcn_resnet50os8_voc", "--data-root", str(tmp_path / "data"), "--output-dir",
                           str(tmp_path / "bad"), "--max-iters", "1", "--batch-size", "3", "--per-device-batch", "2", *QUICK])


def _finetune_command(data: Path, init: Path, out: Path, max_iters: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "training.train", "--init", str(init), "--data-root", str(data),
            "--output-dir", str(out), "--max-iters", str(max_iters), "--batch-size", "2", "--checkpoint-interval", "1",
            "--seed", "7", "--device", "cpu", "--num-workers", "0", "--crop-size", "48", "--no-progress", *extra]


def test_a_killed_and_resumed_fine_tuning_run_ends_with_the_same_weights(tmp_path, tiny_folder):
    data = make_generic(tmp_path / "data")
    assert train_module.main(_finetune_command(data, tiny_folder, tmp_path / "straight", 6)[3:]) == 0  # in this process

    killed = tmp_path / "killed"
    process = subprocess.Popen(_finetune_command(data, tiny_folder, killed, 6), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "ckpt-00000003.pt").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "ckpt-00000006.pt").exists(), "the run finished before it could be killed"
    assert train_module.main(_finetune_command(data, tiny_folder, killed, 6, "--resume")[3:]) == 0  # resumed in this process

    a = torch.load(tmp_path / "straight" / "ckpt-00000006.pt", weights_only=True)["model"]
    b = torch.load(killed / "ckpt-00000006.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_damaged_newest_checkpoint_is_skipped_on_resume(tmp_path, capsys):
    make_voc(tmp_path / "data")
    out = tmp_path / "run"
    args = ["--recipe", "fcn_resnet50os8_voc", "--data-root", str(tmp_path / "data"), "--output-dir", str(out),
            "--batch-size", "2", "--checkpoint-interval", "1", *QUICK]
    run_train(*args, "--max-iters", "2")
    (out / "ckpt-00000002.pt").write_bytes((out / "ckpt-00000002.pt").read_bytes()[:1000])
    run_train(*args, "--max-iters", "3", "--resume")
    err = capsys.readouterr().err
    assert "skipping" in err and "ckpt-00000002.pt" in err and "resumed from" in err and "iteration 1" in err


@pytest.mark.parametrize("samples,batch,expected", [(10582, 16, 661), (20210, 16, 1263), (2975, 8, 372), (1000, 12, 83)])
def test_iterations_per_epoch_are_the_references(samples, batch, expected):
    """The reference's loader: DistributedSampler over its 8 GPUs (padding), batch total/8, drop_last."""
    from torch.utils.data import DataLoader, DistributedSampler

    from training.plan import reference_iters_per_epoch

    dataset = range(samples)
    if batch % 8 == 0:
        loader = DataLoader(dataset, batch_size=batch // 8, sampler=DistributedSampler(dataset, num_replicas=8, rank=0), drop_last=True)
        assert len(loader) == expected
    assert reference_iters_per_epoch(samples, batch) == expected
    cityscapes = fcn_zoo.CHECKPOINTS["fcn_resnet50os8_cityscapes"]
    assert cityscapes.epochs * reference_iters_per_epoch(2975, cityscapes.batch_size) == 81840


def test_confusion_matrix_agrees_with_torchmetrics():
    from torchmetrics.classification import MulticlassJaccardIndex

    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (4, 30, 40), generator=g)
    target[:, :3] = 255
    prediction = torch.where(torch.rand(target.shape, generator=g) < 0.7, target.clamp(max=4), torch.randint(0, 5, target.shape, generator=g))
    matrix = ConfusionMatrix(5)
    for p, t in zip(prediction, target):
        matrix.update(p, t)
    ours = matrix.compute()
    metric = MulticlassJaccardIndex(num_classes=5, ignore_index=255, average=None)
    theirs = metric(prediction, target)
    assert torch.allclose(torch.tensor(ours["IoU"], dtype=torch.float32), theirs, atol=1e-6)
    assert abs(ours["mIoU"] - float(theirs.mean())) < 1e-6


def test_evaluate_command_writes_the_report(tmp_path, tiny_folder, capsys):
    make_voc(tmp_path / "data")
    from training.evaluate import main

    assert main([str(tiny_folder), "--dataset", "voc", "--data-root", str(tmp_path / "data"), "--output-dir", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert len(report["IoU"]) == 21 and 0 <= report["mIoU"] <= 1 and report["pixels"] == 4 * 63 * 80
    assert (tmp_path / "eval" / "eval_iou.png").stat().st_size > 0
    assert report["samples_sha256"] == build_dataset("voc", tmp_path / "data", "val").fingerprint()
    # without --output-dir: beside the model folder, and said
    assert main([str(tiny_folder), "--dataset", "voc", "--data-root", str(tmp_path / "data"), "--device", "cpu",
                 "--max-samples", "1"]) == 0
    beside = tiny_folder.resolve().parent / f"eval-{tiny_folder.name}-val"
    assert f"wrote {beside / 'eval.json'} and {beside / 'eval_iou.png'}" in capsys.readouterr().out
    assert json.loads((beside / "eval.json").read_text())["model"] == str(tiny_folder)


def _two_ranks(argv: list[str], module: str, timeout: float = 120, setup: str = "") -> list[tuple[int, str]]:
    """``main(argv)`` of ``training.<module>`` as ranks 0 and 1 of a gloo group, each a plain process with
    the environment torchrun sets (torchrun itself would stop one process when the other fails; processes on
    two nodes are not stopped): each one's exit status and last line of stderr."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = f"import sys\n{setup}\nfrom training.{module} import main\nsys.exit(main({argv!r}))"
    processes = [subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
             "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank)},
    ) for rank in (0, 1)]
    deadline, ended = time.monotonic() + timeout, []
    for process in processes:
        try:
            _, err = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            pytest.fail(f"a process still waits {timeout:.0f} s after the start: an error did not reach every rank")
        ended.append((process.returncode, (err.strip().splitlines() or [""])[-1]))
    return ended


def test_an_error_in_one_process_reaches_every_process(tmp_path, tiny_folder):
    """A decompression bomb among the rows only rank 1 checks (a Hugging Face dataset is checked in shares):
    rank 0 stops too, saying it in one line, rather than in the gather, waiting for a process that has gone
    (NCCL: until its timeout; gloo here: a crash that names neither the row nor the error)."""
    pytest.importorskip("datasets", reason="the datasets extra (pip install 'fcn-zoo[datasets]')")
    from sample_data import hub_rows, make_hub_dataset

    _, masks = hub_rows(4)
    masks[1] = masks[1].resize((160, 128))  # 20480 pixels: over twice the 6000 allowed below
    data = make_hub_dataset(tmp_path / "bomb", {"train": 4, "validation": 2}, masks={"train": masks})
    ended = _two_ranks(["--init", str(tiny_folder), "--dataset-name", str(data), "--output-dir", str(tmp_path / "run"),
                        "--max-iters", "1", "--device", "cpu", "--num-workers", "0", "--no-progress"],
                       "train", setup="from PIL import Image; Image.MAX_IMAGE_PIXELS = 6000")
    assert all(status != 0 for status, _ in ended), ended
    said = ended[0][1]
    assert said.startswith("python -m training.train: ") and "exceeds limit of 12000 pixels" in said, ended
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_evaluate_under_two_processes_stops_both_when_the_report_cannot_be_written(tmp_path, tiny_folder):
    """Rank 0 writes the report: when its folder cannot be made, rank 1 says so too, in the same line,
    rather than evaluating and waiting for rank 0 in the reduction."""
    make_voc(tmp_path / "data", n_train=1, n_val=2)
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "eval"
    ended = _two_ranks([str(tiny_folder), "--dataset", "voc", "--data-root", str(tmp_path / "data"), "--device", "cpu",
                        "--output-dir", str(out)], "evaluate")
    assert [status for status, _ in ended] == [1, 1], ended
    assert ended[0][1] == ended[1][1], ended
    assert ended[0][1].startswith(f"python -m training.evaluate: {out}: the report's folder cannot be written"), ended


@pytest.mark.slow  # two processes each: run after the suite (python -m pytest -q -m slow)
@pytest.mark.parametrize("failing", ["checkpoint", "best"])
def test_a_write_that_fails_on_rank_0_stops_every_process(tmp_path, tiny_folder, failing):
    """Rank 0 alone writes checkpoints and best/: when its disk is full, rank 1 stops with the same line rather
    than waiting in the next step's gradient reduction for a process that has gone."""
    data = make_generic(tmp_path / "data", n_train=4, n_val=1, size=(48, 64))
    setup = "import os, torch\nif os.environ['RANK'] == '0':\n"
    if failing == "checkpoint":
        setup += "    def save(*a, **k): raise OSError(28, 'No space left on device')\n    torch.save = save\n"
    else:
        setup += ("    import training.train\n    def export(*a, **k): raise SystemExit('best: No space left on device')\n"
                  "    training.train.export_folder = export\n")
    ended = _two_ranks(["--init", str(tiny_folder), "--data-root", str(data), "--output-dir", str(tmp_path / "run"),
                        "--max-iters", "2", "--eval-interval", "1", "--checkpoint-interval", "1", "--batch-size", "2",
                        "--crop-size", "32", "--device", "cpu", "--num-workers", "0", "--no-progress"],
                       "train", setup=setup)
    assert all(status != 0 for status, _ in ended), ended
    assert ended[0][1] == ended[1][1] and "No space left on device" in ended[0][1], ended


def test_curves_show_a_single_logged_point(tmp_path):
    import matplotlib.image

    from training.train import plot_curves

    plot_curves({"loss": [[1, 2.5]], "miou": [[1, 0.3]]}, tmp_path / "one.png")
    image = matplotlib.image.imread(tmp_path / "one.png")[..., :3]
    blue = (abs(image - [0x1F / 255, 0x77 / 255, 0xB4 / 255]).max(-1) < 0.05)  # matplotlib's first line colour
    half = image.shape[1] // 2
    assert blue[:, :half].sum() > 20 and blue[:, half:].sum() > 20  # the one point is drawn in both panels


def _torchrun(out: Path, data: Path, port: int, *extra: str, wait: bool = True):
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc-per-node", "2", "--master-port", str(port), "-m", "training.train",
               "--recipe", "fcn_resnet50os8_voc", "--data-root", str(data), "--output-dir", str(out),
               "--max-iters", "6", "--batch-size", "4", "--checkpoint-interval", "1", *QUICK, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow  # several processes: run after the suite (python -m pytest -q -m slow)
def test_torchrun_with_two_processes_killed_and_resumed_ends_as_an_uninterrupted_run(tmp_path):
    """DDP over two CPU processes (Gloo): losses and the confusion matrix are reduced, rank 0 writes; each rank
    draws its own dropout masks, and a run killed and resumed ends with the weights of an uninterrupted one."""
    make_voc(tmp_path / "data")
    out = tmp_path / "run"
    result = _torchrun(out, tmp_path / "data", 29517)
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert (run["world_size"], run["per_device_batch"], run["accumulation"]) == (2, 2, 1)  # total / processes
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]
    report = [r for r in log if "mIoU" in r]
    assert len(report) == 1  # written once, by rank 0
    # each rank evaluated half of the val set; the summed matrix equals a one-process evaluation
    single = evaluate(fcn_zoo.from_pretrained(out / "best"), build_dataset("voc", tmp_path / "data", "val"),
                      eval_size=(256, 64), progress=False)
    assert abs(report[0]["mIoU"] - single["mIoU"]) < 1e-9
    rng = torch.load(out / "ckpt-00000006.pt", weights_only=True)["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])  # one RNG state per rank, not alike

    killed = tmp_path / "killed"
    process = _torchrun(killed, tmp_path / "data", 29518, wait=False)
    deadline = time.time() + 240
    while not (killed / "ckpt-00000002.pt").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "ckpt-00000006.pt").exists(), "the run finished before it could be killed"
    result = _torchrun(killed, tmp_path / "data", 29519, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    a = torch.load(out / "ckpt-00000006.pt", weights_only=True)["model"]
    b = torch.load(killed / "ckpt-00000006.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_backbone_weights_from_timm_and_openmmlab_files(tmp_path, monkeypatch):
    import timm
    from safetensors.torch import save_file

    from training.backbones import load_backbone_file

    source = timm.create_model("resnet18d")  # an ImageNet classifier as timm saves it, fc included
    for p in source.parameters():
        p.data.normal_()
    save_file(source.state_dict(), tmp_path / "timm.safetensors")
    # openmmlab's V1c files name the deep stem stem.0-7 and wrap the weights in state_dict
    renamed = {(k.replace("conv1.", "stem.", 1) if k.startswith("conv1.") else k.replace("bn1.", "stem.7.", 1) if k.startswith("bn1.") else k): v
               for k, v in source.state_dict().items() if not k.startswith("fc.")}
    torch.save({"state_dict": renamed}, tmp_path / "openmmlab.pth")

    for name in ("timm.safetensors", "openmmlab.pth"):
        model = fcn_zoo.FCN(backbone="resnet18d", head_channels=16, aux_channels=16)
        load_backbone_file(model, tmp_path / name)
        ours = model.backbone.state_dict()
        assert all(torch.equal(ours[k], source.state_dict()[k]) for k in ours), name

    torch.save({"state_dict": {"layer1.0.conv1.weight": torch.zeros(1)}}, tmp_path / "wrong.pth")
    with pytest.raises(SystemExit, match="does not fit the backbone"):
        load_backbone_file(fcn_zoo.FCN(backbone="resnet18d"), tmp_path / "wrong.pth")

    # --backbone-weights openmmlab: downloaded once (here from a loopback mirror), checked against the sha256
    # prefix in its name, cached
    import hashlib

    import training.backbones as backbones
    from conftest import serve_folder

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    prefix = hashlib.sha256((tmp_path / "openmmlab.pth").read_bytes()).hexdigest()[:8]
    (tmp_path / "openmmlab.pth").rename(mirror / f"resnet18d_v1c-{prefix}.pth")
    (mirror / "resnet18d_v1c-00000000.pth").write_bytes((mirror / f"resnet18d_v1c-{prefix}.pth").read_bytes())
    cached = tmp_path / "fcn_zoo_cache" / "backbones"
    with serve_folder(mirror) as url:
        monkeypatch.setenv("FCN_ZOO_OPENMMLAB_URL", url)
        monkeypatch.setitem(backbones.OPENMMLAB_FILES, "resnet18d", "resnet18d_v1c-00000000.pth")  # not what its name says
        model = fcn_zoo.FCN(backbone="resnet18d", head_channels=16, aux_channels=16)
        with pytest.raises(SystemExit, match=f"has sha256 {prefix}[0-9a-f]{{56}}, its name says 00000000"):
            backbones.initialise_backbone(model, "resnet18d", 8, "openmmlab")
        assert not list(cached.glob("*"))  # not kept
        monkeypatch.setitem(backbones.OPENMMLAB_FILES, "resnet18d", f"resnet18d_v1c-{prefix}.pth")
        backbones.initialise_backbone(model, "resnet18d", 8, "openmmlab")
    ours = model.backbone.state_dict()
    assert all(torch.equal(ours[k], source.state_dict()[k]) for k in ours)
    assert [p.name for p in cached.iterdir()] == [f"resnet18d_v1c-{prefix}.pth"]
    backbones.initialise_backbone(model, "resnet18d", 8, "openmmlab")  # the mirror is gone: from the cache
    good = (cached / f"resnet18d_v1c-{prefix}.pth").read_bytes()
    (cached / f"resnet18d_v1c-{prefix}.pth").write_bytes(good[:-8] + b"replaced")  # a cached file changed by hand
    with pytest.raises(SystemExit, match="its name says .*delete it"):
        backbones.initialise_backbone(model, "resnet18d", 8, "openmmlab")
    monkeypatch.delitem(backbones.OPENMMLAB_FILES, "resnet18d")
    with pytest.raises(SystemExit, match="not resnet18d; use --backbone-weights timm"):
        backbones.initialise_backbone(model, "resnet18d", 8, "openmmlab")


def test_precision_and_determinism_follow_what_the_device_can_do(monkeypatch):
    import warnings

    from training.precision import configure_determinism, nondeterministic_ops, training_precision

    ampere = training_precision("cuda", fp32=False, bf16_supported=True)
    assert (ampere.name, ampere.dtype, ampere.scaler) == ("bf16", torch.bfloat16, False)
    volta = training_precision("cuda", fp32=False, bf16_supported=False)  # V100, T4: no bf16
    assert (volta.name, volta.dtype, volta.scaler) == ("fp16", torch.float16, True) and "gradient scaler" in volta.note
    assert training_precision("cuda", fp32=True, bf16_supported=True).name == "fp32"
    assert training_precision("cpu", fp32=False, bf16_supported=True) == training_precision("cpu", True, False)

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        configure_determinism(True, torch.device("cuda"))
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert not torch.backends.cudnn.benchmark and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        configure_determinism(False, torch.device("cuda"))
        assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
        configure_determinism(False, torch.device("cpu"))
        assert not torch.backends.cudnn.benchmark
    finally:
        configure_determinism(False, torch.device("cpu"))
        torch.backends.cudnn.deterministic = False

    found: list[str] = []
    with nondeterministic_ops(True, found):  # what torch says under warn_only, once per op
        for op in ("upsample_bilinear2d_backward_out_cuda", "nll_loss2d_forward_out_cuda_template", "upsample_bilinear2d_backward_out_cuda"):
            warnings.warn(f"{op} does not have a deterministic implementation, but you set "
                          "'torch.use_deterministic_algorithms(True, warn_only=True)'", UserWarning)
        warnings.warn("something else", UserWarning)
    assert found == ["upsample_bilinear2d_backward_out_cuda", "nll_loss2d_forward_out_cuda_template"]


def test_cudnns_autotuner_is_off_while_training_evaluates_and_on_again_after(tmp_path, monkeypatch):
    """On a GPU training autotunes its one crop size; evaluation's images come in many sizes."""
    make_voc(tmp_path / "data", n_train=2, n_val=1)
    seen = []

    def as_on_a_gpu(deterministic, device):
        torch.backends.cudnn.benchmark = True

    def evaluate_and_look(*args, **kwargs):
        seen.append(torch.backends.cudnn.benchmark)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "configure_determinism", as_on_a_gpu)
    monkeypatch.setattr(train_module, "evaluate", evaluate_and_look)
    try:
        run_train("--recipe", "fcn_resnet50os8_voc", "--data-root", str(tmp_path / "data"), "--output-dir",
                  str(tmp_path / "run"), "--max-iters", "2", "--eval-interval", "1", "--batch-size", "2", *QUICK)
        assert seen == [False, False] and torch.backends.cudnn.benchmark  # off for each evaluation, on for the steps
    finally:
        torch.backends.cudnn.benchmark = False


def test_a_deterministic_cpu_run_runs_and_records_its_choices(tmp_path):
    make_voc(tmp_path / "data")
    out = tmp_path / "run"
    run_train("--recipe", "fcn_resnet50os8_voc", "--data-root", str(tmp_path / "data"), "--output-dir", str(out),
              "--max-iters", "1", "--batch-size", "2", "--deterministic", *QUICK)
    run = json.loads((out / "run.json").read_text())
    assert (run["precision"], run["grad_scaler"], run["deterministic"], run["cudnn_benchmark"]) == ("fp32", False, True, False)
    assert run["loader_workers"] == 0 and "nondeterministic_ops" not in run  # the CPU has a deterministic kernel for each
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if "loss" in line]
    assert 0 <= steps[0]["loader_wait_share"] <= 1 and steps[0]["data_images_per_s"] > 0


def test_numbers_out_of_range_and_an_earlier_runs_folder_are_refused_before_anything_loads(tmp_path, tiny_folder):
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "ckpt-00000003.pt").write_bytes(b"an earlier run's")
    start = ["--init", str(tiny_folder), "--data-root", str(tmp_path / "nowhere"), "--device", "cpu", "--output-dir"]
    for extra, said in [(["--max-iters", "0"], "--max-iters 0: must be at least 1"),
                        (["--crop-size", "0"], "--crop-size 0: each side must be 1..8192"),
                        (["--lr", "-1"], "--lr -1.0: must be positive"),
                        (["--eval-max-samples", "0"], "--eval-max-samples 0: must be at least 1"),
                        ([], f"--output-dir {earlier}: holds an earlier run (ckpt-00000003.pt); pass --resume to continue it")]:
        with pytest.raises(SystemExit) as refused:
            train_module.main([*start, str(earlier if not extra else tmp_path / "new"), *extra])
        assert str(refused.value.code) == f"python -m training.train: {said}" + (", or a new --output-dir" if not extra else "")
    assert not (tmp_path / "new").exists() and [p.name for p in earlier.iterdir()] == ["ckpt-00000003.pt"]


def test_an_lr_below_the_poly_floor_never_rises(tmp_path):
    """The poly decay ends at 1e-4, or at --lr where that is lower: --lr 1e-5 does not climb towards 1e-4."""
    make_voc(tmp_path / "data", n_train=4, n_val=1, size=(48, 64))
    out = tmp_path / "run"
    run_train("--recipe", "fcn_resnet50os8_voc", "--data-root", str(tmp_path / "data"), "--output-dir", str(out),
              "--max-iters", "2", "--batch-size", "2", "--lr", "1e-5", *QUICK)
    lrs = [json.loads(line)["lr"] for line in (out / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(lrs) == 2 and all(lr <= 1e-5 for lr in lrs), lrs


def test_a_resumed_run_logs_each_iteration_once(tmp_path):
    """Iterations logged after the checkpoint a run resumes from (and a line cut short by the kill) are not
    kept twice: log.jsonl holds each iteration's record once, and one evaluation."""
    make_voc(tmp_path / "data", n_train=4, n_val=1, size=(48, 64))
    out = tmp_path / "run"
    args = ["--recipe", "fcn_resnet50os8_voc", "--data-root", str(tmp_path / "data"), "--output-dir", str(out),
            "--max-iters", "3", "--batch-size", "2", "--checkpoint-interval", "2", *QUICK]
    run_train(*args)
    (out / "ckpt-00000003.pt").unlink()  # as if killed after iteration 3 was logged, before its checkpoint
    with open(out / "log.jsonl", "a") as log:
        log.write('{"iter": 4, "lo')
    run_train(*args, "--resume")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log if "loss" in r] == [1, 2, 3]
    assert [r["iter"] for r in log if "mIoU" in r] == [3]


def test_a_leftover_old_folder_does_not_stop_the_export(tmp_path):
    """best.old/ left by a run killed between export's two renames: the next export replaces best/ all the same."""
    from types import SimpleNamespace

    from training.results import export_folder

    data = make_generic(tmp_path / "data", n_train=1, n_val=1, size=(48, 64))
    val = build_dataset("generic", data, "val")
    plan = SimpleNamespace(val_set=val, row=None, meta={"data": {"name": "data"}})
    model = fcn_zoo.FCN(num_classes=3, backbone="resnet10t", head_channels=8, aux_channels=None)
    results = {"mIoU": 0.5, "IoU": [0.5, 0.5, 0.5]}
    (tmp_path / "best.old").mkdir()
    (tmp_path / "best.old" / "model.safetensors").write_bytes(b"the previous best")
    export_folder(model, plan, results, {"iteration": 1}, tmp_path / "best")
    (tmp_path / "best.old").mkdir()
    (tmp_path / "best.old" / "model.safetensors").write_bytes(b"the previous best")
    export_folder(model, plan, {**results, "mIoU": 0.75}, {"iteration": 2}, tmp_path / "best")
    provenance = json.loads((tmp_path / "best" / "provenance.json").read_text())
    assert (provenance["run"]["iteration"], provenance["measured_miou"]) == (2, 75.0)
    assert not (tmp_path / "best.old").exists() and not (tmp_path / "best.new").exists()


def test_evaluate_refuses_a_val_fraction_on_a_layout_with_its_own_val_split(tmp_path, tiny_folder):
    from training import evaluate as evaluate_module

    make_voc(tmp_path / "data")
    with pytest.raises(SystemExit) as refused:
        evaluate_module.main([str(tiny_folder), "--data-root", str(tmp_path / "data"), "--val-fraction", "0.2",
                              "--device", "cpu", "--output-dir", str(tmp_path / "eval")])
    assert "--val-fraction holds out part of your own folder's" in str(refused.value.code)
    assert "voc's layout, whose val split is its own" in str(refused.value.code)


def test_evaluate_takes_nothing_from_a_folder_named_as_the_zoo_row_it_scores(tmp_path, monkeypatch):
    """A zoo name is its row even beside a folder of that name: evaluate's report, classes and splits are not that
    folder's."""
    from training.evaluate import _model_classes, _training_run, default_output_dir

    name = "fcn_resnet50os8_voc"
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.json").write_text(json.dumps({"class_names": ["a", "b"]}))
    (tmp_path / name / "provenance.json").write_text(json.dumps({"run": {"val_fraction": 0.5}}))
    assert _model_classes(name) is None and _training_run(name) == {}
    assert default_output_dir(name, "val") == Path("eval") / f"{name}-val"
    assert _model_classes(f"./{name}") == (["a", "b"], None) and _training_run(f"./{name}") == {"val_fraction": 0.5}
