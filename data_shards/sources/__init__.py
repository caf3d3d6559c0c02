"""Sources of images to convert: each lists its keys in a stable order and reads key ranges.

A source is read in two passes: `scan_keys()` walks the keys alone (no values) to plan shard
boundaries, then each worker process opens the source itself and `read(first_key, count)`
streams one shard's worth of (key, encoded bytes or pixels, label). Nothing holds the whole
data set in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

KINDS = ("lsun", "folder", "fashion-mnist")


class Source(Protocol):
    kind: str
    classes: list[str]

    def describe(self) -> dict: ...

    def scan_keys(self) -> Iterator[str]: ...

    def read(self, first_key: str, count: int) -> Iterator[tuple[str, bytes | np.ndarray, int]]: ...


def open_source(kind: str, path: str | Path | None, split: str = "train") -> Source:
    if kind == "lsun":
        from data_shards.sources.lsun_lmdb import LsunLmdb

        return LsunLmdb(_required(kind, path))
    if kind == "folder":
        from data_shards.sources.image_folder import ImageFolder

        return ImageFolder(_required(kind, path))
    if kind == "fashion-mnist":
        from data_shards.sources.fashion_mnist import FashionMnist

        return FashionMnist(path, split)
    raise ValueError(f"unknown source {kind!r}; sources: {', '.join(KINDS)}")


def paths_of(source: Source) -> list[Path]:
    """What every machine that reads `source` must reach: its file or folder (none for one in memory)."""
    path = source.describe().get("path")
    return [Path(path)] if path else []


def _required(kind: str, path: str | Path | None) -> Path:
    if path is None:
        raise ValueError(f"source {kind!r} needs --input")
    return Path(path)
