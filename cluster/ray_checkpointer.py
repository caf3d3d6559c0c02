"""Checkpoints through Ray Train: every rank stages its part locally, Ray merges them in storage.

Ray copies each rank's staged folder into `storage_path/checkpoints/step-XXXXXXXX/` (a shared
file system or an object store), registers the checkpoint only once every rank's copy has
finished, keeps the newest `checkpoint.keep_last`, and hands the newest to restarted workers
through `ray.train.get_checkpoint()`. Nodes therefore need no shared disk for checkpoints.
Loading is the shared `CheckpointStore.load`: the same checks and the same safe unpickling.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

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
from trainer.distributed import all_ranks_agree
from trainer.engines import GanEngines


class RayCheckpointer(CheckpointStore):
    def save(self, state: TrainState, engines: GanEngines, rank_state: dict[str, Any]) -> None:
        name = checkpoint_name(state.step)
        staging = Path(tempfile.mkdtemp(prefix="dcgan-checkpoint-"))
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

        root = self.config["cluster"]["storage_path"] or self.config["logging"]["run_dir"]
        uri = root if "://" in root else Path(root).resolve().as_uri()
        fs, base = pyarrow.fs.FileSystem.from_uri(uri)
        with fs.open_output_stream(f"{base.rstrip('/')}/{CHECKPOINTS}/{name}/{COMPLETE_NAME}"):
            pass
