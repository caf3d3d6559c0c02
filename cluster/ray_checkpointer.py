"""Checkpoints through Ray Train: every rank stages its part locally, Ray merges them in storage.

Ray copies each rank's staged folder into `storage_path/checkpoints/step-XXXXXXXX/` (a shared
file system or an object store), registers the checkpoint only once every rank's copy has
finished, keeps the newest `checkpoint.keep_last`, and hands the newest to restarted workers
through `ray.train.get_checkpoint()`. Nodes therefore need no shared disk for checkpoints.
Loading is the shared `CheckpointStore.load`: the same checks and the same safe unpickling.

Each rank stages in the temp directory, in a folder named for the run (a hash of its storage
root), the rank and the worker's PID. A worker killed mid-save cannot remove its folder; the
next worker of the run on that node (a restarted group, a rerun) and the driver once the run
ends remove those of the run whose owner is dead, and never another run's.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import psutil
import ray.train

from cluster.ray_launch import CHECKPOINTS
from trainer.checkpoint import (
    COMPLETE_NAME,
    CheckpointStore,
    CheckpointWriteError,
    TrainState,
    checkpoint_name,
    tree_bytes,
    write_checkpoint_parts,
    write_failure,
)
from trainer.distributed import DistContext, all_ranks_agree
from trainer.engines import GanEngines

_STAGING = "dcgan-checkpoint-"
_OWNER = re.compile(r"-rank(\d+)-pid(\d+)-")


def storage_root_of(config: dict[str, Any]) -> str:
    return config["cluster"]["storage_path"] or config["logging"]["run_dir"]


def staging_prefix(root: str) -> str:
    """The name every staged folder of the run stored under `root` starts with."""
    return f"{_STAGING}{hashlib.sha256(root.encode()).hexdigest()[:12]}-"


def staged_folders(root: str) -> list[Path]:
    """This run's staged checkpoint folders in this machine's temp directory."""
    return sorted(Path(tempfile.gettempdir()).glob(f"{staging_prefix(root)}rank*-pid*-*"))


def _owner_alive(folder: Path) -> bool:
    match = _OWNER.search(folder.name)
    if not match or int(match[2]) == os.getpid():  # a dead worker's PID, now ours: we stage nothing yet
        return False
    try:
        return psutil.Process(int(match[2])).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True  # another user's process: not ours to judge


def remove_stale_staging(root: str) -> None:
    """Remove what workers of this run that died mid-save left; a PID since reused keeps its folder."""
    for folder in staged_folders(root):
        if not _owner_alive(folder):
            shutil.rmtree(folder, ignore_errors=True)


class RayCheckpointer(CheckpointStore):
    def __init__(self, ctx: DistContext, config: dict[str, Any]):
        super().__init__(ctx, config)
        self.staging_prefix = f"{staging_prefix(storage_root_of(config))}rank{ctx.rank}-pid{os.getpid()}-"
        remove_stale_staging(storage_root_of(config))

    def save(self, state: TrainState, engines: GanEngines, rank_state: dict[str, Any]) -> None:
        name = checkpoint_name(state.step)
        staging = Path(tempfile.mkdtemp(prefix=self.staging_prefix))
        try:
            failed: OSError | None = None
            try:
                write_checkpoint_parts(staging / name, state, engines, rank_state, self.ctx, self.config)
            except OSError as e:
                failed = e
            # every rank raises when any failed, instead of the others waiting in report() for a part that never comes
            if not all_ranks_agree(failed is None, self.ctx.device):
                if failed is None:
                    raise CheckpointWriteError(f"another rank could not stage its part of checkpoint {name} (its "
                                               "error says why); the earlier checkpoints are untouched")
                raise write_failure(failed, name, staging / name, tree_bytes(staging), None) from None
            # a barrier across the workers: it returns once every rank's part is in storage
            ray.train.report({"step": state.step, "epoch": state.epoch},
                             checkpoint=ray.train.Checkpoint.from_directory(str(staging / name)),
                             checkpoint_dir_name=name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if self.ctx.is_main:
            self._mark_complete(name)
        self.last_saved_step = state.step

    def _mark_complete(self, name: str) -> None:
        """Ray copies the parts file by file: only now is the folder in storage a whole checkpoint."""
        import pyarrow.fs

        root = storage_root_of(self.config)
        uri = root if "://" in root else Path(root).resolve().as_uri()
        fs, base = pyarrow.fs.FileSystem.from_uri(uri)
        with fs.open_output_stream(f"{base.rstrip('/')}/{CHECKPOINTS}/{name}/{COMPLETE_NAME}"):
            pass
