"""Checkpoints of a training run: model, optimizer, scheduler, gradient scaler, iteration and every process's
RNG state, written atomically; resuming from the newest one that reads, each process taking back its own
RNG state so that a resumed run ends with the weights of an uninterrupted one."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from fcn_zoo._files import atomic_path

from .distributed import DistributedContext, shared_step

__all__ = ["save_checkpoint", "resume", "rng_state", "set_rng_state"]


def rng_state(ctx: DistributedContext) -> dict:
    """This process's global RNG state: the CPU's and its own GPU's (the transforms and the DataLoader have
    generators of their own)."""
    rng = {"torch": torch.get_rng_state()}
    if ctx.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(ctx.device)
    return rng


def set_rng_state(rng: dict, ctx: DistributedContext) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and ctx.device.type == "cuda":
        if isinstance(rng["cuda"], (list, tuple)):  # checkpoints of earlier versions kept every GPU's state
            torch.cuda.set_rng_state_all(rng["cuda"])
        else:
            torch.cuda.set_rng_state(rng["cuda"], ctx.device)


def _gather_rng(rng: dict, ctx: DistributedContext) -> list[dict]:
    """Every process's ``rng_state``, in rank order (tensors through a collective, no pickling)."""
    if not ctx.distributed:
        return [rng]
    keys = sorted(rng)
    sizes = [rng[k].numel() for k in keys]
    packed = torch.cat([rng[k] for k in keys]).to(ctx.device)  # NCCL gathers GPU tensors only
    gathered = [torch.empty_like(packed) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, packed)
    return [dict(zip(keys, (t.clone() for t in g.cpu().split(sizes)))) for g in gathered]


def save_checkpoint(out: Path, model, optimizer, scheduler, state: dict, ctx: DistributedContext, keep: int = 2,
                    scaler=None) -> None:
    """``ckpt-<iteration>.pt`` written to a temporary file and renamed; the ``keep`` newest are kept. Every
    process's RNG state is gathered into it (``rng``: one entry per rank)."""
    rngs = _gather_rng(rng_state(ctx), ctx)
    # written by rank 0; every process meets after it, so that a failure there stops every process
    shared_step(lambda: _write_checkpoint(out, model, optimizer, scheduler, state, rngs, keep, scaler) if ctx.is_main else None,
                ctx.world_size)


def _write_checkpoint(out: Path, model, optimizer, scheduler, state: dict, rngs: list, keep: int, scaler) -> None:
    payload = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "state": state, "rng": rngs, **({"scaler": scaler.state_dict()} if scaler is not None and scaler.is_enabled() else {}),
    }
    path = out / f"ckpt-{state['iteration']:08d}.pt"
    try:
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
    except (OSError, RuntimeError) as e:  # a full disk surfaces as either
        kept = sorted(p.name for p in out.glob("ckpt-*.pt"))
        raise SystemExit(
            f"{path}: could not be written ({e}); nothing partial was left and the earlier checkpoints "
            f"({', '.join(kept) or 'none'}) are intact: free space and rerun with --resume"
        ) from e
    for old in sorted(out.glob("ckpt-*.pt"))[:-keep]:
        old.unlink(missing_ok=True)


def resume(out: Path, model, optimizer, scheduler, ctx: DistributedContext, scaler=None) -> dict | None:
    """Load the newest checkpoint that reads; a damaged one is skipped (it can only be a copy made by hand)."""
    for path in sorted(out.glob("ckpt-*.pt"), reverse=True):
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file
            print(f"skipping {path}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})", file=sys.stderr)
            continue
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        if scaler is not None and "scaler" in payload:
            scaler.load_state_dict(payload["scaler"])
        rngs = payload["rng"] if isinstance(payload["rng"], list) else [payload["rng"]]
        if len(rngs) == ctx.world_size:
            set_rng_state(rngs[ctx.rank], ctx)
        elif ctx.is_main:  # another number of processes: each keeps its fresh per-rank seed
            print(f"{path}: saved by {len(rngs)} process(es), resumed by {ctx.world_size}: dropout draws differ from "
                  "an uninterrupted run", file=sys.stderr)
        if ctx.is_main:
            print(f"resumed from {path} at iteration {payload['state']['iteration']}", file=sys.stderr)
        return payload["state"]
    return None
