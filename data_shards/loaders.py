"""The one place that picks a loader and says what a batch is; the trainer does not care which.

A loader's batches are (images, labels): images uint8 N x H x W x C on the training device,
labels int64 on the CPU. Bytes cross every boundary (worker -> process, host -> device): a
64x64 RGB image is 12 KiB as uint8 and 48 KiB as float32. Where a loader makes its batches on
the host for a CUDA device they are in pinned memory and copied with non_blocking, so the copy
overlaps the step before. `to_model_input` turns a batch into what the networks read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from data_shards.loader import ShardLoader

LOADERS = ("webdataset", "dali", "device")


class Loader(Protocol):
    skipped: int

    def steps_per_epoch(self, epoch: int) -> int: ...

    def batches(self, epoch: int, start_step: int = 0): ...


def to_model_input(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 N x H x W x C [0, 255] -> `dtype` N x C x H x W in [-1, 1] (the paper's scaling, no
    augmentation), channels_last: NHWC bytes seen as NCHW already are channels_last, so no copy
    reorders them. Eager, that is a cast and two in-place passes (a 128 x 64 x 64 x 3 batch is
    1.5 MB: microseconds); under model.compile the trainer compiles this into one kernel."""
    x = images.permute(0, 3, 1, 2).to(dtype)  # preserve_format keeps the NHWC strides
    return x.div_(127.5).sub_(1.0)


def open_loader(kind: str, folder: str | Path, *, rank: int, world_size: int, batch_size: int, seed: int,
                channels: int, resolution: int, num_workers: int, shuffle_buffer: int,
                device: torch.device | str, device_memory_gib: float = 0.0) -> Loader:
    common = dict(rank=rank, world_size=world_size, batch_size=batch_size, seed=seed, channels=channels,
                  resolution=resolution, num_workers=num_workers, shuffle_buffer=shuffle_buffer, device=device)
    if kind == "webdataset":
        return ShardLoader(folder, **common)
    if kind == "dali":
        from data_shards.dali_loader import DaliLoader

        return DaliLoader(folder, **common)
    if kind == "device":
        from data_shards.device_loader import DeviceLoader

        return DeviceLoader(folder, **common, memory_gib=device_memory_gib)
    raise ValueError(f"unknown loader {kind!r}; loaders: {', '.join(LOADERS)}")
