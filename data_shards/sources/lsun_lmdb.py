"""LSUN's distribution format: one LMDB per category, key = image id, value = encoded image."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import lmdb


class SourceMissing(FileNotFoundError):
    pass


class LsunLmdb:
    kind = "lsun"

    def __init__(self, path: Path):
        if not (path / "data.mdb").is_file():
            raise SourceMissing(f"{path} is not an LMDB folder (no data.mdb); pass the category folder, "
                                "e.g. bedroom_train_lmdb")
        self.path = path
        self.classes: list[str] = []

    @contextlib.contextmanager
    def _env(self) -> Iterator[lmdb.Environment]:
        # Opened per use and closed after: an LMDB handle must not cross a fork, and py-lmdb
        # refuses a second handle on one environment in a process.
        env = lmdb.open(str(self.path), readonly=True, lock=False, readahead=False, meminit=False)
        try:
            yield env
        finally:
            env.close()

    def describe(self) -> dict:
        with self._env() as env:
            return {"kind": self.kind, "path": str(self.path), "entries": env.stat()["entries"]}

    def scan_keys(self) -> Iterator[str]:
        with self._env() as env, env.begin(buffers=True) as txn:
            for key in txn.cursor().iternext(keys=True, values=False):
                yield bytes(key).decode()

    def read(self, first_key: str, count: int) -> Iterator[tuple[str, bytes, int]]:
        with self._env() as env, env.begin() as txn:
            cursor = txn.cursor()
            if not cursor.set_key(first_key.encode()):
                raise KeyError(f"{self.path}: key {first_key!r} vanished since the conversion was planned")
            for _ in range(count):
                key, value = cursor.item()
                yield key.decode(), value, -1
                if not cursor.next():
                    return
