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
epoch). A corrupt sample or a truncated shard is skipped and counted (`skipped`); should that
leave a rank short of its step count, it tops up from the start of its own stream, so ranks
never disagree on the number of steps.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from data_shards.manifest import Manifest, ShardSetError, read_manifest_for
from data_shards.transform import EXTENSIONS, UndecodableImage, decode_stored


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


class _WorkerStreams(torch.utils.data.IterableDataset):
    """One epoch of one rank; each DataLoader worker reads its own slice of the rank's shards."""

    def __init__(self, loader: ShardLoader, epoch: int, skip_batches: list[int], order: list[int]):
        super().__init__()
        self.loader, self.epoch, self.skip_batches, self.order = loader, epoch, skip_batches, order

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        info = torch.utils.data.get_worker_info()
        worker = self.order[0 if info is None else info.id]
        yield from self.loader.worker_batches(self.epoch, worker, self.skip_batches[worker])


class ShardLoader:
    """The loader interface the trainer uses: `steps_per_epoch(epoch)`, `batches(epoch, start)`
    yielding (uint8 images N x H x W x C on `device`, int64 labels), and `skipped`.

    Workers batch uint8 pixels, so only bytes cross the process boundary and the host-to-device
    copy; for a CUDA device the DataLoader pins them, so that copy runs asynchronously.
    """

    def __init__(self, folder: str | Path, *, rank: int, world_size: int, batch_size: int, seed: int,
                 channels: int, resolution: int, num_workers: int = 1, shuffle_buffer: int = 5000,
                 device: torch.device | str = "cpu"):
        self.folder = Path(folder)
        self.manifest: Manifest = read_manifest_for(self.folder, resolution, channels)
        self.shape = (resolution, resolution, channels)
        self.extension = EXTENSIONS[self.manifest.encoding]
        self.device = torch.device(device)
        self.skipped = 0
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.seed, self.channels = seed, channels
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        streams = world_size * max(num_workers, 1)
        if len(self.manifest.shards) < streams:
            raise ShardSetError(
                f"{self.folder} has {len(self.manifest.shards)} shards but {world_size} rank(s) x "
                f"{max(num_workers, 1)} worker(s) need at least {streams}; convert with a smaller --shard-size")

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
        return decode_stored(sample[self.extension], self.manifest.encoding, self.shape), int(sample.get("cls", b"-1"))

    @staticmethod
    def _collate(samples: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.from_numpy(np.stack([s[0] for s in samples]))
        labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
        return images, labels

    def worker_batches(self, epoch: int, worker: int, skip_batches: int = 0
                       ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """One worker's batches as (uint8 images, labels, items skipped since the last batch)."""
        urls = [str(self.folder / self.manifest.shards[i].name) for i in self._worker_shards(epoch, self.rank, worker)]
        rng = random.Random(_stream_seed(self.seed, epoch, self.rank, worker))
        skipped = 0

        def count_and_continue(exn: Exception) -> bool:  # a truncated tar or an unreadable member
            nonlocal skipped
            skipped += 1
            return True

        stages = [wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=count_and_continue)]
        if self.shuffle_buffer > 1:
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng))
        samples = itertools.islice(iter(wds.DataPipeline(*stages)), skip_batches * self.batch_size, None)
        batch: list[tuple[np.ndarray, int]] = []
        for sample in samples:
            try:
                batch.append(self._decode(sample))
            except (UndecodableImage, KeyError, ValueError):
                # an undecodable image, a sample without one, a label that is no int: counted, never
                # fatal; any other exception is a bug, not damaged data, and must not be counted away
                skipped += 1
                continue
            if len(batch) == self.batch_size:
                yield self._collate(batch) + (skipped,)
                batch, skipped = [], 0

    def _rank_stream(self, epoch: int, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        skip, order = round_robin_resume(start_step, self._worker_batch_counts(epoch, self.rank))
        dataset = _WorkerStreams(self, epoch, skip, order)
        if self.num_workers == 0:
            return iter(dataset)
        return iter(torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=self.num_workers, prefetch_factor=4,
            persistent_workers=False, multiprocessing_context="fork", pin_memory=self.device.type == "cuda"))

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches of `epoch` from step `start_step` on, exactly `steps_per_epoch` in all."""
        wanted = max(self.steps_per_epoch(epoch) - start_step, 0)
        stream = itertools.chain(self._rank_stream(epoch, start_step),
                                 itertools.chain.from_iterable(self._rank_stream(epoch, 0) for _ in range(2)))
        produced = 0
        for images, labels, skipped in itertools.islice(stream, wanted):
            self.skipped += skipped
            produced += 1
            yield to_device(images, self.device), labels
        if produced < wanted:
            raise ShardSetError(f"rank {self.rank} read only {produced} of {wanted} batches of epoch {epoch} "
                                f"from {self.folder}: too many shards are damaged ({self.skipped} items skipped)")


def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch onto the training device without making the host wait: from pinned memory
    a CUDA copy is asynchronous (pageable memory would block until it is done)."""
    if device.type == "cuda" and not images.is_pinned():
        images = images.pin_memory()
    return images.to(device, non_blocking=True)
