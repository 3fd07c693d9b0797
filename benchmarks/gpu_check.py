"""Every GPU path once, in one command, with a report in benchmarks/RESULTS.md's format.

    python benchmarks/gpu_check.py                      # on the GPU: under 8 minutes on one H100/H200
    python benchmarks/gpu_check.py --device cpu --tiny  # the same checks, small, on a CPU (the suite runs this)

Checks, each one a row of the report (a failure is recorded with its one-line reason, and the rest go on):

- predict on the device against predict on the CPU, same weights: label agreement in fp32, bf16 (where the
  device has it) and fp16 (GPUs);
- batched sliding windows and TTA on the device, against the CPU;
- ``compile=True`` against eager, same device;
- labels beside the next forward pass (``predict_iter``'s overlap: their own thread and CUDA stream) against
  labels in turn: images/s of each, the same labels;
- the model ``fcn-zoo predict`` runs (fused in place: channels_last on a GPU), and a channels_last model saved
  and loaded (what a GPU training run writes as best/);
- ``fcn-zoo predict DIR``: images/s over generated photos, and the share of the wall time the device was
  busy (CUDA events around each forward);
- evaluation on the device (single scale, and multi-scale + flip with single scale from the same passes)
  against the CPU's, and an int8 model (OpenVINO, on the CPU of a GPU machine) that refuses the GPU in one
  line and agrees with fp32 (not on a CPU: tests/test_int8.py checks it there);
- training R-50 OS8 and R-101 OS8 at the recipe's batch and crop (``--tiny``: resnet10t at 64x64) for 30
  iterations (``--tiny``: 3) in the default precision and with ``--fp32``: images/s, peak memory;
- ``--deterministic`` for 2 iterations, and the ops torch has no deterministic kernel for;
- a run killed after its second checkpoint and resumed ends with the weights of an uninterrupted one: on the
  CPU equal, on a GPU within what two uninterrupted runs differ by (bf16 and the atomics of bilinear
  upsampling's backward are not bit-reproducible there; docs/training.md);
- with two or more GPUs, a 2-process torchrun training run.

Needs the test extra (``pip install -e ".[test]"``); the data (VOC layout, random weights) is generated.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import fcn_zoo  # noqa: E402
from fcn_zoo.protocol import native_bf16  # noqa: E402
from sample_data import make_voc  # noqa: E402


class Report:
    def __init__(self):
        self.rows: list[tuple[str, str, str]] = []

    def check(self, name: str, fn) -> None:
        start = time.perf_counter()
        try:
            result = fn()
            status = "ok"
        except Exception as e:  # a failed check is a row of the report; the others still run
            result, status = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}", "FAILED"
            traceback.print_exc()
        seconds = time.perf_counter() - start
        self.rows.append((name, status, f"{result} ({seconds:.1f} s)"))
        print(f"{status:6s} {name}: {result} ({seconds:.1f} s)", flush=True)

    def markdown(self, header: str) -> str:
        lines = [header, "", "| check | status | result |", "|---|---|---|"]
        lines += [f"| {n} | {s} | {r} |" for n, s, r in self.rows]
        return "\n".join(lines) + "\n"


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a == b).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a small backbone and sizes: minutes on a CPU")
    parser.add_argument("--out", type=Path, help="also write the report (markdown) here")
    args = parser.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    tiny = args.tiny
    report = Report()
    gpu = torch.cuda.get_device_name(device) if on_gpu else "CPU"
    bf16 = native_bf16(device)  # what runs bf16 natively, not what emulates it (a V100, a CPU without AVX512-BF16)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        torch.manual_seed(0)
        config = dict(num_classes=21, backbone="resnet10t" if tiny else "resnet50c", output_stride=8, dataset="voc",
                      head_channels=32 if tiny else 512, aux_channels=16 if tiny else 512)
        cpu_model = fcn_zoo.FCN(**config).eval()
        cpu_model.eval_size = (160, 120) if tiny else (2048, 512)
        cpu_model.save_pretrained(work / "model")
        photos = _photos(work / "photos", 6 if tiny else 48, (120, 90) if tiny else (500, 375))
        dev_model = fcn_zoo.from_pretrained(work / "model", device=str(device))
        dev_model.eval_size = cpu_model.eval_size
        expected = [s.labels for s in cpu_model.predict(photos[:3])]

        def precision_agreement():
            out = {}
            for precision in ["fp32"] + (["bf16"] if bf16 else []) + (["fp16"] if on_gpu else []):
                got = [s.labels for s in dev_model.predict(photos[:3], precision=precision)]
                out[precision] = round(min(agreement(g, e) for g, e in zip(got, expected)), 4)
            return f"label agreement with the CPU's fp32: {out}"

        report.check("predict on the device vs the CPU", precision_agreement)

        def slide_and_tta():
            window = (64, 64) if tiny else (512, 512)
            tta = fcn_zoo.TTA(scales=(0.75, 1.0)) if tiny else True  # --tiny on a CPU: the paths, not the sizes
            cpu = [s.labels for s in cpu_model.predict(photos[:2], mode="slide", window=window, tta=tta)]
            got = [s.labels for s in dev_model.predict(photos[:2], mode="slide", window=window, tta=tta, batch_size=8)]
            return f"batched slide + TTA, label agreement {min(agreement(g, e) for g, e in zip(got, cpu)):.4f}"

        report.check("sliding windows and TTA", slide_and_tta)

        def compiled():
            eager = [s.labels for s in dev_model.predict(photos[:2])]
            got = [s.labels for s in dev_model.predict(photos[:2], compile=True)]
            return f"label agreement with eager {min(agreement(g, e) for g, e in zip(got, eager)):.4f}"

        if on_gpu or not tiny:
            report.check("compile=True", compiled)
        else:  # compiling for the CPU takes a minute; tests/test_predict.py checks it there
            report.rows.append(("compile=True", "skipped", "not in --tiny on a CPU"))

        def overlap():
            rates, labels = {}, {}
            for beside in (False, True):
                start = time.perf_counter()
                labels[beside] = [s.labels for _, s in dev_model.predict_iter(photos, overlap=beside, batch_size=2)]
                rates[beside] = len(photos) / (time.perf_counter() - start)
            same = all(np.array_equal(a, b) for a, b in zip(labels[False], labels[True]))
            assert same, "labels made beside the next forward differ from labels made in turn"
            return f"{rates[True]:.1f} images/s beside the next forward, {rates[False]:.1f} in turn, the same labels"

        report.check("labels beside the next forward", overlap)

        def layouts():
            from fcn_zoo._fusion import fuse

            loaded = fuse(fcn_zoo.from_pretrained(work / "model", device=str(device)))  # as fcn-zoo predict does
            weight = next(p for p in loaded.parameters() if p.dim() == 4 and p.shape[-1] > 1)  # a 3x3 convolution's
            fused = "channels_last" if weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous() else "NCHW"
            assert fused == ("channels_last" if on_gpu else "NCHW"), f"fcn-zoo predict's fused model is {fused}"
            trained = fcn_zoo.from_pretrained(work / "model", device=str(device)).to(memory_format=torch.channels_last)
            trained.save_pretrained(work / "channels_last")
            again = fcn_zoo.from_pretrained(work / "channels_last", device=str(device)).state_dict()
            assert all(torch.equal(v, again[k]) for k, v in trained.state_dict().items()), "weights changed"
            return f"fcn-zoo predict's fused model {fused}; a channels_last model saved and loaded, equal weights"

        report.check("memory layouts", layouts)

        def bulk():
            from fcn_zoo.runner import Outputs, segment_sources
            from fcn_zoo.inputs import expand_inputs

            sources = expand_inputs([str(work / "photos")]).sources
            busy = _busy_timer(dev_model, device)
            start = time.perf_counter()
            totals = segment_sources(dev_model, sources, Outputs(work / "masks"), quiet=True, echo=lambda _: None,
                                     precision="bf16" if bf16 and on_gpu else "fp32")
            wall = time.perf_counter() - start
            assert totals.done == len(sources), totals
            return f"{len(sources) / wall:.1f} images/s, the device busy {busy() / wall:.0%} of the wall time"

        report.check("fcn-zoo predict DIR", bulk)

        data = make_voc(work / "voc", n_train=8, n_val=2, size=(96, 128) if tiny else (375, 500))

        def evaluation():
            from training.evaluate import evaluate
            from training.sources import build_dataset

            val = build_dataset("voc", data, "val")
            tta = fcn_zoo.TTA(scales=(0.75, 1.0)) if tiny else fcn_zoo.TTA()
            cpu, got = (evaluate(m, val, tta=tta, progress=False) for m in (cpu_model, dev_model))
            gap = max(abs(cpu["mIoU"] - got["mIoU"]), abs(cpu["single_scale"]["mIoU"] - got["single_scale"]["mIoU"]))
            assert gap < 0.01, f"mIoU {got['mIoU']:.4f} on the device, {cpu['mIoU']:.4f} on the CPU"
            return (f"mIoU multi-scale + flip {100 * got['mIoU']:.2f}, single scale {100 * got['single_scale']['mIoU']:.2f}; "
                    f"the CPU's within {100 * gap:.2f} points")

        report.check("evaluate on the device vs the CPU", evaluation)

        def int8():
            calibration = [str(p) for p in photos]
            quantized = fcn_zoo.quantize(cpu_model, calibration[:4], validation=calibration[4:8])
            try:
                quantized.predict(photos[0], device=str(device))
                refused = "ran on the GPU"
            except ValueError as e:
                refused = "refuses the GPU" if "runs on the CPU by OpenVINO" in str(e) else f"refused: {e}"
            agreement_ = min(agreement(q.labels, e) for q, e in zip(quantized.predict(photos[:3]), expected))
            assert refused == "refuses the GPU", refused
            return f"int8 {refused} in one line; on the CPU, label agreement with fp32 {agreement_:.4f}"

        if on_gpu:
            report.check("int8 model on a GPU machine", int8)
        else:
            report.rows.append(("int8 model on a GPU machine", "skipped", "not on a CPU (tests/test_int8.py)"))
        rows = [("resnet10t", 8)] if tiny else [("resnet50c", 8), ("resnet101c", 8)]
        common = ["--data-root", str(data), "--device", str(device), "--no-progress", "--backbone-weights", "none",
                  "--eval-max-samples", "1"]
        if tiny:
            common += ["--crop-size", "64", "--scale", "256", "64", "--head-channels", "32", "--num-workers", "0"]
        iters = "3" if tiny else "30"
        for backbone, os_ in rows:
            for extra in ([], ["--fp32"]) if on_gpu else ([],):  # a CPU trains in fp32 by default
                name = f"train {backbone} OS{os_} {'fp32' if extra else 'default precision'}"
                out = work / f"run-{backbone}-{len(extra)}"
                report.check(name, lambda out=out, backbone=backbone, extra=extra: _train(
                    out, ["--recipe", "fcn_resnet50os8_voc", "--backbone", backbone, "--max-iters", iters,
                          "--batch-size", "4" if tiny else "16", "--log-interval", "1", *common, *extra]))
        if on_gpu or not tiny:
            report.check("train --deterministic", lambda: _train(
                work / "run-det", ["--recipe", "fcn_resnet50os8_voc", "--backbone", rows[0][0], "--max-iters", "2",
                                   "--batch-size", "4" if tiny else "16", "--deterministic", *common]))
        else:  # the CPU has a deterministic kernel for every op
            report.rows.append(("train --deterministic", "skipped", "not in --tiny on a CPU (tests/test_training.py)"))
        report.check("a killed run resumed ends as an uninterrupted one", lambda: _kill_and_resume(
            work, ["--recipe", "fcn_resnet50os8_voc", "--backbone", rows[0][0], "--batch-size", "4" if tiny else "8",
                   "--checkpoint-interval", "1", "--seed", "3", *common], exact=not on_gpu))
        if on_gpu and torch.cuda.device_count() >= 2:
            report.check("torchrun, 2 GPUs", lambda: _torchrun(work, ["--recipe", "fcn_resnet50os8_voc", "--backbone", rows[0][0],
                                                                       "--max-iters", iters, "--batch-size", "16", *common]))

    header = (f"## gpu_check.py on {gpu} ({'tiny' if tiny else 'full'} sizes)\n\n```bash\npython benchmarks/gpu_check.py "
              f"--device {args.device}{' --tiny' if tiny else ''}\n```\n\ntorch {torch.__version__}, {gpu}, bf16 "
              f"{'yes' if bf16 else 'no'}")
    text = report.markdown(header)
    print("\n" + text)
    if args.out:
        args.out.write_text(text)
    return 1 if any(s == "FAILED" for _, s, _ in report.rows) else 0


def _photos(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        image = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
        image[size[1] // 4:size[1] // 2, size[0] // 4:size[0] // 2] = (200, 40, 40)  # structure, not only noise
        paths.append(folder / f"{i:04d}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


def _busy_timer(model, device: torch.device):
    """Total time the device spent in the network, measured around each forward (CUDA events on GPUs)."""
    spans: list = []
    forward = type(model).forward_features

    def timed(self, x):
        if device.type != "cuda":
            start = time.perf_counter()
            out = forward(self, x)
            spans.append(time.perf_counter() - start)
            return out
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        out = forward(self, x)
        end.record()
        spans.append((begin, end))
        return out

    type(model).forward_features = timed

    def total() -> float:
        type(model).forward_features = forward
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            return sum(b.elapsed_time(e) for b, e in spans) / 1000
        return sum(spans)

    return total


def _command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "fcn_zoo.cli", "train", *args]


def _train(out: Path, args: list[str]) -> str:
    run = subprocess.run(_command([*args, "--output-dir", str(out)]), capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr.strip().splitlines()[-1] if run.stderr.strip() else run.returncode
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    meta = json.loads((out / "run.json").read_text())
    rate = np.median([s["images_per_s"] for s in steps[1:]] or [steps[-1]["images_per_s"]])
    extra = f", non-deterministic ops: {meta['nondeterministic_ops']}" if meta.get("nondeterministic_ops") else ""
    return (f"{meta['precision']}{' + GradScaler' if meta.get('grad_scaler') else ''}, {rate:.1f} images/s, peak "
            f"{steps[-1]['memory_mb']:.0f} MB, loader wait {steps[-1].get('loader_wait_share', 0):.0%}, data pipeline alone "
            f"{steps[-1].get('data_images_per_s', 0):.0f} images/s{extra}")


def _kill_and_resume(work: Path, args: list[str], exact: bool) -> str:
    """A run killed after its second checkpoint and resumed, against an uninterrupted one: equal weights where
    training is bit-reproducible (``exact``: the CPU), else no further apart than two uninterrupted runs are
    (twice that, or 1e-5 of the weights' scale where they agree)."""
    import torch as t

    straight, killed = work / "straight", work / "killed"
    _train(straight, [*args, "--max-iters", "6"])
    process = subprocess.Popen(_command([*args, "--max-iters", "6", "--output-dir", str(killed)]), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "ckpt-00000002.pt").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "ckpt-00000006.pt").exists(), "the run ended before it could be killed"
    _train(killed, [*args, "--max-iters", "6", "--resume"])
    def weights(out: Path) -> dict:
        return t.load(out / "ckpt-00000006.pt", weights_only=True)["model"]

    def distance(a: dict, b: dict) -> float:  # the largest difference, relative to the tensor's scale
        return max(float((a[k].float() - b[k].float()).abs().max() / a[k].float().abs().max().clamp(min=1e-12))
                   for k in a if a[k].is_floating_point())

    a, b = weights(straight), weights(killed)
    if exact:
        different = [k for k in a if not t.equal(a[k], b[k])]
        assert not different, f"{len(different)} tensors differ, e.g. {different[0]}"
        return "equal weights after 6 iterations"
    _train(work / "straight2", [*args, "--max-iters", "6"])
    noise, resumed = distance(a, weights(work / "straight2")), distance(a, b)
    assert resumed <= max(2 * noise, 1e-5), f"resumed run {resumed:.2e} from the uninterrupted one; two uninterrupted runs {noise:.2e}"
    return f"after 6 iterations, {resumed:.2e} from the uninterrupted run (two uninterrupted runs: {noise:.2e})"


def _torchrun(work: Path, args: list[str]) -> str:
    out = work / "torchrun"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "fcn_zoo.cli",
                          "train", *args, "--output-dir", str(out)], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "4"})
    assert run.returncode == 0, run.stderr.strip().splitlines()[-1]
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    return f"2 processes, {steps[-1]['images_per_s']:.1f} images/s"


if __name__ == "__main__":
    sys.exit(main())
