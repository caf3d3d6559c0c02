"""Walks in z space and vector arithmetic on z (the paper's sections 6.1 and 6.3, figures 4 and 7).

Both take latent codes that their caller draws. `dcgan sample interpolate` and `dcgan sample
arithmetic` draw them as `dcgan sample` does (trainer.models.sample_z for a seed), so an index in
the grid that `dcgan sample --n N --seed S` writes names the same z here (give the same N: the
codes are drawn as one N x z_dim tensor).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from common.atomic import atomic_write_bytes
from evaluation.errors import EvalError
from evaluation.images import generate, make_grid

# the paper perturbs the arithmetic's result with uniform noise of this scale (figure 7)
PAPER_NOISE = 0.25


def lerp(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(1 - t) z0 + t z1 for each t: exactly z0 at t = 0 and z1 at t = 1."""
    t = t.view(-1, 1)
    return (1 - t) * z0 + t * z1


def slerp(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation: the path a normal prior's typical set follows (norms stay ~sqrt(dim))."""
    t = t.view(-1, 1)
    cos = torch.dot(z0 / z0.norm(), z1 / z1.norm()).clamp(-1, 1)
    omega = torch.arccos(cos)
    if omega.abs() < 1e-6:  # (anti)parallel codes: the great circle is undefined, the line is not
        return lerp(z0, z1, t)
    out = (torch.sin((1 - t) * omega) * z0 + torch.sin(t * omega) * z1) / torch.sin(omega)
    out[t.view(-1) == 0] = z0
    out[t.view(-1) == 1] = z1
    return out


def walk_latents(z: torch.Tensor, steps: int, spherical: bool = False) -> torch.Tensor:
    """(k, dim) codes -> (k - 1, steps, dim): row i goes from z[i] to z[i + 1], both ends included."""
    if len(z) < 2 or steps < 2:
        raise EvalError(f"a walk needs at least 2 codes and 2 steps, got {len(z)} and {steps}")
    t = torch.linspace(0, 1, steps)
    path = slerp if spherical else lerp
    return torch.stack([path(z[i], z[i + 1], t) for i in range(len(z) - 1)])


def interpolation(generator: torch.nn.Module, z: torch.Tensor, steps: int, spherical: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes (k - 1, steps, dim) of walks between the k codes `z` (k, dim), and their images
    (k - 1, steps, C, R, R) in [-1, 1]."""
    codes = walk_latents(z, steps, spherical)
    images = generate(generator, codes.flatten(0, 1))
    return codes, images.view(*codes.shape[:2], *images.shape[1:])


def save_gif(images: torch.Tensor, path: str | Path, scale: int = 4, frame_ms: int = 80) -> Path:
    """(N, C, H, W) frames in [-1, 1] -> an endlessly looping GIF, each frame enlarged `scale` times."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = []
    for image in images:
        tile = Image.fromarray(make_grid(image[None], nrow=1, padding=0))
        frames.append(tile.resize((tile.width * scale, tile.height * scale), Image.Resampling.NEAREST))
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
    atomic_write_bytes(path, buf.getvalue())
    return path


def walk_frames(images: torch.Tensor) -> torch.Tensor:
    """(rows, steps, ...) walk images -> one continuous path: each row's first frame (the previous
    row's last) is dropped."""
    return torch.cat([images[0], *(row[1:] for row in images[1:])])


@dataclass
class Arithmetic:
    """z_a, z_b, z_c exemplars, their means, the result mean(z_a) - mean(z_b) + mean(z_c), and
    the result's noisy neighbours."""

    exemplars: list[torch.Tensor]
    means: torch.Tensor  # (3, dim)
    result: torch.Tensor  # (dim,)
    neighbours: torch.Tensor  # (n, dim)


def parse_indices(text: str, n: int, name: str) -> list[int]:
    """'3,7,12' -> [3, 7, 12], each a valid index into a grid of n samples."""
    try:
        indices = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise EvalError(f"--{name} must be comma-separated sample indices such as 3,7,12, got {text!r}") from None
    if not indices:
        raise EvalError(f"--{name} names no sample index")
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise EvalError(f"--{name}: index {bad[0]} is outside the grid of {n} samples (0..{n - 1}); "
                         f"make the grid with the same --n")
    return indices


def vector_arithmetic(z: torch.Tensor, a: Sequence[int], b: Sequence[int], c: Sequence[int], neighbours: int = 8,
                      noise: float = PAPER_NOISE, seed: int = 0) -> Arithmetic:
    """Arithmetic on the codes of grid positions `a`, `b`, `c` of a sample grid's codes `z` (n, dim);
    `seed` seeds the neighbours' noise."""
    exemplars = [z[list(group)] for group in (a, b, c)]
    means = torch.stack([group.mean(0) for group in exemplars])
    result = means[0] - means[1] + means[2]
    jitter = torch.rand(neighbours, z.shape[1], generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return Arithmetic(exemplars, means, result, result + noise * jitter)


def arithmetic_grid(generator: torch.nn.Module, arith: Arithmetic) -> tuple[torch.Tensor, int]:
    """Images for a grid and its row length: one row per exemplar group (exemplars, blank tiles to
    align, then the mean's image), and a last row: the result, then its neighbours."""
    width = max(len(group) for group in arith.exemplars) + 1
    dim = arith.result.numel()
    codes, blank = [], []
    for group, mean in zip(arith.exemplars, arith.means, strict=True):
        pad = width - 1 - len(group)
        blank += [False] * len(group) + [True] * pad + [False]
        codes += [*group, *torch.zeros(pad, dim), mean]
    last = [arith.result, *arith.neighbours[:width - 1]]
    blank += [False] * len(last) + [True] * (width - len(last))
    codes += [*last, *torch.zeros(width - len(last), dim)]
    images = generate(generator, torch.stack(codes))
    images[torch.tensor(blank)] = -1.0
    return images, width
