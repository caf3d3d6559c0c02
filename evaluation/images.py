"""Samples and image grids from a generator (PNG via Pillow, so no torchvision is needed)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.atomic import atomic_write_bytes


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 pixels, rounded as a saved PNG stores them."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> one uint8 H x W (x 3) image of tiles."""
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    pixels = to_uint8(images).cpu().numpy()
    grid = np.zeros((c, ncol * (h + padding) + padding, nrow * (w + padding) + padding), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top:top + h, left:left + w] = pixels[i]
    return grid[0] if c == 1 else grid.transpose(1, 2, 0)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(make_grid(images, nrow)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return path


@torch.no_grad()
def generate(generator: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Samples in eval mode: BatchNorm uses its (rank-averaged) running statistics, so a
    sample depends on z alone, not on what else is in the batch."""
    was_training = generator.training
    generator.eval()
    try:
        return generator(z).float()
    finally:
        generator.train(was_training)
