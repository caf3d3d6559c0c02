"""Checkpoints of the whole training state, written atomically, the newest K kept.

A checkpoint is a folder `step-XXXXXXXX/` holding
- generator/, discriminator/: each engine's DeepSpeed checkpoint (weights, optimiser state
  including every rank's ZeRO partition);
- rank-XXXXX.pt: that rank's RNG states and loss-scaler state;
- trainer.json: step, epoch, position in the epoch, world size and the resolved config.
It is assembled under a hidden `.tmp-step-XXXXXXXX/` name and renamed once every rank has
written its part, so a folder named step-* is always complete: a crash mid-save leaves only a
temp folder, which the next save removes, and which nothing loads. A save that fails (a full
disk) removes its temp folder and raises CheckpointWriteError on every rank.

A step-* folder without the `complete` mark is a copy cut short (Ray uploads file by file) and is
passed over. One with the mark that lacks a file, or holds one cut short, is damage, not an
unfinished save: loading it, `--resume auto` included, is refused with one line naming the file
and the checkpoint before it to continue from, never silently replaced by an older one.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint_io import CheckpointError, CheckpointWriteError, safe_load, save_file, write_text
from trainer.config import CHECKPOINTS, ConfigError
from trainer.distributed import DistContext, all_ranks_agree, barrier
from trainer.engines import GanEngines

PREFIX = "step-"
TMP_PREFIX = f".tmp-{PREFIX}"
META_NAME = "trainer.json"
# written last, once every part is in place: a folder without it is a copy that was cut short (Ray's
# upload to storage is file by file, not atomic), never a checkpoint to continue from
COMPLETE_NAME = "complete"
MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's file of a net's weights (and, without ZeRO, Adam's state)
NETS = ("generator", "discriminator")


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
    """Checkpoints under `folder` marked complete, oldest first (whether their files are intact is for
    loading to check: a marked checkpoint with a file missing is damage to report, not to pass over)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_dir() and p.name.startswith(PREFIX) and (p / COMPLETE_NAME).is_file())


def _needed_files(checkpoint: Path, world_size: int) -> list[Path]:
    """Every file loading reads, besides trainer.json (ZeRO's optimiser files are DeepSpeed's to name)."""
    return [*(_rank_file(checkpoint, r) for r in range(world_size)), *(checkpoint / tag / MODEL_STATES for tag in NETS)]


def _has_every_file(checkpoint: Path) -> bool:
    try:
        return all(path.is_file() for path in _needed_files(checkpoint, read_meta(checkpoint)["world_size"]))
    except CheckpointError:
        return False


def _earlier(checkpoint: Path) -> str:
    """"; to continue from the checkpoint before it: --resume PATH", when `checkpoint` cannot be loaded."""
    before = [p for p in list_checkpoints(checkpoint.parent) if p.name < checkpoint.name and _has_every_file(p)]
    return f"; to continue from the checkpoint before it: --resume {before[-1]}" if before else ""


def check_checkpoint(checkpoint: Path) -> dict[str, Any]:
    """trainer.json (validated) of a checkpoint folder that holds every file loading reads; else CheckpointError."""
    try:
        meta = read_meta(checkpoint)
        for path in _needed_files(checkpoint, meta["world_size"]):
            if not path.is_file():
                raise CheckpointError(f"checkpoint file not found: {path}")
    except CheckpointError as e:
        raise CheckpointError(f"{e}{_earlier(checkpoint)}") from None
    return meta


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the newest one in a run folder or a checkpoints/ folder; checked."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"resume path {path} does not exist")
    if path.name.startswith(TMP_PREFIX):
        newest = list_checkpoints(path.parent)
        raise CheckpointError(f"{path} is a checkpoint whose save never finished (the process stopped before it "
                              f"was renamed); use a {PREFIX}* folder{': ' + str(newest[-1]) if newest else ''}")
    if (path / META_NAME).is_file() or (path.name.startswith(PREFIX) and path.is_dir()):
        check_checkpoint(path)
        return path
    for folder in (path / CHECKPOINTS, path):
        found = list_checkpoints(folder)
        if found:
            check_checkpoint(found[-1])
            return found[-1]
    raise CheckpointError(f"no complete checkpoint (a {PREFIX}* folder marked {COMPLETE_NAME}) in {path}")


