"""Fashion-MNIST source: the IDX files that Debian's dataset-fashion-mnist installs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data_shards.idx import read_idx

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "sudo apt-get install dataset-fashion-mnist"
CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat",
           "sandal", "shirt", "sneaker", "bag", "ankle boot")
_FILES = {"train": "train", "test": "t10k"}


class DatasetMissing(FileNotFoundError):
    pass


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise DatasetMissing(f"Fashion-MNIST file {stem}(.gz) not found in {root}; install it with: {INSTALL_HINT}")


def load_split(root: str | Path = DEFAULT_DIR, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 28, 28) and int64 labels (N,)."""
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    root = Path(root)
    images = read_idx(_find(root, f"{_FILES[split]}-images-idx3-ubyte"))
    labels = read_idx(_find(root, f"{_FILES[split]}-labels-idx1-ubyte")).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{root}: {images.shape[0]} images but {labels.shape[0]} labels for {split}")
    return images, labels


class FashionMnist:
    kind = "fashion-mnist"
    classes = list(CLASSES)

    def __init__(self, root: str | Path | None, split: str = "train"):
        self.root = Path(root) if root else DEFAULT_DIR
        self.split = split
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:
            self._arrays = load_split(self.root, self.split)
        return self._arrays

    def __getstate__(self) -> dict:
        # a worker started by spawn reloads the files rather than receiving 47 MB of pickled arrays
        return {**self.__dict__, "_arrays": None}

    def describe(self) -> dict:
        return {"kind": self.kind, "path": str(self.root), "split": self.split}

    def scan_keys(self) -> Iterator[str]:
        for i in range(self._load()[0].shape[0]):
            yield f"{self.split}-{i:06d}"

    def read(self, first_key: str, count: int) -> Iterator[tuple[str, np.ndarray, int]]:
        images, labels = self._load()
        start = int(first_key.rsplit("-", 1)[1])
        for i in range(start, min(start + count, images.shape[0])):
            yield f"{self.split}-{i:06d}", images[i][..., None], int(labels[i])
