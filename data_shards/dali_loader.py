"""Streams a shard set with NVIDIA DALI: its webdataset reader, GPU ('mixed') decode when CUDA is
present and CPU decode otherwise, to uint8 N x H x W x C batches on the decode device (the
trainer scales them to the compute dtype in the same pass that casts them).

Split: DALI's reader shards by sample, not by file: of num_shards contiguous slices of the
set, rank r reads slice (r + epoch) mod world in epoch `epoch`, so every rank sees other data
each epoch, and all ranks together see each sample once per epoch. Within the slice, a shuffle
buffer seeded by (seed, epoch, rank) mixes the order. Every rank runs floor(smallest slice /
batch) steps; the rest of its slice waits for the next epoch.

Resume mid-epoch rebuilds the epoch's pipeline and drops its first batches, which DALI still
decodes (the WebDataset loader drops them before decoding).

Damage: DALI stops on an undecodable image, so the loader trusts what conversion verified
(every stored image was decoded once then) and checks at start that each shard still has its
manifest size; a shard that does not is left out, named in a warning and its samples counted in
`skipped`. Bytes changed in place (same size) are found by hashing, `dcgan data verify`, not at
every start; should DALI meet such a sample it stops the run with one line that says so.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from data_shards.manifest import ShardSetError, read_manifest_for, size_mismatches
from data_shards.transform import EXTENSIONS

log = logging.getLogger(__name__)
# A DALI pipeline that is garbage when the process forks (a conversion pool, DataLoader workers)
# and is collected in the child waits in its shutdown, forever, for threads the child does not
# have; collected before the fork, it shuts down in the process that runs them.
os.register_at_fork(before=gc.collect)
_LABEL_BYTES = 12  # labels are stored as text ("3", "-1"); padded to a fixed width for DALI


def _build_pipeline(*, paths: list[str], index_paths: list[str], extension: str, encoding: str,
                    shape: tuple[int, int, int], shard_id: int, num_shards: int, shuffle_buffer: int,
                    batch_size: int, num_threads: int, device_id: int | None, seed: int):
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    channels = shape[2]

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=2)
    def pipeline():
        encoded, labels = fn.readers.webdataset(
            paths=paths, index_paths=index_paths, ext=[extension, "cls"], shard_id=shard_id,
            num_shards=num_shards, random_shuffle=shuffle_buffer > 1, initial_fill=max(shuffle_buffer, 1),
            missing_component_behavior="empty", name="reader")  # unlabelled sets store no "cls"
        if encoding == "raw":
            images = fn.reshape(encoded, shape=list(shape), layout="HWC")
            images = images.gpu() if gpu else images
        else:
            images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu",
                                       output_type=types.GRAY if channels == 1 else types.RGB)
        labels = fn.pad(labels, axes=[0], shape=[_LABEL_BYTES], fill_value=0)
        return images, labels

    pipe = pipeline()
    pipe.build()
    return pipe


def _parse_labels(padded: torch.Tensor) -> torch.Tensor:
    rows = padded.cpu().numpy()
    return torch.tensor([int(bytes(r).rstrip(b"\0") or b"-1") for r in rows], dtype=torch.int64)


class DaliLoader:
    def __init__(self, folder: str | Path, *, rank: int, world_size: int, batch_size: int, seed: int,
                 channels: int, resolution: int, num_workers: int = 1, shuffle_buffer: int = 5000,
                 device: torch.device | str = "cpu"):
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            raise ShardSetError("data.loader = 'dali' needs NVIDIA DALI: pip install 'dcgan-scale[dali]'") from None
        self.folder = Path(folder)
        self.manifest = read_manifest_for(self.folder, resolution, channels)
        self.rank, self.world_size, self.batch_size, self.seed = rank, world_size, batch_size, seed
        self.shape = (resolution, resolution, channels)
        self.num_threads = max(num_workers, 1)
        self.shuffle_buffer = shuffle_buffer
        self.device = torch.device(device)
        self.skipped = 0
        # a shard whose size changed is left out whole: the index DALI's reader seeks by was made for the
        # shard as converted, and past a cut it would read garbage or fail
        changed = {shard.name: problem for shard, problem in size_mismatches(self.folder, self.manifest.shards)}
        self.shards = []
        for shard in self.manifest.shards:
            path = self.folder / shard.name
            if shard.name in changed:
                log.warning("%s: %s in the manifest: left out, its %d samples counted as skipped; "
                            "`dcgan data verify %s` checks every shard", path, changed[shard.name], shard.count,
                            self.folder)
                self.skipped += shard.count
                continue
            if not path.with_suffix(".idx").is_file():
                raise ShardSetError(f"{path.with_suffix('.idx')} is missing: convert with DALI installed "
                                    "(it writes the index files DALI's reader needs)")
            self.shards.append(shard)
        self.total = sum(s.count for s in self.shards)

    def steps_per_epoch(self, epoch: int) -> int:
        smallest = min((self.total * (r + 1)) // self.world_size - (self.total * r) // self.world_size
                       for r in range(self.world_size))
        return smallest // self.batch_size

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        pipe = _build_pipeline(
            paths=[str(self.folder / s.name) for s in self.shards],
            index_paths=[str((self.folder / s.name).with_suffix(".idx")) for s in self.shards],
            extension=EXTENSIONS[self.manifest.encoding], encoding=self.manifest.encoding, shape=self.shape,
            shard_id=(self.rank + epoch) % self.world_size, num_shards=self.world_size,
            shuffle_buffer=self.shuffle_buffer, batch_size=self.batch_size, num_threads=self.num_threads,
            device_id=self.device.index if self.device.type == "cuda" else None,
            seed=(self.seed * 1_000_003 + epoch) * 1_009 + self.rank)
        try:  # the iterator runs the pipeline from its construction on
            iterator = DALIGenericIterator([pipe], ["images", "labels"], reader_name="reader",
                                           last_batch_policy=LastBatchPolicy.DROP, auto_reset=False)
            for batch in itertools.islice(iterator, start_step, self.steps_per_epoch(epoch)):
                images = batch[0]["images"]
                yield images.to(self.device, non_blocking=True), _parse_labels(batch[0]["labels"])
        except RuntimeError as e:
            raise _data_error(e, self.folder) from None


def _data_error(error: RuntimeError, folder: Path) -> BaseException:
    """DALI's error for bytes it cannot read or decode, as one line; any other error as it is."""
    text = str(error)
    if "Critical error in pipeline" not in text:
        return error
    operator = re.search(r"operator `([^`]+)`", text)
    detail = re.search(r"encountered:\s*\n\s*(\S[^\n]*)", text)
    what = ", ".join(m.group(1) for m in (operator, detail) if m) or text.splitlines()[0]
    return ShardSetError(f"DALI could not read or decode a sample of {folder} ({what}) and cannot skip one: "
                         f"`dcgan data verify {folder}` names shards changed since conversion; data.loader = "
                         "'webdataset' or 'device' skips and counts undecodable samples")
