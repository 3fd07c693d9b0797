"""Reproduce a row of the zoo with the reference recipe, or fine-tune any FCN on your own data and classes.

    torchrun --nproc-per-node 8 -m fcn_zoo.cli train --recipe fcn_resnet50os8_voc --data-root /data --output-dir runs/r50os8_voc
    fcn-zoo train --init fcn_resnet50os16_voc --data-root DATA --output-dir runs/mine   # DATA: see training.generic
    fcn-zoo train --recipe fcn_resnet50os8_voc --data-root /data --output-dir /tmp/run \\
        --device cpu --max-iters 2 --batch-size 2 --crop-size 64 --backbone-weights none

SGD (momentum 0.9, weight decay 5e-4), poly decay (power 0.9, min lr 1e-4, or ``--lr`` if lower) per iteration, cross-entropy +
0.4 x auxiliary cross-entropy (the main head's alone for a model without an auxiliary head), SyncBatchNorm and DDP over the processes. ``--recipe``: the row's lr,
epochs, crop and total batch (16, Cityscapes 8), split over the processes with gradient accumulation when
fewer devices hold it. ``--init``: the fine-tuning defaults of :mod:`training.plan`. bf16 autocast and
channels_last on GPUs unless ``--fp32``. Checkpoints (model, optimizer, scheduler, iteration, RNG) are
written atomically every ``--checkpoint-interval`` iterations; ``--resume`` continues from the newest. Each
process seeds its RNG with ``--seed`` plus its rank (dropout differs between GPUs, as in timm), and the
checkpoint keeps every process's RNG state, so a resumed run ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

import fcn_zoo
from fcn_zoo._files import write_json
from fcn_zoo.errors import FCNZooError
from fcn_zoo.protocol import native_bf16

from .checkpoints import resume, save_checkpoint
from .data import IGNORE_INDEX, DatasetLayoutError, RunSampler, TimedSamples
from .distributed import DistributedContext, init_distributed, shared_step
from .evaluate import evaluate, sample_count
from .plan import FINETUNE_BATCH, FINETUNE_CROP, FINETUNE_EPOCHS, FINETUNE_LR, FINETUNE_MIN_ITERS, make_plan
from .precision import configure_determinism, nondeterministic_ops, training_precision, without_autotuning
from .results import export_folder, final_line, plot_curves, push_best
from .sources import add_hub_arguments

MIN_LR = 1e-4
POLY_POWER = 0.9
AUX_WEIGHT = 0.4


def parse_args(argv: list[str] | None = None, prog: str = "python -m training.train") -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n")[0],
        epilog=f"Fine-tuning defaults (--init): {FINETUNE_EPOCHS} epochs and at least {FINETUNE_MIN_ITERS} iterations (a given "
        "--epochs as it is), "
        f"lr {FINETUNE_LR}, batch {FINETUNE_BATCH} (or the training set if smaller), crop {FINETUNE_CROP} (or the "
        "images' size if smaller), resize bound the images' median size (or the --init model's if smaller), "
        "evaluation 10 times over the run; best/ keeps the best.",
    )
    what = p.add_argument_group("what to train")
    what.add_argument("--recipe", choices=fcn_zoo.list_models(), help="the zoo row to reproduce with the reference recipe")
    what.add_argument("--init", metavar="SOURCE", help="fine-tune: a zoo name, Hub repo id, save_pretrained folder or reference .pth")
    p.add_argument("--data-root",
                   help="your data (classes.txt, images/, masks/) or the folder holding VOCdevkit, ADEChallengeData2016 or "
                   "leftImg8bit + gtFine (or --dataset-name)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--dataset", choices=("generic", "voc", "ade20k", "cityscapes"), help="the layout of --data-root (default: detected)")
    p.add_argument("--val-fraction", type=float, help="without images/val (or a validation split): hold out this share of "
                   "the images, chosen by id or row (e.g. 0.1)")
    p.add_argument("--class-weights", choices=("none", "auto"), default="none", help="auto: median frequency balancing of the loss")
    p.add_argument("--freeze-backbone", action="store_true", help="train the heads only (backbone weights and BatchNorm statistics fixed)")
    p.add_argument("--push-to-hub", metavar="OWNER/REPO", help="upload best/ to this Hub repo at the end (needs hf auth login)")
    p.add_argument("--backbone-weights", help="--recipe: 'openmmlab' (default: the reference's ImageNet V1c files, downloaded once), "
                   "'timm' (timm's V1c ImageNet weights), 'none', or a file")
    p.add_argument("--backbone", help="--recipe: another timm backbone than the recipe's (e.g. resnet18d for quick runs)")
    p.add_argument("--head-channels", type=int, help="--recipe: narrower heads than the recipe's 512 (for quick runs)")
    add_hub_arguments(p)
    p.add_argument("--device", help="cpu, cuda (default: this process's GPU if any)")
    p.add_argument("--batch-size", type=int, help="total batch over all processes (default: the recipe's, or 8)")
    p.add_argument("--per-device-batch", type=int, help="images per device per step (default: the total batch / the processes; fewer accumulate gradients over steps)")
    p.add_argument("--crop-size", type=int, nargs="+", help="crop H [W] (default: the recipe's)")
    p.add_argument("--scale", type=int, nargs=2, metavar=("LONG", "SHORT"),
                   help="resize bound of training (times 0.5-2.0) and evaluation (default: the dataset's, e.g. 2048 512)")
    p.add_argument("--epochs", type=int, help=f"default: the recipe's, or {FINETUNE_EPOCHS} when fine-tuning")
    p.add_argument("--max-iters", type=int, help="default: epochs x iterations per epoch")
    p.add_argument("--lr", type=float, help=f"default: the recipe's (0.01), or {FINETUNE_LR} when fine-tuning")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast, no channels_last on GPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--num-workers", type=int,
                   help="data-loading processes per training process (default: on GPUs the cores per process less one, "
                   "at most 8; on the CPU 0, since the network uses every core)")
    p.add_argument("--checkpoint-interval", type=int, default=1000)
    p.add_argument("--eval-interval", type=int, help="also evaluate every N iterations; 0: only at the end (default: only at "
                   "the end; fine-tuning: 10 times over the run)")
    p.add_argument("--eval-max-samples", type=int, help="evaluate on the first N val samples only")
    p.add_argument("--log-interval", type=int, default=50)
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --output-dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels where torch has them (the log names the ops it has none for), cuDNN "
                   "autotuning off; slower on GPUs")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.no_progress = args.no_progress or not sys.stderr.isatty()  # bars on a terminal only, not in logs
    return args


def main(argv: list[str] | None = None, prog: str = "python -m training.train") -> int:
    """The command line (``fcn-zoo train``, or ``python -m training.train`` in a checkout)."""
    args = parse_args(argv, prog)
    args.prog = prog
    try:
        ctx = init_distributed(args.device)
    except FCNZooError as e:  # a device that is not here
        raise SystemExit(f"{prog}: {e}") from None
    try:
        train(args, ctx)
    except (DatasetLayoutError, FCNZooError) as e:  # one line naming the file or setting; nothing was trained
        raise SystemExit(f"{prog}: {e}") from None
    except SystemExit as e:  # the plan's own one-line refusals, said as this command
        if isinstance(e.code, str) and not e.code.startswith(f"{prog}:"):
            raise SystemExit(f"{prog}: {e.code}") from None
        raise
    finally:
        ctx.close()
    return 0


def train(args: argparse.Namespace, ctx: DistributedContext) -> dict:
    from tqdm.auto import tqdm

    out = Path(args.output_dir)
    torch.manual_seed(args.seed + ctx.rank)  # per process: each GPU draws its own dropout masks
    on_gpu = ctx.device.type == "cuda"
    configure_determinism(args.deterministic, ctx.device)
    # native bf16 only: torch.cuda.is_bf16_supported() counts emulation and says yes on a V100 or T4
    precision = training_precision(ctx.device.type, args.fp32, on_gpu and native_bf16(ctx.device))
    fast = precision.dtype is not None
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=precision.scaler)
    nondeterministic: list[str] = []
    if on_gpu and args.fp32:  # full fp32, as the reference trains
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if precision.note and ctx.is_main:
        print(precision.note, file=sys.stderr)

    # the data is checked here, before anything is written; an error in any process (a row, a download) stops
    # every process here, not in the first collective after it
    plan = shared_step(lambda: make_plan(args, ctx), ctx.world_size)
    workers = args.num_workers if args.num_workers is not None else default_workers(ctx)
    out.mkdir(parents=True, exist_ok=True)
    if ctx.is_main:  # what a run killed while writing a checkpoint, run.json or the log left (fcn_zoo._files.atomic_path)
        for partial in out.glob(".*.partial"):
            partial.unlink(missing_ok=True)
    model, train_set, val_set = plan.model, plan.train_set, plan.val_set
    per_device, accumulation, max_iters, iters_per_epoch = plan.per_device, plan.accumulation, plan.max_iters, plan.iters_per_epoch
    model.to(ctx.device)
    if plan.freeze_backbone:
        model.backbone.requires_grad_(False)
    if fast:
        model.to(memory_format=torch.channels_last)
    if ctx.distributed and on_gpu:  # SyncBatchNorm runs on GPUs only
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = DistributedDataParallel(model, device_ids=[ctx.device] if on_gpu else None) if ctx.distributed else model
    if args.compile:
        net = torch.compile(net)
    base_lr = plan.lr
    min_lr = min(MIN_LR, base_lr)  # an --lr below the floor stays constant: the decay never raises it
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=base_lr, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: ((base_lr - min_lr) * (1 - min(it, max_iters) / max_iters) ** POLY_POWER + min_lr) / base_lr
    )
    class_weights = torch.tensor(plan.class_weights, device=ctx.device) if plan.class_weights else None
    aux_loss_on = model.auxiliary_head is not None
    if not aux_loss_on and ctx.is_main:
        print(f"{plan.name}: the model has no auxiliary head; the loss is the main head's alone", file=sys.stderr)

    state = {"iteration": 0, "best_miou": -1.0, "history": {"loss": [], "miou": []}}
    if args.resume:
        resumed = resume(out, model, optimizer, scheduler, ctx, scaler)
        if resumed is None and ctx.is_main:  # a mistyped --output-dir, or a run killed before its first checkpoint
            print(f"--resume: no checkpoint in {out}; starting at iteration 0", file=sys.stderr)
        state = resumed or state
    # BatchNorm normalises over the images of one step on one device, or over all devices with SyncBatchNorm
    # (GPUs); the reference's is the whole total batch, synchronised
    batchnorm_batch = per_device * (ctx.world_size if ctx.distributed and on_gpu else 1)
    meta = {
        **plan.meta, "world_size": ctx.world_size, "total_batch": plan.total_batch, "per_device_batch": per_device,
        "accumulation": accumulation, "batchnorm_batch": batchnorm_batch, "crop_size": list(plan.crop), "scale": list(plan.scale),
        "iters_per_epoch": iters_per_epoch, "max_iters": max_iters, "lr": base_lr,
        "precision": precision.name, "grad_scaler": precision.scaler, "tf32": bool(on_gpu and torch.backends.cudnn.allow_tf32),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark), "deterministic": args.deterministic, "loader_workers": workers,
        "aux_loss_weight": AUX_WEIGHT if aux_loss_on else None,
        "eval_samples": sample_count(val_set, args.eval_max_samples),  # the val samples each evaluation scores
        "commit": _git_commit(),
    }
    if plan.row is not None and batchnorm_batch != plan.total_batch and ctx.is_main:
        meta["batchnorm_caveat"] = (
            f"BatchNorm statistics differ from the reference's: each BatchNorm sees {batchnorm_batch} image(s) per step, "
            f"the reference's {plan.total_batch} (synchronised over its GPUs)"
            + (f"; {accumulation} accumulated steps make up the batch of {plan.total_batch}" if accumulation > 1 else "")
        )
        print(meta["batchnorm_caveat"], file=sys.stderr)
    if ctx.is_main:
        write_json(out / "run.json", {**meta, "args": vars(args)})
    # a resumed run continues its log from its checkpoint (the records after it are logged again); a new run's
    # folder holds no earlier run (plan.check_output_dir)
    if ctx.is_main and state["iteration"]:
        trim_log(out / "log.jsonl", state["iteration"])
    log_file = open(out / "log.jsonl", "a" if state["iteration"] else "w") if ctx.is_main else None
    # as the reference's sampler: a permutation per epoch, padded by repeating its start, split over the processes
    sampler = DistributedSampler(train_set, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=args.seed, drop_last=False)
    it = state["iteration"]
    steps = RunSampler(sampler, it, max_iters, iters_per_epoch, per_device * accumulation)
    # one loader for the whole run: its processes start once and read ahead across epochs
    timed = TimedSamples(train_set, workers)
    loader = DataLoader(
        timed, batch_size=per_device, sampler=steps, drop_last=True, num_workers=workers, pin_memory=on_gpu,
        persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
        # its own generator: creating the loader must not draw from the global RNG (dropout's), or a
        # resumed run would diverge from an uninterrupted one
        generator=torch.Generator().manual_seed(args.seed * 100003 + it),
    )
    batches = iter(loader)
    bar = tqdm(total=max_iters, initial=it, desc=plan.name, disable=args.no_progress or not ctx.is_main)
    window_start, window_images, window_wait = time.perf_counter(), 0, 0.0
    _, data_clock = timed.rate()
    _train_mode(net, model, plan.freeze_backbone)
    while it < max_iters:
        epoch = it // iters_per_epoch
        optimizer.zero_grad(set_to_none=True)
        losses = torch.zeros(2, device=ctx.device)
        for micro in range(accumulation):
            waited = time.perf_counter()
            images, labels = next(batches)
            window_wait += time.perf_counter() - waited
            images = images.to(ctx.device, non_blocking=True)
            labels = labels.to(ctx.device, non_blocking=True)
            if fast:
                images = images.contiguous(memory_format=torch.channels_last)
            sync = micro == accumulation - 1 or not ctx.distributed
            with net.no_sync() if not sync and hasattr(net, "no_sync") else contextlib.nullcontext():
                with torch.autocast(ctx.device.type, dtype=precision.dtype or torch.float32, enabled=fast):
                    logits, aux = net(images)  # aux is None without an auxiliary head
                    main_loss = F.cross_entropy(logits.float(), labels, class_weights, ignore_index=IGNORE_INDEX)
                    aux_loss = (F.cross_entropy(aux.float(), labels, class_weights, ignore_index=IGNORE_INDEX)
                                if aux is not None else torch.zeros((), device=ctx.device))
                with nondeterministic_ops(args.deterministic and it == state["iteration"], nondeterministic):
                    scaler.scale((main_loss + AUX_WEIGHT * aux_loss) / accumulation).backward()
            losses += torch.stack([main_loss.detach(), aux_loss.detach()]) / accumulation
            window_images += images.shape[0] * ctx.world_size
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if nondeterministic and it == state["iteration"] and ctx.is_main:
            print(f"--deterministic: torch has no deterministic kernel for {', '.join(nondeterministic)} on "
                  f"{ctx.device.type}; those ops may differ from run to run", file=sys.stderr)
            write_json(out / "run.json", {**meta, "nondeterministic_ops": nondeterministic, "args": vars(args)})
        it += 1
        bar.update(1)
        if it % args.log_interval == 0 or it == max_iters:
            if ctx.distributed:
                dist.all_reduce(losses)
                losses /= ctx.world_size
            elapsed = time.perf_counter() - window_start
            data_rate, data_clock = timed.rate(data_clock)
            record = {
                "iter": it, "epoch": epoch, "loss": float(losses[0] + AUX_WEIGHT * losses[1]),
                "loss_main": float(losses[0]), "loss_aux": float(losses[1]),
                "lr": optimizer.param_groups[0]["lr"], "images_per_s": window_images / max(elapsed, 1e-9),
                # the share of the time the loop waited for the loader: near 0, the device bounds the run;
                # large, the data pipeline does (more --num-workers, or faster storage)
                "loader_wait_share": window_wait / max(elapsed, 1e-9),
                # what the data pipeline alone makes (its processes' samples over their busy time, all
                # processes): above images_per_s, the device bounds the run
                "data_images_per_s": data_rate * ctx.world_size,
                "memory_mb": _memory_mb(ctx.device),
            }
            state["history"]["loss"].append([it, record["loss"]])
            if log_file:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")
            window_start, window_images, window_wait = time.perf_counter(), 0, 0.0
        final = it == max_iters
        if final or (plan.eval_interval and it % plan.eval_interval == 0):
            if ctx.distributed:  # BatchNorm statistics are per process without SyncBatchNorm: use rank 0's
                for buffer in model.buffers():
                    dist.broadcast(buffer, 0)
            with without_autotuning():  # one autotuned crop size in training; many image sizes here
                results = evaluate(model, val_set, ctx=ctx, max_samples=args.eval_max_samples, progress=not args.no_progress,
                                   eval_size=plan.scale)
            _train_mode(net, model, plan.freeze_backbone)
            state["history"]["miou"].append([it, results["mIoU"]])
            if log_file:
                log_file.write(json.dumps({"iter": it, "mIoU": results["mIoU"], "aAcc": results["aAcc"]}) + "\n")
                log_file.flush()
            best = results["mIoU"] > state["best_miou"]
            if best:
                state["best_miou"] = results["mIoU"]

            def export() -> None:  # rank 0 writes; every process meets after it, so a failure stops them all
                for selected, wanted in (("best", best), ("last", final)):  # the reference reports its last evaluation
                    if wanted and ctx.is_main:
                        export_folder(model, plan, results, {**meta, "selected": selected, "iteration": it}, out / selected,
                                      repo_id=args.push_to_hub if selected == "best" else None)  # best/ alone is uploaded

            shared_step(export, ctx.world_size)
        state["iteration"] = it
        if it % args.checkpoint_interval == 0 or final:
            save_checkpoint(out, model, optimizer, scheduler, state, ctx, scaler=scaler)
    bar.close()
    if log_file:
        log_file.close()
    if ctx.is_main:
        plot_curves(state["history"], out / "curves.png")
        print(final_line(state, out))  # before the upload, which may fail: the run itself is complete
        if args.push_to_hub:
            push_best(out / "best", args.push_to_hub, getattr(args, "prog", "python -m training.train"))
    return state


def trim_log(path: Path, iteration: int) -> None:
    """``log.jsonl`` rewritten (atomically) with its records up to ``iteration`` only: those of the iterations
    after the checkpoint a run resumes from are logged again by the resumed run, once."""
    from fcn_zoo._files import atomic_path

    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by the kill
            continue
        if isinstance(record, dict) and isinstance(record.get("iter"), int) and record["iter"] <= iteration:
            kept.append(line + "\n")
    with atomic_path(path) as tmp:
        tmp.write_text("".join(kept), encoding="utf-8")


def default_workers(ctx: DistributedContext) -> int:
    """Loader processes per training process: on GPUs every core this process has but its own, at most 8;
    on the CPU none, since the network's threads use every core."""
    if ctx.device.type != "cuda":
        return 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)  # SLURM, cgroups
    return max(1, min(8, cores // local - 1))


def _train_mode(net, model: fcn_zoo.FCN, freeze_backbone: bool) -> None:
    net.train()
    if freeze_backbone:  # a frozen backbone keeps its BatchNorm statistics too
        model.backbone.eval()


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