def earlier_run_error(run_dir: str, newest: str) -> ConfigError:
    """Training into a folder that holds another run's checkpoints would mix the two."""
    return ConfigError(f"{run_dir} already holds checkpoints of an earlier run (newest: {newest}); continue it "
                       f"with --resume {run_dir} (or --resume auto), or set logging.run_dir to a new folder")


def checkpoint_to_resume(resume: str | None, earlier: list[Path], run_dir: str) -> Path | None:
    """Where a run starts: `--resume PATH` (checked), `--resume auto` (the newest of the run folder's
    `earlier` checkpoints, if any), or nothing; without --resume, a run folder that holds `earlier`
    checkpoints is refused rather than mixed with a new run."""
    if resume == "auto":
        if not earlier:
            return None
        check_checkpoint(earlier[-1])  # now: a damaged one fails in a second, not after the engines are up
        return earlier[-1]
    if resume:
        return resolve_checkpoint(resume)
    if earlier:
        raise earlier_run_error(run_dir, earlier[-1].name)
    return None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _meta_problem(meta: Any) -> str | None:
    if not isinstance(meta, dict):
        return f"holds a JSON {type(meta).__name__}, not an object"
    if not _is_count(meta.get("world_size")) or meta["world_size"] < 1:
        return f"world_size must be a positive integer, not {str(meta.get('world_size'))[:40]!r}"
    if "step" not in meta:
        return "holds no step"
    for name in TrainState.__dataclass_fields__:
        if name in meta and not _is_count(meta[name]):
            return f"{name} must be a non-negative integer, not {str(meta[name])[:40]!r}"
    config = meta.get("config")
    if config is not None and not (isinstance(config, dict) and all(isinstance(v, dict) for v in config.values())):
        return "config must be an object of sections (model, optim, ...)"
    return None


def read_meta(checkpoint: str | Path) -> dict[str, Any]:
    """trainer.json, its fields checked: the loop and the config builder trust them."""
    path = Path(checkpoint) / META_NAME
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file not found: {path}") from None
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON, bad UTF-8, a 5,000-digit number
        raise CheckpointError(f"unreadable {path}: {e}") from None
    if problem := _meta_problem(meta):
        raise CheckpointError(f"{path}: {problem}")
    return meta


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
    save_file(rank_state, _rank_file(folder, ctx.rank))
    if ctx.is_main:
        meta = {**asdict(state), "world_size": ctx.world_size, "config": config}
        write_text(folder / META_NAME, json.dumps(meta, indent=1))


def tree_bytes(folder: Path) -> int:
    total = 0
    try:
        for path in folder.rglob("*"):
            total += path.stat().st_size if path.is_file() else 0
    except OSError:
        pass  # rank 0 may be removing it: the count is only for a message
    return total


def write_failure(e: OSError, name: str, tmp: Path, written: int, previous: Path | None) -> CheckpointWriteError:
    """One line on a failed save; `written`: bytes in `tmp` when it failed, `tmp` since removed."""
    where = e.filename or tmp
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return CheckpointWriteError(f"cannot write checkpoint {name}: {where}: {e.strerror or e}")
    try:
        free = f"{shutil.disk_usage(tmp.parent).free:,} bytes free there"
    except OSError:
        free = "free space unknown"
    if previous is not None:
        need = f"about {tree_bytes(previous):,} bytes (the size of {previous.name}, which is untouched)"
    else:
        need = f"more than the {written:,} bytes written before the disk filled"
    return CheckpointWriteError(f"no space left on device for checkpoint {name}: writing {where} failed; it needs "
                                f"{need}, {free}")


def _rank_state_problem(state: Any) -> str | None:
    if not isinstance(state, dict):
        return f"holds a {type(state).__name__}, not a rank's state"
    for key in ("noise_rng", "torch_rng"):
        if not (isinstance(state.get(key), torch.Tensor) and state[key].dtype == torch.uint8):
            return f"holds no {key} (a byte tensor)"
    if not isinstance(state.get("grad_scalers"), dict):
        return "holds no grad_scalers"
    return None


