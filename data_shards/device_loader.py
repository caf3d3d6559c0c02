"""Holds one rank's part of a shard set in device memory, as bytes, and serves shuffled batches from it.

Why: on a GPU a DCGAN step at 64x64 takes about a millisecond, so a rank eats 100k+ images a
second; no host pipeline (tar read, decode, collate, pinned copy) feeds that from a few cores
per GPU. At training resolution a set is small as uint8 pixels: LSUN bedrooms at 64x64x3 are
~37 GB in all, ~4.6 GB per rank on 8 GPUs, beside a model of a few hundred MB. So each rank
reads and decodes its part ONCE, at construction, into one uint8 N x H x W x C tensor on its
device; an epoch is then a permutation drawn on the device and a batch one index_select: no
host work and no host-device sync per batch.

Split: the set's samples in manifest order (shard by shard, tar order within a shard) are cut
into world_size contiguous ranges, rank r holding [total * r // world, total * (r + 1) // world),
the same every epoch (moving data between ranks each epoch would defeat the point). Ranks
therefore differ by at most one sample and all run total // world // batch steps per epoch;
the global batch, one uniform draw from each rank's part, is a stratified sample of the set.
A range may start or end inside a shard: that shard is read by both ranks, each decoding
only its own samples.

Order: each epoch a full permutation of the rank's samples from a generator seeded by
(seed, epoch, rank), so the order is a pure function of those and resuming at step k redraws
the same permutation and starts at its batch k: exact and free. The few samples past the
last full batch differ each epoch. (CPU and CUDA generators differ, so the order depends on
the device kind too.) There is no shuffle buffer: the shuffle is complete.

Damage: an undecodable image, a sample without one, a truncated shard: the samples this rank's
range promised and did not get are counted in `skipped`, never fatal (a shard whose size is not
the manifest's is named in a warning too; `dcgan data verify` hashes every shard). The step count stays the
manifest's, the same on every rank, so a rank short of samples continues its permutation with
another one (a few samples twice that epoch) rather than disagree with the other ranks on the
number of steps; one left with less than a batch raises ShardSetError.

Memory: the bytes needed (the rank's manifest count x H x W x C) are checked against a budget
before anything is allocated: `memory_gib` if > 0, else half of the device's free memory (of
the available host memory on a CPU), and a set that does not fit is refused in one line.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch
import webdataset as wds

from data_shards.loader import _stream_seed
from data_shards.manifest import Manifest, ShardSetError, read_manifest_for, size_mismatches
from data_shards.transform import EXTENSIONS, UndecodableImage, decode_stored

GIB = 1 << 30
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _ShardPart:
    """Samples [first, stop) of a shard, by position in the tar, that belong to this rank."""

    path: str
    first: int
    stop: int
    encoding: str
    shape: tuple[int, int, int]


def _read_part(part: _ShardPart) -> tuple[np.ndarray, np.ndarray]:
    """Decode one shard's part: (uint8 k x H x W x C, int64 k labels), k <= stop - first; the
    samples missing from k are the damage, counted by the caller."""
    wanted = part.stop - part.first
    images = np.empty((wanted, *part.shape), dtype=np.uint8)
    labels = np.empty(wanted, dtype=np.int64)
    extension = EXTENSIONS[part.encoding]
    # a truncated tar or an unreadable member ends the shard there: what is missing gets counted
    samples = wds.DataPipeline(wds.SimpleShardList([part.path]), wds.tarfile_to_samples(handler=lambda _: True))
    good = 0
    for position, sample in enumerate(samples):
        if position >= part.stop:
            break
        if position < part.first:  # another rank's sample: read past, not decoded
            continue
        try:
            image = decode_stored(sample[extension], part.encoding, part.shape)
            label = int(sample.get("cls", b"-1"))
        except (UndecodableImage, KeyError, ValueError):
            # as in ShardLoader: damaged data is skipped; any other exception is a bug and propagates
            continue
        images[good] = image
        labels[good] = label
        good += 1
    return images[:good], labels[:good]


class DeviceLoader:
    """The trainer's loader interface over a set held in device memory: `steps_per_epoch(epoch)`,
    `batches(epoch, start_step)` yielding (uint8 images N x H x W x C on `device`, int64 labels on
    the CPU), `skipped` and `manifest`.

    `num_workers` processes decode the shards at construction (0: in this process).
    `shuffle_buffer` is accepted for the common loader signature and ignored: every epoch is a
    full permutation. `memory_gib` caps the memory the images may take (0: half of the free).
    """

    def __init__(self, folder: str | Path, *, rank: int, world_size: int, batch_size: int, seed: int,
                 channels: int, resolution: int, num_workers: int = 1, shuffle_buffer: int = 0,
                 device: torch.device | str = "cpu", memory_gib: float = 0.0):
        self.folder = Path(folder)
        self.manifest: Manifest = read_manifest_for(self.folder, resolution, channels)
        self.rank, self.world_size, self.batch_size, self.seed = rank, world_size, batch_size, seed
        self.shape = (resolution, resolution, channels)
        self.device = torch.device(device)
        # on a CPU, torch's index_select gathers uint8 rows far slower than numpy's take, which copies
        # each image whole (64x64x3 on 2 cores: 15-130k against ~450k img/s); and there is no device
        # there whose queue it would matter to keep full
        self._gather_with_numpy = self.device.type == "cpu"
        self.skipped = 0
        total = self.manifest.total
        # every rank computes every rank's range from the manifest alone, so they agree without talking
        self.first, self.stop = total * rank // world_size, total * (rank + 1) // world_size
        self.steps = (total // world_size) // batch_size
        wanted = self.stop - self.first
        self.bytes_needed = wanted * int(np.prod(self.shape))
        budget, what = self._budget(memory_gib)
        if self.bytes_needed > budget:
            raise ShardSetError(
                f"data.loader = 'device': rank {rank}'s {wanted:,} images of {self.folder} "
                f"({resolution}x{resolution}x{channels} uint8) need {self.bytes_needed / GIB:.3g} GiB, over the "
                f"budget of {budget / GIB:.3g} GiB ({what}); allow more with data.device_memory_gib, use more "
                f"ranks, or set data.loader = 'webdataset'")
        parts = {Path(part.path).name for part in self._parts()}
        mine = [shard for shard in self.manifest.shards if shard.name in parts]
        for shard, problem in size_mismatches(self.folder, mine):
            log.warning("%s: %s in the manifest: read as far as it goes, what it lacks is counted as skipped; "
                        "`dcgan data verify %s` checks every shard", self.folder / shard.name, problem, self.folder)
        images = torch.empty((wanted, *self.shape), dtype=torch.uint8, device=self.device)
        labels = torch.empty(wanted, dtype=torch.int64)
        held = 0
        for part_images, part_labels in self._decoded_parts(num_workers):
            k = len(part_labels)
            images[held:held + k].copy_(torch.from_numpy(part_images))
            labels[held:held + k] = torch.from_numpy(part_labels)
            held += k
        self.skipped = wanted - held
        # views: copying the damaged set into a smaller tensor would need both in memory at once
        self.images, self.labels = images[:held], labels[:held]
        if held < batch_size:
            raise ShardSetError(f"rank {rank} holds {held} images of {self.folder}, fewer than one batch of "
                                f"{batch_size} ({self.skipped} skipped as damaged, {total} in the set for "
                                f"{world_size} rank(s))")

    def _budget(self, memory_gib: float) -> tuple[float, str]:
        if memory_gib > 0:
            return memory_gib * GIB, "data.device_memory_gib"
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            return torch.cuda.mem_get_info(index)[0] / 2, f"half of the free memory of cuda:{index}"
        return psutil.virtual_memory().available / 2, "half of the available host memory"

    def _parts(self) -> list[_ShardPart]:
        parts, offset = [], 0
        for shard in self.manifest.shards:
            first, stop = max(self.first - offset, 0), min(self.stop - offset, shard.count)
            if first < stop:
                parts.append(_ShardPart(str(self.folder / shard.name), first, stop, self.manifest.encoding,
                                        self.shape))
            offset += shard.count
        return parts

    def _decoded_parts(self, num_workers: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        parts = self._parts()
        processes = min(num_workers, len(parts))
        if processes <= 1:
            yield from map(_read_part, parts)
            return
        # fork: the children only decode (numpy, Pillow) and never touch the parent's CUDA context;
        # imap keeps the shard order, so the held order does not depend on num_workers
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            yield from pool.imap(_read_part, parts, chunksize=1)

    def steps_per_epoch(self, epoch: int) -> int:
        return self.steps

    def _order(self, epoch: int) -> torch.Tensor:
        """The epoch's sample order on the host: steps x batch indices into the held images.

        Drawn by a CPU generator (a few ms for a rank's part of LSUN, once an epoch): the labels are
        indexed on the host, and an order drawn on the device would have to be read back, a sync
        inside a log window; the device gets a copy that nothing waits for. Same order on any device.
        """
        generator = torch.Generator().manual_seed(_stream_seed(self.seed, epoch, self.rank))
        held, needed = len(self.labels), self.steps * self.batch_size
        draws = -(-needed // held)  # > 1 only where damage left this rank short of its steps
        perm = [torch.randperm(held, generator=generator) for _ in range(draws)]
        return (perm[0] if draws == 1 else torch.cat(perm))[:needed]

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches of `epoch` from step `start_step` on, exactly `steps_per_epoch` in all."""
        order_cpu = self._order(epoch)
        if self.device.type == "cuda":
            order_cpu = order_cpu.pin_memory()  # so the copy below is queued, not waited for
        order = order_cpu.to(self.device, non_blocking=True)
        size = self.batch_size
        held = self.images.numpy() if self._gather_with_numpy else None
        for k in range(start_step, self.steps):
            rows = order_cpu[k * size:(k + 1) * size]
            if held is not None:
                images = torch.from_numpy(held.take(rows.numpy(), axis=0))
            else:  # a slice of a device tensor and an index_select are queued, not waited for
                images = self.images.index_select(0, order[k * size:(k + 1) * size])
            yield images, self.labels.index_select(0, rows)
