"""Process-group set-up for one process or many, and the few collectives the trainer needs."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from common.ports import free_port


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


STALE_BUILD_LOCK_S = 600.0  # DeepSpeed's JIT op builds here take ~35 s


def clear_stale_build_locks(max_age_s: float = STALE_BUILD_LOCK_S) -> list[Path]:
    """Remove DeepSpeed JIT-build locks that a killed build left behind.

    torch's extension builder holds a `lock` file while it builds or checks an op; a process
    killed in that window (Ctrl-C on a first run) leaves it, and every later start then waits
    on it forever. A lock far older than any build is such a leftover.
    """
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    removed = []
    for lock in [*root.glob("deepspeed_*/lock"), *root.glob("*/deepspeed_*/lock")]:
        try:
            if time.time() - lock.stat().st_mtime > max_age_s:
                lock.unlink()
                removed.append(lock)
        except FileNotFoundError:
            continue  # its build just finished
    for lock in removed:
        print(f"removed a stale DeepSpeed build lock left by a killed process: {lock}", file=sys.stderr)
    return removed


def init_distributed() -> DistContext:
    """Join the process group set up by torchrun / the deepspeed launcher, or make a group of one.

    Without launcher variables DeepSpeed would look for MPI, so a single process gets a
    loopback group of its own.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # skips DeepSpeed's accelerator probe and its warning
    # DeepSpeed's JIT ops built per environment: in torch's one default folder for all of them, two
    # environments (two checkouts, two venvs) would rebuild the op for each other at every start (~35 s)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    import logging

    import deepspeed  # deferred: importing DeepSpeed takes seconds

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    clear_stale_build_locks()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   verbose=False)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def average_batchnorm_stats(module: torch.nn.Module) -> None:
    """Average BatchNorm running statistics over ranks.

    Each rank normalises with its own batch statistics during training, so running means and
    variances drift apart (DeepSpeed does not broadcast buffers, and SyncBatchNorm has no CPU
    path). Averaging, rather than taking rank 0's, makes the saved statistics estimate the
    whole global batch. Training itself is unaffected: train-mode BN never reads them.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            for buf in (m.running_mean, m.running_var):
                dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                buf.div_(world)


def all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """True only if `flag` is true on every rank (so all ranks take the same branch)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())
