"""The one place that picks a loader: the trainer asks for batches and does not care which."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from data_shards.loader import ShardLoader

LOADERS = ("webdataset", "dali")


class Loader(Protocol):
    skipped: int

    def steps_per_epoch(self, epoch: int) -> int: ...

    def batches(self, epoch: int, start_step: int = 0): ...


def open_loader(kind: str, folder: str | Path, *, rank: int, world_size: int, batch_size: int, seed: int,
                channels: int, resolution: int, num_workers: int, shuffle_buffer: int,
                device: torch.device | str) -> Loader:
    """Batches of float N x C x H x W images in [-1, 1] on `device`, and int64 labels."""
    common = dict(rank=rank, world_size=world_size, batch_size=batch_size, seed=seed, channels=channels,
                  resolution=resolution, num_workers=num_workers, shuffle_buffer=shuffle_buffer, device=device)
    if kind == "webdataset":
        return ShardLoader(folder, **common)
    if kind == "dali":
        from data_shards.dali_loader import DaliLoader

        return DaliLoader(folder, **common)
    raise ValueError(f"unknown loader {kind!r}; loaders: {', '.join(LOADERS)}")
