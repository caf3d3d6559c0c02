"""Near-duplicate removal as the paper did it on LSUN: semantic hashing with an autoencoder.

A 3072-128-3072 ReLU autoencoder (32x32x3 centre crops in, the same out), trained as a
denoising autoencoder (Gaussian input noise) with dropout on its code layer. Its 128 code
activations, thresholded at each unit's median over the training sample, form a 128-bit hash
of the image. Images are bucketed by bands of the hash (any of `bands` equal 128/bands-bit
slices makes two images candidates, which keeps near-duplicates whose hash differs in a few
bits together) and a candidate pair counts as a duplicate when its full hashes differ in at
most `max_hamming` bits. Bucketing keeps the pass linear in the number of images. Of each
group of duplicates, the first key in source order is kept; the others are listed, with the
key they duplicate, for `dcgan data convert --skip-keys`.

Exact duplicates (equal decoded pixels) are removed by conversion itself, always. Items that do
not decode are left out of the search and listed with their reason (`skipped` in the list).
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.atomic import atomic_write_bytes
from data_shards.convert import ConversionError
from data_shards.sources import Source
from data_shards.transform import UndecodableImage, center_crop_resize, decode_image

CROP = 32


class HashingAutoencoder(nn.Module):
    def __init__(self, code_bits: int = 128, dropout: float = 0.2):
        super().__init__()
        self.register_buffer("mean", torch.zeros(CROP * CROP * 3))
        self.register_buffer("std", torch.ones(()))
        self.encoder = nn.Sequential(nn.Linear(CROP * CROP * 3, code_bits), nn.ReLU())
        self.dropout = nn.Dropout(dropout)
        self.decoder = nn.Linear(code_bits, CROP * CROP * 3)

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        # centred inputs keep the ReLU code units alive; raw [0, 1] pixels leave most of them dead
        return (x - self.mean) / self.std

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.standardise(x))

    def forward(self, noisy_standardised: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.dropout(self.encoder(noisy_standardised)))


@dataclass
class DedupOptions:
    train_samples: int = 50_000
    train_steps: int = 3000  # Adam steps of 256 crops, whatever the sample size
    noise: float = 0.3
    bands: int = 8
    max_hamming: int = 16
    max_cosine: float = 0.04
    workers: int = 0
    seed: int = 0


def crop_vector(value: bytes | np.ndarray) -> np.ndarray:
    """An item -> its 32x32x3 centre crop as 3072 floats in [0, 1]."""
    pixels = value if isinstance(value, np.ndarray) else decode_image(value, 3, CROP)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    return center_crop_resize(pixels, CROP).reshape(-1).astype(np.float32) / 255.0


def _read_all(source: Source, first_key: str, count: int, skipped: dict[str, str]) -> Iterator[tuple[str, np.ndarray]]:
    """(key, crop) of each item that decodes; the others land in `skipped` as key -> reason."""
    for key, value, _ in source.read(first_key, count):
        try:
            crop = crop_vector(value)
        except UndecodableImage as e:
            skipped[key] = str(e)
            continue
        yield key, crop


def _ranges(source: Source, size: int) -> list[tuple[str, int]]:
    ranges: list[tuple[str, int]] = []
    for i, key in enumerate(source.scan_keys()):
        if i % size == 0:
            ranges.append((key, 0))
        ranges[-1] = (ranges[-1][0], ranges[-1][1] + 1)
    return ranges


def train_autoencoder(crops: np.ndarray, opts: DedupOptions) -> tuple[HashingAutoencoder, np.ndarray]:
    """Fit the autoencoder on `crops` (N x 3072); returns it and each code unit's threshold."""
    torch.manual_seed(opts.seed)
    model = HashingAutoencoder()
    data = torch.from_numpy(crops)
    model.mean.copy_(data.mean(0))
    model.std.copy_((data - model.mean).std())
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(opts.seed)
    standardised = model.standardise(data)
    for _ in range(opts.train_steps):
        batch = standardised[torch.randint(len(data), (256,), generator=generator)]
        noisy = batch + opts.noise * torch.randn(batch.shape, generator=generator)
        loss = nn.functional.mse_loss(model(noisy), batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        codes = model.encode(data)
    return model, codes.median(dim=0).values.numpy()


def hash_codes(model: HashingAutoencoder, thresholds: np.ndarray, crops: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """N x 3072 crops -> (N x 16 uint8: the 128-bit hashes, N x 128 float16: unit-length codes)."""
    with torch.no_grad():
        codes = model.encode(torch.from_numpy(crops)).numpy()
    unit = codes / np.maximum(np.linalg.norm(codes, axis=1, keepdims=True), 1e-6)
    return np.packbits(codes > thresholds, axis=1), unit.astype(np.float16)


_WORKER: dict = {}


def _init(source: Source, model_state: dict, thresholds: np.ndarray) -> None:
    torch.set_num_threads(1)
    model = HashingAutoencoder()
    model.load_state_dict(model_state)
    model.eval()
    _WORKER.update(source=source, model=model, thresholds=thresholds)


def _hash_range(job: tuple[str, int]) -> tuple[list[str], np.ndarray, np.ndarray, dict[str, str]]:
    keys, crops, skipped = [], [], {}
    for key, crop in _read_all(_WORKER["source"], *job, skipped):
        keys.append(key)
        crops.append(crop)
    if not crops:
        return keys, np.zeros((0, 16), np.uint8), np.zeros((0, 128), np.float16), skipped
    return (keys, *hash_codes(_WORKER["model"], _WORKER["thresholds"], np.stack(crops)), skipped)


def group_duplicates(keys: list[str], hashes: np.ndarray, codes: np.ndarray, opts: DedupOptions,
                     max_bucket: int = 20_000) -> dict[str, str]:
    """duplicate key -> the key it duplicates (the first of its group in `keys` order).

    Two hashes that differ in d bits share at least one band whenever d < bands, and often for
    larger d; within a bucket all pairs are compared: a pair is a duplicate when its hashes
    differ in at most `max_hamming` bits and its real-valued codes are within `max_cosine`
    cosine distance (the binarised code alone lets too many distinct images through). A bucket
    of more than `max_bucket` hashes (a degenerate band, e.g. blank images) is not searched."""
    bands, max_hamming = opts.bands, opts.max_hamming
    parent = np.arange(len(keys))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    bits = np.unpackbits(hashes, axis=1)
    width = bits.shape[1] // bands
    for band in range(bands):
        band_keys = np.packbits(bits[:, band * width:(band + 1) * width], axis=1)
        band_ids = band_keys.view(np.dtype((np.void, band_keys.shape[1]))).ravel()
        order = np.argsort(band_ids, kind="stable")
        boundaries = np.flatnonzero(band_ids[order][1:] != band_ids[order][:-1]) + 1
        for members in np.split(order, boundaries):
            if len(members) < 2 or len(members) > max_bucket:
                continue
            hamming = np.count_nonzero(bits[members][:, None, :] != bits[members][None, :, :], axis=2)
            unit = codes[members].astype(np.float32)
            close = (hamming <= max_hamming) & (1 - unit @ unit.T <= opts.max_cosine)
            for a, b in zip(*np.nonzero(np.triu(close, k=1)), strict=True):
                ra, rb = find(members[a]), find(members[b])
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
    return {keys[i]: keys[find(i)] for i in range(len(keys)) if find(i) != i}


class NearDuplicates(dict[str, str]):
    """duplicate key -> the key it duplicates, and `skipped`: key -> reason for each item that did
    not decode (left out of the search; conversion skips it again with the same reason)."""

    def __init__(self, duplicates: dict[str, str], skipped: dict[str, str]):
        super().__init__(duplicates)
        self.skipped = skipped


def find_near_duplicates(source: Source, opts: DedupOptions, progress: bool = False) -> NearDuplicates:
    ranges = _ranges(source, 2000)
    total = sum(c for _, c in ranges)
    # the training sample: evenly spaced slices of the key space, decoded in the main process
    take = min(opts.train_samples, total)
    per_range = max(1, take // len(ranges))
    sample_skipped: dict[str, str] = {}  # the workers read these keys again and report them
    sample = [c for first, count in ranges for _, c in _read_all(source, first, min(per_range, count), sample_skipped)]
    if not sample:
        raise ConversionError(f"none of the {len(sample_skipped)} items sampled from {source.describe()} decode; "
                              f"first reason: {next(iter(sample_skipped.values()), 'none')}")
    model, thresholds = train_autoencoder(np.stack(sample), opts)
    workers = max(1, min(opts.workers or os.cpu_count() or 1, len(ranges)))
    with multiprocessing.get_context("fork").Pool(workers, _init, (source, model.state_dict(), thresholds)) as pool:
        parts = pool.map(_hash_range, ranges)  # map keeps source order, which decides who is kept
    keys = [k for part_keys, _, _, _ in parts for k in part_keys]
    hashes = np.concatenate([h for _, h, _, _ in parts])
    codes = np.concatenate([c for _, _, c, _ in parts])
    skipped = {k: reason for *_, part_skipped in parts for k, reason in part_skipped.items()}
    return NearDuplicates(group_duplicates(keys, hashes, codes, opts), skipped)


def write_duplicate_list(path: str | Path, duplicates: NearDuplicates, source: Source, opts: DedupOptions) -> None:
    data = {"source": source.describe(), "options": vars(opts),
            "duplicates": [{"key": k, "of": v, "method": "semantic-hash"} for k, v in duplicates.items()],
            "skipped": [{"key": k, "reason": reason} for k, reason in duplicates.skipped.items()]}
    atomic_write_bytes(Path(path), json.dumps(data, indent=1).encode())


def recall_and_false_positive_rate(found: dict[str, str], planted: dict[str, str], all_keys: list[str]
                                   ) -> tuple[float, float]:
    """Recall: planted copies flagged (as duplicates of their original, or with it in one group).
    False-positive rate: of the images with no planted twin, the share flagged as a duplicate."""
    def group(k: str) -> str:
        return found.get(k, k)

    hits = sum(1 for copy, original in planted.items() if group(copy) == group(original))
    involved = set(planted) | set(planted.values())
    clean = [k for k in all_keys if k not in involved]
    false = sum(1 for k in clean if k in found)
    return hits / max(len(planted), 1), false / max(len(clean), 1)
