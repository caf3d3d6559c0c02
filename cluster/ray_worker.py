"""What each Ray Train worker runs: the same Trainer as every other launcher, checkpointing
through Ray and resuming from the checkpoint Ray hands a restarted worker group."""

from __future__ import annotations

from typing import Any

import ray.train
import torch

from cluster.faults import InjectedFault
from cluster.ray_checkpointer import RayCheckpointer
from trainer.config import config_from_dict
from trainer.distributed import init_distributed
from trainer.loop import Trainer


def train_worker(job: dict[str, Any]) -> None:
    """`job`: the resolved config, the worker's thread count, an optional first checkpoint and fault."""
    torch.set_num_threads(job["threads"])
    cfg = config_from_dict(job["config"])
    # TorchTrainer has already formed the process group (ranks = Ray world ranks); DeepSpeed joins it
    ctx = init_distributed()
    trainer = Trainer(cfg, ctx, checkpointer=RayCheckpointer(ctx, cfg.to_dict()))
    restored = ray.train.get_checkpoint()
    if restored is not None:
        # a restarted worker group, or a run continued under the same storage path
        with restored.as_directory() as folder:
            trainer.resume(folder)
        if ctx.is_main:
            print(f"resumed from step {trainer.state.step} ({restored.path})", flush=True)
    elif job.get("resume"):
        trainer.resume(job["resume"])
    if job.get("fault"):
        trainer.step_hooks.append(InjectedFault(**job["fault"]).hook(cfg.logging.run_dir))
    state = trainer.fit()
    ray.train.report({"step": state.step, "epoch": state.epoch, "finished": True})
