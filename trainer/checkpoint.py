"""Checkpoints of the whole training state, written atomically, the newest K kept.

A checkpoint is a folder `step-XXXXXXXX/` holding
- generator/, discriminator/: each engine's DeepSpeed checkpoint (weights, optimiser state
  including every rank's ZeRO partition);
- rank-XXXXX.pt: that rank's RNG states and loss-scaler state;
- trainer.json: step, epoch, position in the epoch, world size and the resolved config.
It is assembled under a hidden `.tmp-step-XXXXXXXX/` name and renamed once every rank has
written its part, so a folder named step-* is always complete: a crash mid-save leaves only a
temp folder, which the next save removes.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint_io import CheckpointError, safe_load
from trainer.config import ConfigError
from trainer.distributed import DistContext, barrier
from trainer.engines import GanEngines

PREFIX = "step-"
META_NAME = "trainer.json"


@dataclass
class TrainState:
    step: int = 0  # optimiser steps completed (G and D each stepped once per step)
    epoch: int = 0
    step_in_epoch: int = 0  # batches of `epoch` already consumed
    skipped_steps: int = 0  # steps dropped for a non-finite loss (checkpoint.on_nonfinite = "skip")
    restarts: int = 0  # times the run was resumed from a checkpoint


def _rank_file(folder: Path, rank: int) -> Path:
    return folder / f"rank-{rank:05d}.pt"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints under `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and _is_complete(p))


def _is_complete(checkpoint: Path) -> bool:
    """trainer.json and every rank's file are there (a copy to storage may have been cut short)."""
    try:
        world_size = int(json.loads((checkpoint / META_NAME).read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all(_rank_file(checkpoint, r).is_file() for r in range(world_size))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the newest one in a run folder or a checkpoints/ folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"resume path {path} does not exist")
    if (path / META_NAME).is_file():
        return path
    for folder in (path / "checkpoints", path):
        found = list_checkpoints(folder)
        if found:
            return found[-1]
    raise CheckpointError(f"no complete checkpoint (a {PREFIX}* folder with {META_NAME} and every rank's file) "
                          f"in {path}")


def earlier_run_error(run_dir: str, newest: str) -> ConfigError:
    """Training into a folder that holds another run's checkpoints would mix the two."""
    return ConfigError(f"{run_dir} already holds checkpoints of an earlier run (newest: {newest}); continue it "
                       f"with --resume {run_dir} (or --resume auto), or set logging.run_dir to a new folder")


def read_meta(checkpoint: str | Path) -> dict[str, Any]:
    path = Path(checkpoint) / META_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"unreadable {path}: {e}") from None


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def write_checkpoint_parts(folder: Path, state: TrainState, engines: GanEngines, rank_state: dict[str, Any],
                           ctx: DistContext, config: dict[str, Any]) -> None:
    """This rank's share of a checkpoint: its engine parts and rank file; rank 0 adds trainer.json.

    Collective: every rank calls it, each with a folder it can write (shared or its own).
    """
    folder.mkdir(parents=True, exist_ok=True)
    for tag, engine in engines.items():
        engine.save_checkpoint(str(folder), tag=tag, save_latest=False)
    torch.save(rank_state, _rank_file(folder, ctx.rank))
    if ctx.is_main:
        meta = {**asdict(state), "world_size": ctx.world_size, "config": config}
        (folder / META_NAME).write_text(json.dumps(meta, indent=1))


class CheckpointStore:
    """Where a run's checkpoints go. Subclasses decide how `save` writes; loading is shared."""

    def __init__(self, ctx: DistContext, config: dict[str, Any]):
        self.ctx, self.config = ctx, config
        self.last_saved_step: int | None = None

    def save(self, state: TrainState, engines: GanEngines, rank_state: dict[str, Any]) -> Path | None:
        raise NotImplementedError

    def load(self, path: str | Path, engines: GanEngines) -> tuple[TrainState, dict[str, Any]]:
        checkpoint = resolve_checkpoint(path)
        meta = read_meta(checkpoint)
        if meta.get("world_size") != self.ctx.world_size:
            raise CheckpointError(f"{checkpoint} was written by {meta.get('world_size')} rank(s); "
                                  f"resume it with the same number, not {self.ctx.world_size}")
        for tag, engine in engines.items():
            loaded, _ = engine.load_checkpoint(str(checkpoint), tag=tag, load_module_strict=True)
            if loaded is None:
                raise CheckpointError(f"{checkpoint}/{tag}: DeepSpeed found no checkpoint to load")
        rank_state = safe_load(_rank_file(checkpoint, self.ctx.rank))
        state = TrainState(**{k: meta[k] for k in TrainState.__dataclass_fields__ if k in meta})
        self.last_saved_step = state.step
        return state, rank_state


class Checkpointer(CheckpointStore):
    """Checkpoints in one folder that every rank can write (one machine, or shared storage)."""

    def __init__(self, folder: str | Path, ctx: DistContext, keep_last: int, config: dict[str, Any]):
        super().__init__(ctx, config)
        self.folder, self.keep_last = Path(folder), keep_last

    def save(self, state: TrainState, engines: GanEngines, rank_state: dict[str, Any]) -> Path | None:
        name = checkpoint_name(state.step)
        final, tmp = self.folder / name, self.folder / f".tmp-{name}"
        if self.ctx.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            for stale in self.folder.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        barrier()
        write_checkpoint_parts(tmp, state, engines, rank_state, self.ctx, self.config)
        barrier()
        if self.ctx.is_main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.folder)
            for old in list_checkpoints(self.folder)[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        self.last_saved_step = state.step
        return final


def load_module_weights(checkpoint: str | Path, tag: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(the run's config, the state_dict of net `tag`: "generator" or "discriminator") from a
    checkpoint folder, or a run folder's newest, without DeepSpeed or a process group."""
    checkpoint = resolve_checkpoint(checkpoint)
    meta = read_meta(checkpoint)
    if "config" not in meta:
        raise CheckpointError(f"{checkpoint}: {META_NAME} holds no config")
    files = sorted((checkpoint / tag).glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{checkpoint}/{tag} holds no model states")
    return meta["config"], safe_load(files[0])["module"]
