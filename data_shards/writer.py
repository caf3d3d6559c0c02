"""Writes one WebDataset tar shard atomically, plus the index file DALI's reader uses."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from common.atomic import write_atomically
from data_shards.manifest import ShardInfo, sha256_file

T = TypeVar("T")


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_dali_index(shard: Path) -> bool:
    """`shard`.idx via DALI's own wds2idx; False where DALI is not installed."""
    try:
        from wds2idx import IndexCreator
    except ImportError:
        return False
    def index(tmp: Path) -> None:
        with IndexCreator(str(shard), str(tmp), verbose=False) as creator:
            creator.create_index()

    write_atomically(shard.with_suffix(".idx"), index, shard_temp_files(shard)[1])
    return True


def shard_temp_files(path: Path) -> list[Path]:
    """The hidden names a shard and its index are written under before their rename."""
    return [path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.with_suffix('.idx').name}.tmp")]


def _write_tar(tmp: Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """What webdataset's TarWriter(encoder=False, mtime=0, user=group="dcgan") writes, byte for byte,
    without importing webdataset (and with it torch, seconds of start-up for every conversion)."""
    count = 0
    with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for key, record in samples:
            for extension in sorted(record):  # the member order readers group samples by
                value = record[extension]
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size, info.mode, info.uname, info.gname = len(value), 0o444, "dcgan", "dcgan"
                # an integer mtime: with a float one, tarfile gives every member an extra PAX header,
                # which doubles the header parsing every reader does (it dominates a 64x64 loader's time)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(value))
            count += 1
    return count


def write_shard(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]], dali_index: bool = True) -> ShardInfo:
    """Write (key, {extension: bytes}) samples to `path` via a hidden temp file and a rename, so a
    crash never leaves a partial shard under the final name. A full disk raises OSError(ENOSPC)
    naming the file; the temp file is removed, so what it had taken is free again."""
    def tar(tmp: Path) -> int:
        count = _write_tar(tmp, samples)
        _fsync(tmp)
        return count

    count = write_atomically(path, tar, shard_temp_files(path)[0])
    if dali_index and count:  # DALI's indexer refuses an empty tar; a shard with nothing left is not used
        write_dali_index(path)
    return ShardInfo(path.name, count, sha256_file(path), path.stat().st_size)


def read_shard(path: Path) -> Iterator[dict]:
    """The samples of one shard as {"__key__": key, extension: bytes, ...}."""
    import webdataset as wds

    pipeline = wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples())
    for sample in pipeline:
        yield {k: v for k, v in sample.items() if k != "__url__" and k != "__local_path__"}
