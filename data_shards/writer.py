"""Writes samples into WebDataset tar shards of a fixed size, each one atomically."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from data_shards.manifest import Manifest, ShardInfo, sha256_file, write_manifest


def resize_square(image: np.ndarray, resolution: int) -> np.ndarray:
    """Centre-crop to a square, then resize to `resolution` (the paper's preprocessing)."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    image = image[top:top + side, left:left + side]
    if side == resolution:
        return np.ascontiguousarray(image)
    # Pillow's bicubic resize antialiases when shrinking and interpolates smoothly when growing.
    pil = Image.fromarray(image).resize((resolution, resolution), Image.Resampling.BICUBIC)
    return np.asarray(pil)


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class ShardWriter:
    """Streams (key, record) pairs into shard-000000.tar, shard-000001.tar, ... under `folder`.

    A shard is written to a hidden temp name and renamed once complete, so an interrupted
    conversion never leaves a partial shard under a final name.
    """

    def __init__(self, folder: str | Path, shard_size: int):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.shards: list[ShardInfo] = []
        self._tar: wds.TarWriter | None = None
        self._count = 0

    def _open(self) -> None:
        name = f"shard-{len(self.shards):06d}.tar"
        self._final = self.folder / name
        self._tmp = self.folder / f".{name}.tmp"
        self._tar = wds.TarWriter(str(self._tmp), encoder=False, mtime=0.0)
        self._count = 0

    def _close(self) -> None:
        assert self._tar is not None
        self._tar.close()
        with open(self._tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self._tmp, self._final)
        self.shards.append(ShardInfo(self._final.name, self._count, sha256_file(self._final),
                                     self._final.stat().st_size))
        self._tar = None

    def write(self, key: str, record: dict[str, bytes]) -> None:
        if self._tar is None:
            self._open()
        self._tar.write({"__key__": key, **record})
        self._count += 1
        if self._count == self.shard_size:
            self._close()

    def finish(self) -> list[ShardInfo]:
        if self._tar is not None:
            self._close()
        return self.shards


def write_image_shards(samples: Iterable[tuple[str, np.ndarray, int]], folder: str | Path, *,
                       resolution: int, shard_size: int, source: dict, classes: Iterable[str] = ()
                       ) -> Manifest:
    """Resize each (key, uint8 image, class) to `resolution`, store it as PNG, write the manifest."""
    writer = ShardWriter(folder, shard_size)
    for key, image, label in samples:
        png = encode_png(resize_square(image, resolution))
        writer.write(key, {"png": png, "cls": str(label).encode()})
    manifest = Manifest(
        source=source,
        transform={"resolution": resolution, "crop": "center", "resize": "bicubic"},
        encoding="png",
        shards=writer.finish(),
        classes=list(classes),
    )
    write_manifest(folder, manifest)
    return manifest
