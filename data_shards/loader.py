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
epoch). A worker decodes only the batches its rank will take (the round robin tells it how many).

Damage: an undecodable sample is skipped and counted (`skipped`). A shard cut short or gone is
read as far as it goes: each worker counts the samples every one of its shards delivered and,
when that shard's stream has ended, counts those the manifest promised and it did not get, so
`skipped` grows by the samples actually lost (samples dropped to resume are delivered, not lost).
Each worker reads its shards to the end even past its last batch, and the rank takes its
workers' last reports after its last batch, so every epoch counts all of the rank's damage once
(shards whose size differs from the manifest are also named in a warning at start). Should
damage leave a rank short of its step count, it tops up from the start of its own stream (what
that re-reads is not counted twice), so ranks never disagree on the number of steps.

A DataLoader worker that dies (the OOM killer, a signal from outside) costs time, not data: the
rank's stream is rebuilt at the batch it had reached, which by the resume rule above is the
same stream, so the batches after the death are those an uninterrupted run gets. A stream is
rebuilt at most WORKER_RESTARTS times; the next death raises WorkerDeaths, one line naming it.
"""

from __future__ import annotations

import itertools
import logging
import random
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from data_shards.manifest import Manifest, ShardSetError, read_manifest_for, size_mismatches
from data_shards.transform import EXTENSIONS, UndecodableImage, decode_stored

log = logging.getLogger(__name__)
# what a worker reports with each batch: the damage it found since the last one, as {what: samples},
# where `what` names a shard (samples it lost) or a shard's sample (one that did not decode)
Damage = dict[str, int]
# how torch's DataLoader reports a worker process that is gone
WORKER_DIED = re.compile(r"DataLoader worker \(pid")
WORKER_RESTARTS = 3  # per rank stream: a worker that dies every time (bad memory, a leak) is not waited out


class WorkerDeaths(RuntimeError):
    """DataLoader workers of one rank's stream died more often than WORKER_RESTARTS allows."""


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

    def __init__(self, loader: ShardLoader, epoch: int, skip_batches: list[int], order: list[int], quota: list[int]):
        super().__init__()
        self.loader, self.epoch, self.skip_batches, self.order, self.quota = loader, epoch, skip_batches, order, quota

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, Damage]]:
        info = torch.utils.data.get_worker_info()
        worker = self.order[0 if info is None else info.id]
        yield from self.loader.worker_batches(self.epoch, worker, self.skip_batches[worker], self.quota[worker],
                                              report_at_end=True)


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
        self.worker_restarts = 0
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.seed, self.channels = seed, channels
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        streams = world_size * max(num_workers, 1)
        if len(self.manifest.shards) < streams:
            raise ShardSetError(
                f"{self.folder} has {len(self.manifest.shards)} shards but {world_size} rank(s) x "
                f"{max(num_workers, 1)} worker(s) need at least {streams}; convert with a smaller --shard-size")
        for shard, problem in size_mismatches(self.folder, self.manifest.shards):
            log.warning("%s: %s in the manifest: read as far as it goes, what it lacks is counted as skipped; "
                        "`dcgan data verify %s` checks every shard", self.folder / shard.name, problem, self.folder)

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

    def worker_batches(self, epoch: int, worker: int, skip_batches: int = 0, quota: int | None = None,
                       report_at_end: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor, Damage]]:
        """One worker's batches as (uint8 images, labels, damage found since the last batch), its
        batches from `skip_batches` up to `quota` (None: all). Past the quota the shards are still
        read to their end, undecoded, so that what they lack is known; with `report_at_end`, damage
        found after the last batch comes as one more item with no images."""
        shards = [self.manifest.shards[i] for i in self._worker_shards(epoch, self.rank, worker)]
        urls = [str(self.folder / shard.name) for shard in shards]
        promised = {url: shard.count for url, shard in zip(urls, shards, strict=True)}
        rng = random.Random(_stream_seed(self.seed, epoch, self.rank, worker))
        delivered: Counter[str] = Counter()
        damage: Damage = {}

        def settle(url: str) -> None:  # this shard's stream has ended: what it did not deliver is lost
            lost = promised.pop(url) - delivered[url]
            if lost > 0:
                damage[url.rpartition("/")[2]] = lost

        def count_delivered(samples: Iterable[dict]) -> Iterator[dict]:
            # before the shuffle buffer, where a worker reads its shards one after the other
            current = None
            for sample in samples:
                url = sample["__url__"]
                if url != current:
                    if current in promised:
                        settle(current)
                    current = url
                if self.extension in sample:  # else a sample cut short (or stored without an image): lost
                    delivered[url] += 1
                    yield sample
            for url in list(promised):  # the last shard, and any that delivered nothing at all
                settle(url)

        # a truncated tar or an unreadable member ends its shard or drops the member: the samples that go
        # missing that way are counted by count_delivered
        stages = [wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=lambda _: True), count_delivered]
        if self.shuffle_buffer > 1:
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng))
        samples = itertools.islice(iter(wds.DataPipeline(*stages)), skip_batches * self.batch_size, None)
        batch: list[tuple[np.ndarray, int]] = []
        produced = skip_batches
        for sample in samples:
            if quota is not None and produced >= quota:
                continue  # no batch of ours is taken past the quota: read on without decoding
            try:
                batch.append(self._decode(sample))
            except (UndecodableImage, ValueError):
                # an undecodable image or a label that is no int: counted, never fatal; any other
                # exception is a bug, not damaged data, and must not be counted away
                damage[f"{sample['__url__'].rpartition('/')[2]}/{sample['__key__']}"] = 1
                continue
            if len(batch) == self.batch_size:
                yield self._collate(batch) + (damage,)
                batch, damage = [], {}
                produced += 1
        if damage and report_at_end:
            empty = torch.empty((0, *self.shape), dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
            yield empty + (damage,)

    def _rank_stream(self, epoch: int, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, Damage]]:
        counts = self._worker_batch_counts(epoch, self.rank)
        skip, order = round_robin_resume(start_step, counts)
        quota, _ = round_robin_resume(self.steps_per_epoch(epoch), counts)
        dataset = _WorkerStreams(self, epoch, skip, order, quota)
        if self.num_workers == 0:
            return iter(dataset)
        # a DataLoader draws its workers' base seed from the generator it is given, else from torch's
        # global RNG: one draw per epoch, or per resume, would leave a resumed run's global RNG one
        # draw off an uninterrupted one's (the workers here use their own seeded streams anyway)
        seed = torch.Generator().manual_seed(_stream_seed(self.seed, epoch, self.rank, start_step))
        main_thread = threading.current_thread() is threading.main_thread()
        before = signal.getsignal(signal.SIGCHLD) if main_thread else None
        batches = iter(torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=self.num_workers, prefetch_factor=4, generator=seed,
            persistent_workers=False, multiprocessing_context="fork", pin_memory=self.device.type == "cuda"))
        if main_thread:
            # torch's SIGCHLD handler raises a dead worker's error in whatever the main thread runs, mid
            # optimiser step too, where nothing can recover; without it the iterator finds the dead worker
            # itself (within 5 s of needing its batch), inside the loader, where the stream restarts
            signal.signal(signal.SIGCHLD, signal.SIG_DFL if before is None else before)
        return batches

    def _surviving_stream(self, epoch: int, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, Damage]]:
        """`_rank_stream`, rebuilt at the batch it had reached when a DataLoader worker dies."""
        delivered = 0
        for restart in itertools.count():
            stream = self._rank_stream(epoch, start_step + delivered)
            try:
                for item in stream:
                    yield item
                    delivered += bool(len(item[1]))
                return
            except (RuntimeError, ConnectionError, EOFError) as e:
                death = _worker_death(e, stream)
                if death is None:
                    raise
                if restart == WORKER_RESTARTS:
                    # the raw error may be a cut connection that names no worker: say what happened, in one line
                    raise WorkerDeaths(
                        f"rank {self.rank}: {death} at batch {start_step + delivered} of epoch {epoch}; its stream "
                        f"has restarted {WORKER_RESTARTS} times already, the most allowed: a worker that keeps dying "
                        f"(out of memory, killed from outside) is not waited out") from e
                self.worker_restarts += 1
                log.warning("rank %d: %s; its stream restarts at batch %d of epoch %d (restart %d of %d)",
                            self.rank, death, start_step + delivered, epoch, restart + 1, WORKER_RESTARTS)

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches of `epoch` from step `start_step` on, exactly `steps_per_epoch` in all."""
        wanted = max(self.steps_per_epoch(epoch) - start_step, 0)
        if wanted == 0:
            return
        counted: set[str] = set()

        def count(damage: Damage) -> None:  # once per epoch: a top-up stream re-reads damage already counted
            for what, samples in damage.items():
                if what not in counted:
                    counted.add(what)
                    self.skipped += samples

        produced = 0
        streams = itertools.chain([self._surviving_stream(epoch, start_step)],
                                  (self._surviving_stream(epoch, 0) for _ in range(2)))
        for top_up, stream in enumerate(streams):
            # past the last batch the first stream holds only its workers' last reports: read them all;
            # a top-up stream re-reads what the first one reported, so it is left at the last batch
            for images, labels, damage in stream:
                count(damage)
                if produced < wanted and len(labels):
                    produced += 1
                    yield to_device(images, self.device), labels
                if produced == wanted and top_up:
                    break
            if produced == wanted:
                return
        raise ShardSetError(f"rank {self.rank} read only {produced} of {wanted} batches of epoch {epoch} "
                            f"from {self.folder}: too many shards are damaged ({self.skipped} items skipped)")


def _worker_death(error: BaseException, stream: Iterator, wait_s: float = 5.0) -> str | None:
    """What `error` says of a dead DataLoader worker, or None when it is something else. Torch reports a
    death it notices itself as a RuntimeError; a worker killed while handing over a batch instead cuts
    the socket its tensor's file descriptor travels on, and the error is the cut connection."""
    if isinstance(error, RuntimeError):
        return str(error).strip().splitlines()[0].rstrip(".") if WORKER_DIED.search(str(error)) else None
    # a process closes its sockets before it can be reaped: the death shows within moments of the cut
    workers = getattr(stream, "_workers", [])  # torch keeps no public handle on them
    deadline = time.monotonic() + wait_s
    while workers:
        dead = [str(w.pid) for w in workers if not w.is_alive()]
        if dead:
            return (f"DataLoader worker (pid(s) {', '.join(dead)}) exited unexpectedly while handing over a "
                    f"batch ({type(error).__name__})")
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return None


def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch onto the training device without making the host wait: from pinned memory
    a CUDA copy is asynchronous (pageable memory would block until it is done)."""
    if device.type == "cuda" and not images.is_pinned():
        images = images.pin_memory()
    return images.to(device, non_blocking=True)
