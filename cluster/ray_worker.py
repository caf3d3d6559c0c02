"""What each Ray Train worker runs: the same Trainer as every other launcher, checkpointing
through Ray and resuming from the checkpoint Ray hands a restarted worker group."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import ray.train
import torch

from cluster.ray_checkpointer import RayCheckpointer
from trainer.checkpoint import read_meta
from trainer.config import config_from_dict
from trainer.distributed import init_distributed
from trainer.loop import Trainer


def train_worker(job: dict[str, Any]) -> None:
    """`job`: the resolved config, the worker's thread count and an optional first checkpoint."""
    torch.set_num_threads(job["threads"])
    cfg = config_from_dict(job["config"])
    # TorchTrainer has already formed the process group (ranks = Ray world ranks); DeepSpeed joins it
    ctx = init_distributed()
    trainer = Trainer(cfg, ctx, checkpointer=RayCheckpointer(ctx, cfg.to_dict()))
    # Ray hands a restarted worker group, or a run continued under the same storage path, the newest
    # checkpoint it registered; the driver's may be newer (one written just before the head died)
    restored = ray.train.get_checkpoint()
    with restored.as_directory() if restored is not None else nullcontext(None) as folder:
        start = newest_of(folder, job.get("resume"))
        if start is not None:
            trainer.resume(start)
            if ctx.is_main:
                where = restored.path if start == folder else start
                print(f"resumed from step {trainer.state.step} ({where})", flush=True)
    state = trainer.fit()
    ray.train.report({"step": state.step, "epoch": state.epoch, "finished": True})


def newest_of(*checkpoints: str | None) -> str | None:
    """The checkpoint of the highest step among those given (None: not given)."""
    given = [c for c in checkpoints if c is not None]
    return max(given, key=lambda c: read_meta(c)["step"], default=None)
