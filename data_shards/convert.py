"""Source -> shard set conversions behind `dcgan data convert`."""

from __future__ import annotations

from pathlib import Path

from data_shards import fashion_mnist
from data_shards.manifest import MANIFEST_NAME, Manifest, read_manifest
from data_shards.writer import write_image_shards

SOURCES = ("fashion-mnist",)


def convert(source: str, input_dir: str | Path | None, out_dir: str | Path, *, resolution: int,
            shard_size: int = 5000, split: str = "train", overwrite: bool = False) -> Manifest:
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST_NAME).is_file() and not overwrite:
        return read_manifest(out_dir)  # already converted: conversion is idempotent
    if source != "fashion-mnist":
        raise ValueError(f"unknown source {source!r}; sources: {', '.join(SOURCES)}")
    root = Path(input_dir) if input_dir else fashion_mnist.DEFAULT_DIR
    return write_image_shards(
        fashion_mnist.iter_samples(root, split), out_dir, resolution=resolution, shard_size=shard_size,
        source={"kind": source, "path": str(root), "split": split}, classes=fashion_mnist.CLASSES)
