"""Streams a shard set to one rank with WebDataset: shuffled, split by rank and by worker, resumable.

Each epoch the shard list is permuted by (seed, epoch); rank r takes every world_size-th shard
and its DataLoader worker w every num_workers-th of those, so ranks and workers read disjoint
shards and together cover the set once. Within a worker a shuffle buffer seeded by
(seed, epoch, rank, worker) mixes samples across its shards. The sample order is therefore a
pure function of (seed, epoch): resuming at step k of an epoch rebuilds the same streams and
drops the first samples of each worker before decoding them, which costs a tar read, not a
decode.

Every rank runs the same number of steps per epoch (the smallest rank's count of full batches),
so no rank waits in a collective for another; samples past that, and each worker's last partial
batch, are left for the next epoch's permutation (at most world_size * num_workers * batch per
epoch).
"""

from __future__ import annotations

import io
import itertools
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from data_shards.manifest import Manifest, ShardSetError, read_manifest


def _stream_seed(*parts: int) -> int:
    # A stable mix of small ints: Python's hash() of a tuple is stable for ints, but spell it out.
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + p) % (2**63)
    return seed


def round_robin_resume(k: int, batches_per_worker: list[int]) -> tuple[list[int], list[int]]:
    """Where DataLoader's in-order round robin (a worker that runs out drops out of the cycle)
    stands after k batches: how many each worker produced, and the order in which the workers
    take their next turns, exhausted ones last. Resuming gives DataLoader worker slot j the
    stream of worker order[j], so the cycle continues where it stopped."""
    workers = len(batches_per_worker)
    taken, turn, produced = [0] * workers, 0, 0
    while produced < k and any(t < n for t, n in zip(taken, batches_per_worker, strict=True)):
        if taken[turn] < batches_per_worker[turn]:
            taken[turn] += 1
            produced += 1
        turn = (turn + 1) % workers
    cycle = [(turn + i) % workers for i in range(workers)]
    order = ([w for w in cycle if taken[w] < batches_per_worker[w]]
             + [w for w in cycle if taken[w] >= batches_per_worker[w]])
    return taken, order


class _SkipCounter:
    """WebDataset error handler that counts unreadable samples or shards and keeps going."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        return True


class _WorkerStreams(torch.utils.data.IterableDataset):
    """One epoch of one rank; each DataLoader worker reads its own slice of the rank's shards."""

    def __init__(self, loader: ShardLoader, epoch: int, skip_batches: list[int], order: list[int]):
        super().__init__()
        self.loader, self.epoch, self.skip_batches, self.order = loader, epoch, skip_batches, order

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker = self.order[0 if info is None else info.id]
        yield from self.loader.worker_batches(self.epoch, worker, self.skip_batches[worker])


class ShardLoader:
    """The loader interface the trainer uses: `steps_per_epoch(epoch)` and `batches(epoch, start)`.

    Batches are (uint8 images N x C x H x W, int64 labels); `to_model_range` maps images to
    [-1, 1] on the training device, so only bytes cross the worker boundary.
    """

    def __init__(self, folder: str | Path, *, rank: int, world_size: int, batch_size: int, seed: int,
                 channels: int, resolution: int, num_workers: int = 1, shuffle_buffer: int = 5000):
        self.folder = Path(folder)
        self.manifest: Manifest = read_manifest(self.folder)
        stored = self.manifest.transform.get("resolution")
        if stored != resolution:
            raise ShardSetError(f"shards in {self.folder} are {stored}x{stored}, the model wants "
                                f"{resolution}x{resolution}; convert again with --resolution {resolution}")
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.seed, self.channels = seed, channels
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        streams = world_size * max(num_workers, 1)
        if len(self.manifest.shards) < streams:
            raise ShardSetError(
                f"{self.folder} has {len(self.manifest.shards)} shards but {world_size} rank(s) x "
                f"{max(num_workers, 1)} worker(s) need at least {streams}; convert with a smaller --shard-size")
        self.skip_counter = _SkipCounter()

    # --- the deterministic split ---------------------------------------------------------------
    def _shard_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.manifest.shards)))
        random.Random(_stream_seed(self.seed, epoch)).shuffle(order)
        return order

    def _worker_shards(self, epoch: int, rank: int, worker: int) -> list[int]:
        rank_shards = self._shard_order(epoch)[rank::self.world_size]
        return rank_shards[worker::max(self.num_workers, 1)]

    def _worker_batch_counts(self, epoch: int, rank: int) -> list[int]:
        return [sum(self.manifest.shards[i].count for i in self._worker_shards(epoch, rank, w)) // self.batch_size
                for w in range(max(self.num_workers, 1))]

    def steps_per_epoch(self, epoch: int) -> int:
        return min(sum(self._worker_batch_counts(epoch, r)) for r in range(self.world_size))

    # --- streaming ---------------------------------------------------------------------------
    def _decode(self, sample: dict) -> tuple[np.ndarray, int]:
        image = Image.open(io.BytesIO(sample["png"]))
        image = image.convert("L" if self.channels == 1 else "RGB")
        array = np.asarray(image)
        if array.ndim == 2:
            array = array[None]
        else:
            array = array.transpose(2, 0, 1)
        return array, int(sample.get("cls", b"-1"))

    @staticmethod
    def _collate(samples: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.from_numpy(np.stack([s[0] for s in samples]))
        labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
        return images, labels

    def worker_batches(self, epoch: int, worker: int, skip_batches: int = 0
                       ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        urls = [str(self.folder / self.manifest.shards[i].name) for i in self._worker_shards(epoch, self.rank, worker)]
        rng = random.Random(_stream_seed(self.seed, epoch, self.rank, worker))
        stages = [
            wds.SimpleShardList(urls),
            wds.tarfile_to_samples(handler=self.skip_counter),
        ]
        if self.shuffle_buffer > 1:
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng))
        pipeline = wds.DataPipeline(*stages)
        samples = itertools.islice(iter(pipeline), skip_batches * self.batch_size, None)
        decoded = (d for d in map(self._safe_decode, samples) if d is not None)
        while batch := list(itertools.islice(decoded, self.batch_size)):
            if len(batch) < self.batch_size:
                return
            yield self._collate(batch)

    def _safe_decode(self, sample: dict) -> tuple[np.ndarray, int] | None:
        try:
            return self._decode(sample)
        except Exception:  # an undecodable image is counted and skipped, never fatal
            self.skip_counter.count += 1
            return None

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches of `epoch` from step `start_step` on, exactly `steps_per_epoch` in all."""
        steps = self.steps_per_epoch(epoch)
        skip, order = round_robin_resume(start_step, self._worker_batch_counts(epoch, self.rank))
        dataset = _WorkerStreams(self, epoch, skip, order)
        if self.num_workers == 0:
            stream: Iterator = iter(dataset)
        else:
            stream = iter(torch.utils.data.DataLoader(
                dataset, batch_size=None, num_workers=self.num_workers, prefetch_factor=4,
                persistent_workers=False, multiprocessing_context="fork"))
        yield from itertools.islice(stream, max(steps - start_step, 0))


def to_model_range(images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] on `device` (the paper's scaling, no augmentation)."""
    return images.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