class CheckpointStore:
    """Where a run's checkpoints go. Subclasses decide how `save` writes; loading is shared."""

    def __init__(self, ctx: DistContext, config: dict[str, Any]):
        self.ctx, self.config = ctx, config
        self.last_saved_step: int | None = None

    def due(self, step: int) -> bool:
        """Whether the loop saves after `step`: every checkpoint.every_steps steps."""
        return step % self.config["checkpoint"]["every_steps"] == 0

    def save(self, state: TrainState, engines: GanEngines, rank_state: dict[str, Any]) -> Path | None:
        raise NotImplementedError

    def load(self, path: str | Path, engines: GanEngines) -> tuple[TrainState, dict[str, Any]]:
        checkpoint = resolve_checkpoint(path)
        try:
            return self._load(checkpoint, engines)
        except CheckpointError as e:
            raise CheckpointError(f"{e}{_earlier(checkpoint)}") from None

    def _load(self, checkpoint: Path, engines: GanEngines) -> tuple[TrainState, dict[str, Any]]:
        meta = read_meta(checkpoint)
        if meta["world_size"] != self.ctx.world_size:
            raise CheckpointError(f"{checkpoint} was written by {meta['world_size']} rank(s); "
                                  f"resume it with the same number, not {self.ctx.world_size}")
        for tag, engine in engines.items():
            try:
                loaded, _ = engine.load_checkpoint(str(checkpoint), tag=tag, load_module_strict=True)
            except CheckpointError:
                raise
            except Exception as e:  # DeepSpeed asserts on what it cannot use: a net of another shape, a lost partition
                detail = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())[:300]
                raise CheckpointError(f"{checkpoint / tag}: DeepSpeed cannot load it ({type(e).__name__}"
                                      f"{': ' + detail if detail else ''})") from None
            if loaded is None:
                raise CheckpointError(f"{checkpoint}/{tag}: DeepSpeed found no checkpoint to load")
        path = _rank_file(checkpoint, self.ctx.rank)
        rank_state = safe_load(path)
        if problem := _rank_state_problem(rank_state):
            raise CheckpointError(f"{path}: {problem}")
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
        failed: OSError | None = None
        if self.ctx.is_main:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                for stale in self.folder.glob(".tmp-*"):
                    shutil.rmtree(stale, ignore_errors=True)
                tmp.mkdir()
            except OSError as e:
                failed = e
        self._all_written(failed, name, tmp)
        try:
            write_checkpoint_parts(tmp, state, engines, rank_state, self.ctx, self.config)
        except OSError as e:
            failed = e
        self._all_written(failed, name, tmp)
        if self.ctx.is_main:
            (tmp / COMPLETE_NAME).touch()  # the rename below is what publishes it; the marker keeps one rule
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.folder)
            for old in list_checkpoints(self.folder)[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        self.last_saved_step = state.step
        return final

    def _all_written(self, failed: OSError | None, name: str, tmp: Path) -> None:
        """Collective, in place of a barrier: when any rank failed to write, every rank raises, and no temp
        folder is left (a full disk stays full with one)."""
        if all_ranks_agree(failed is None, self.ctx.device):
            return
        written = tree_bytes(tmp)
        if self.ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if failed is None:
            raise CheckpointWriteError(f"another rank could not write its part of checkpoint {name} (its error says "
                                       "why); the earlier checkpoints are untouched")
        previous = list_checkpoints(self.folder)
        raise write_failure(failed, name, tmp, written, previous[-1] if previous else None) from None


def load_module_weights(checkpoint: str | Path, tag: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(the run's config, the state_dict of net `tag`: "generator" or "discriminator") from a
    checkpoint folder, or a run folder's newest, without DeepSpeed or a process group."""
    checkpoint = resolve_checkpoint(checkpoint)
    meta = read_meta(checkpoint)
    if "config" not in meta:
        raise CheckpointError(f"{checkpoint / META_NAME} holds no config")
    path = checkpoint / tag / MODEL_STATES
    try:
        state = safe_load(path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}{_earlier(checkpoint)}") from None
    weights = state.get("module") if isinstance(state, dict) else None
    if not (isinstance(weights, dict) and all(isinstance(v, torch.Tensor) for v in weights.values())):
        raise CheckpointError(f"{path} holds no module weights{_earlier(checkpoint)}")
    return meta["config"], weights
