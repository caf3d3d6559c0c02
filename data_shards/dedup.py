"""Near-duplicate removal as the paper did it on LSUN: semantic hashing with an autoencoder.

A 3072-128-3072 ReLU autoencoder (32x32x3 centre crops in, the same out), trained as a
denoising autoencoder (Gaussian input noise) with dropout on its code layer. Its 128 code
activations, thresholded at each unit's median over the training sample, form a 128-bit hash
of the image. Images are bucketed by bands of the hash: `bands` bands of 16 bits, eight
disjoint ones per table of a fixed shuffle of the 128 bits, and sharing any band makes two
images candidates, which keeps near-duplicates whose hash differs in a few bits together. A
candidate pair counts as a duplicate when its full hashes differ in at most `max_hamming` bits
and its real-valued codes are within `max_cosine` cosine distance. Bucketing keeps the pass
linear in the number of images, and each bucket is searched in fixed-size blocks, so memory
does not grow with a bucket's size. Of each group of duplicates, the first key in source order
is kept; the others are listed, with the key they duplicate, for `dcgan data convert --skip-keys`.

Exact duplicates (equal decoded pixels) are removed by conversion itself, always. Items that do
not decode are left out of the search and listed with their reason (`skipped` in the list).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from common.atomic import atomic_write_bytes
from data_shards.convert import ConversionError
from data_shards.parts import LocalParts, PartRunner
from data_shards.sources import Source, paths_of
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
    # two tables of eight 16-bit bands: on the sample photographs, recall of planted near-duplicates rose from
    # 0.91 to 0.94 (0.80 to 0.84 on held-out ones) over one table, false positives unchanged. Looser thresholds find
    # more and flag more unrelated images (benchmarks/dedup_quality.py prints the trade)
    bands: int = 16
    max_hamming: int = 16
    max_cosine: float = 0.04
    workers: int = 0
    seed: int = 0
    part_size: int = 2000  # keys hashed per part: a few seconds of one core, cheap to retry


def crop_pixels(value: bytes | np.ndarray) -> np.ndarray:
    """An item -> its 32x32x3 centre crop as 3072 uint8 pixels (a quarter of the floats' bytes: the
    training sample of 50,000 is 150 MB)."""
    pixels = value if isinstance(value, np.ndarray) else decode_image(value, 3, CROP)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    return center_crop_resize(pixels, CROP).reshape(-1)


def _as_unit_floats(crops: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(crops).float().div_(255.0)


def _read_all(source: Source, first_key: str, count: int, skipped: dict[str, str]) -> Iterator[tuple[str, np.ndarray]]:
    """(key, crop) of each item that decodes; the others land in `skipped` as key -> reason."""
    for key, value, _ in source.read(first_key, count):
        try:
            crop = crop_pixels(value)
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


def train_autoencoder(crops: np.ndarray, opts: DedupOptions, chunk: int = 4096
                      ) -> tuple[HashingAutoencoder, np.ndarray]:
    """Fit the autoencoder on `crops` (N x 3072 uint8 pixels); returns it and each code unit's threshold.
    One float copy of the sample is held (the standardised one): the statistics are taken chunk by chunk."""
    torch.manual_seed(opts.seed)
    model = HashingAutoencoder()
    chunks = [slice(i, i + chunk) for i in range(0, len(crops), chunk)]
    # one float copy, standardised in place; the sums are taken chunk by chunk, in float64
    standardised = torch.empty(crops.shape, dtype=torch.float32)
    for c in chunks:
        standardised[c] = _as_unit_floats(crops[c])
    model.mean.copy_(sum(standardised[c].double().sum(0) for c in chunks) / len(crops))
    standardised -= model.mean
    squares = sum((standardised[c].double() ** 2).sum() for c in chunks)
    model.std.copy_((squares / max(standardised.numel() - 1, 1)).sqrt())
    standardised /= model.std
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(opts.seed)
    for _ in range(opts.train_steps):
        batch = standardised[torch.randint(len(crops), (256,), generator=generator)]
        noisy = batch + opts.noise * torch.randn(batch.shape, generator=generator)
        loss = nn.functional.mse_loss(model(noisy), batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        codes = torch.cat([model.encoder(standardised[c]) for c in chunks])
    return model, codes.median(dim=0).values.numpy()


def hash_codes(model: HashingAutoencoder, thresholds: np.ndarray, crops: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """N x 3072 uint8 crops -> (N x 16 uint8: the 128-bit hashes, N x 128 float16: unit-length codes)."""
    with torch.no_grad():
        codes = model.encode(_as_unit_floats(crops)).numpy()
    unit = codes / np.maximum(np.linalg.norm(codes, axis=1, keepdims=True), 1e-6)
    return np.packbits(codes > thresholds, axis=1), unit.astype(np.float16)


def _hash_range(context: tuple[Source, dict, np.ndarray], job: tuple[str, int]
                ) -> tuple[list[str], np.ndarray, np.ndarray, dict[str, str]]:
    """One part of the hashing pass, in a worker process or a Ray task: (keys, hashes, codes, skipped)."""
    source, model_state, thresholds = context
    torch.set_num_threads(1)  # one core per part
    model = HashingAutoencoder()
    model.load_state_dict(model_state)
    model.eval()
    keys, crops, skipped = [], [], {}
    for key, crop in _read_all(source, *job, skipped):
        keys.append(key)
        crops.append(crop)
    if not crops:
        return keys, np.zeros((0, 16), np.uint8), np.zeros((0, 128), np.float16), skipped
    return (keys, *hash_codes(model, thresholds, np.stack(crops)), skipped)


# Popcount of every byte value: Hamming distances straight from the packed hashes (16 bytes an image)
_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1).astype(np.uint8)
BLOCK = 1024  # rows x columns compared at once: ~20 MB of temporaries, whatever the bucket size
EXACT_LIMIT = 20_000  # members a bucket may have for all its pairs to be compared (~2e8 pairs)
WINDOW = 256  # a larger bucket: each member against the next WINDOW in the order of its full hash


@dataclass
class SearchStats:
    """What the pair search did: the largest bucket, and the buckets searched by sorted neighbours."""

    largest_bucket: int = 0
    windowed_buckets: int = 0
    windowed_members: int = 0
    pairs_compared: int = 0  # in buckets over SMALL members; the small ones cost one pass per offset
    pairs_found: int = 0
    joined_buckets_skipped: int = 0  # buckets over SMALL members all of one group already: nothing to search


BAND_BITS = 16  # 65,536 buckets a band: ~N^2 / 65,536 pairs to compare, 1.5e7 at a million images


def _band_bits(band: int, code_bits: int = 128) -> np.ndarray:
    """The hash bits of band `band`: table `band // 8` is a fixed shuffle of the bits (the first one none),
    cut into eight disjoint bands. One table alone misses a pair whose differing bits hit all eight of its
    bands (1 in 10 planted near-duplicates); a second, differently cut, catches most of those."""
    per_table = code_bits // BAND_BITS
    table, slot = divmod(band, per_table)
    order = np.arange(code_bits) if table == 0 else np.random.default_rng(table).permutation(code_bits)
    return order[slot * BAND_BITS:(slot + 1) * BAND_BITS]


def _band_ids(hashes: np.ndarray, band: int) -> np.ndarray:
    bits = np.unpackbits(hashes, axis=1)[:, _band_bits(band, hashes.shape[1] * 8)]
    return np.ascontiguousarray(np.packbits(bits, axis=1, bitorder="little")).view(np.uint16).ravel()


SMALL = 64  # buckets up to this size are searched together, by offset in the sorted order
CHUNK = 1 << 16  # pairs compared at once in that search


def _close_pairs(a: np.ndarray, b: np.ndarray, hashes: np.ndarray, codes: np.ndarray, opts: DedupOptions
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The pairs (a[i], b[i]) within max_hamming bits and max_cosine cosine distance."""
    keep = np.zeros(len(a), dtype=bool)
    for i in range(0, len(a), CHUNK):
        x, y = a[i:i + CHUNK], b[i:i + CHUNK]
        close = _POPCOUNT[hashes[x] ^ hashes[y]].sum(axis=1, dtype=np.uint16) <= opts.max_hamming
        dot = np.einsum("ij,ij->i", codes[x].astype(np.float32), codes[y].astype(np.float32))
        keep[i:i + CHUNK] = close & (1 - dot <= opts.max_cosine)
    return a[keep], b[keep]


def _small_bucket_pairs(order: np.ndarray, sorted_ids: np.ndarray, sizes: np.ndarray, hashes: np.ndarray,
                        codes: np.ndarray, opts: DedupOptions) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every pair inside the buckets of at most SMALL members, all buckets at once: the members of a
    bucket are neighbours in the sorted order, so its pairs are the positions d = 1, 2, ... apart
    that still share the bucket (a Python loop per bucket would cost more than the comparisons)."""
    small = np.repeat(sizes <= SMALL, sizes)
    for d in range(1, SMALL):
        k = np.flatnonzero((sorted_ids[d:] == sorted_ids[:-d]) & small[:-d])
        if not len(k):
            return
        yield _close_pairs(order[k], order[k + d], hashes, codes, opts)


def _close(rows: np.ndarray, cols: np.ndarray, hashes: np.ndarray, codes: np.ndarray, opts: DedupOptions
           ) -> np.ndarray:
    """rows x cols: within max_hamming bits and max_cosine cosine distance."""
    hamming = _POPCOUNT[hashes[rows][:, None, :] ^ hashes[cols][None, :, :]].sum(axis=2, dtype=np.uint16)
    close = hamming <= opts.max_hamming
    close &= 1 - codes[rows].astype(np.float32) @ codes[cols].astype(np.float32).T <= opts.max_cosine
    return close


def _bucket_pairs(members: np.ndarray, hashes: np.ndarray, codes: np.ndarray, opts: DedupOptions,
                  stats: SearchStats) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Close pairs within one bucket, in blocks of BLOCK x BLOCK, so memory stays flat for any size.

    Up to EXACT_LIMIT members every pair is compared. A larger bucket (a degenerate band: blank or
    near-constant images, whose learned bits agree) would cost its size squared; its members are
    sorted by their full hash, whose leading bits they then share with their neighbours, and each
    is compared with the next WINDOW: a near-duplicate differs from its original in a few bits and
    lands next to it or within the window. Such buckets are counted and reported, never skipped."""
    m = len(members)
    if m <= EXACT_LIMIT:
        for i in range(0, m, BLOCK):
            for j in range(i, m, BLOCK):
                rows, cols = members[i:i + BLOCK], members[j:j + BLOCK]
                stats.pairs_compared += len(rows) * len(cols)
                close = _close(rows, cols, hashes, codes, opts)
                a, b = np.nonzero(np.triu(close, k=1) if i == j else close)
                yield rows[a], cols[b]
        return
    stats.windowed_buckets += 1
    stats.windowed_members += m
    ordered = members[np.lexsort(hashes[members].T[::-1])]
    for i in range(0, m, BLOCK):
        rows, cols = ordered[i:i + BLOCK], ordered[i:i + BLOCK + WINDOW]
        stats.pairs_compared += len(rows) * len(cols)
        ahead = np.arange(len(cols))[None, :] - np.arange(len(rows))[:, None]  # cols start with rows
        a, b = np.nonzero(_close(rows, cols, hashes, codes, opts) & (ahead > 0) & (ahead <= WINDOW))
        yield rows[a], cols[b]


def group_duplicates(keys: list[str], hashes: np.ndarray, codes: np.ndarray, opts: DedupOptions,
                     stats: SearchStats | None = None) -> dict[str, str]:
    """duplicate key -> the key it duplicates (the first of its group in `keys` order).

    Two hashes that differ in d bits share at least one band of the first table whenever d < 8, and
    one of some table often for larger d; a pair in a band bucket is a duplicate when its hashes differ in at most
    `max_hamming` bits and its real-valued codes are within `max_cosine` cosine distance (the
    binarised code alone lets too many distinct images through). Buckets are searched in blocks
    (`_bucket_pairs`); `stats` receives what the search did."""
    stats = stats if stats is not None else SearchStats()
    parent = np.arange(len(keys))
    for band in range(opts.bands):
        band_ids = _band_ids(hashes, band)
        order = np.argsort(band_ids, kind="stable")
        sorted_ids = band_ids[order]
        boundaries = np.flatnonzero(sorted_ids[1:] != sorted_ids[:-1]) + 1
        sizes = np.diff(np.concatenate([[0], boundaries, [len(order)]]))
        stats.largest_bucket = max(stats.largest_bucket, int(sizes.max(initial=0)))
        large = [members for members in np.split(order, boundaries) if len(members) > SMALL]
        # lazily: whether a bucket is already one group is asked when its turn comes, after the unions before it
        searches = itertools.chain(_small_bucket_pairs(order, sorted_ids, sizes, hashes, codes, opts),
                                   itertools.chain.from_iterable(
                                       _bucket_pairs(members, hashes, codes, opts, stats) for members in large
                                       if not _one_group(parent, members, stats)))
        for a, b in searches:
            stats.pairs_found += len(a)
            _union(parent, a, b)
    roots = _roots(parent, np.arange(len(keys)))
    return {keys[i]: keys[root] for i, root in enumerate(roots.tolist()) if root != i}


def _one_group(parent: np.ndarray, members: np.ndarray, stats: SearchStats) -> bool:
    """Whether a bucket's members were all joined already (in an earlier band): then no pair of it can change
    the groups. A degenerate bucket (blank frames) comes back in every band; searched once, not 16 times."""
    roots = _roots(parent, members)
    joined = bool((roots == roots[0]).all())
    stats.joined_buckets_skipped += joined
    return joined


def _roots(parent: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The root of each of `x` (pointer jumping), with the path compressed on the way."""
    start = x
    while True:
        up = parent[x]
        if np.array_equal(up, x):
            parent[start] = x
            return x
        x = up


def _union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Join the groups of each pair (a[i], b[i]), all pairs at once; a group's root is its smallest
    index, the key that comes first and is kept. Vectorised: a dense bucket (blank frames) gives
    millions of pairs, which a Python loop would take minutes over."""
    while len(a):
        ra, rb = _roots(parent, a), _roots(parent, b)
        apart = ra != rb
        lo, hi = np.minimum(ra, rb)[apart], np.maximum(ra, rb)[apart]
        np.minimum.at(parent, hi, lo)
        a, b = lo, hi  # two pairs may have pointed one root at two others: check until all are joined


class NearDuplicates(dict[str, str]):
    """duplicate key -> the key it duplicates, and `skipped`: key -> reason for each item that did
    not decode (left out of the search; conversion skips it again with the same reason)."""

    def __init__(self, duplicates: dict[str, str], skipped: dict[str, str], search: SearchStats | None = None,
                 seconds: dict[str, float] | None = None):
        super().__init__(duplicates)
        self.skipped = skipped
        self.search = search or SearchStats()
        self.seconds = seconds or {}  # wall time of each stage: where a larger set will spend its time


@dataclass
class HashedSource:
    """Every item of a source that decodes, in source order: keys, 128-bit hashes, unit-length codes."""

    keys: list[str]
    hashes: np.ndarray  # N x 16 uint8
    codes: np.ndarray  # N x 128 float16
    skipped: dict[str, str]  # key -> why it did not decode
    seconds: dict[str, float] = field(default_factory=dict)  # "train" (sample decode included), "hash"


def hash_source(source: Source, opts: DedupOptions, progress: bool = False,
                runner: PartRunner | None = None) -> HashedSource:
    """The autoencoder trained here on a sample of `source`, then every item hashed in parts by `runner` (this
    machine's cores by default, or a Ray cluster)."""
    runner = runner or LocalParts(opts.workers)
    runner.check_paths(paths_of(source))
    started = time.perf_counter()
    ranges = _ranges(source, opts.part_size)
    if not ranges:  # an empty folder or LMDB: nothing to train the autoencoder on, nothing to hash
        described = source.describe()
        raise ConversionError(f"the {described.get('kind', '')} source {described.get('path', '')} holds no items")
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
    del sample
    trained = time.perf_counter()
    parts: list = [None] * len(ranges)
    with tqdm(total=total, unit="img", desc="hashing", disable=not progress) as bar:
        for index, part in runner.run(_hash_range, (source, model.state_dict(), thresholds), ranges):
            parts[index] = part  # source order decides who is kept, whatever order the parts finish in
            bar.update(ranges[index][1])
    return HashedSource(keys=[k for part_keys, _, _, _ in parts for k in part_keys],
                        hashes=np.concatenate([h for _, h, _, _ in parts]),
                        codes=np.concatenate([c for _, _, c, _ in parts]),
                        skipped={k: reason for *_, part_skipped in parts for k, reason in part_skipped.items()},
                        seconds={"train": trained - started, "hash": time.perf_counter() - trained})


def find_near_duplicates(source: Source, opts: DedupOptions, progress: bool = False,
                         runner: PartRunner | None = None) -> NearDuplicates:
    """The near-duplicates of `source`: `hash_source`, then the pair search here."""
    hashed = hash_source(source, opts, progress, runner)
    stats = SearchStats()
    started = time.perf_counter()
    found = group_duplicates(hashed.keys, hashed.hashes, hashed.codes, opts, stats)
    return NearDuplicates(found, hashed.skipped, stats, {**hashed.seconds, "search": time.perf_counter() - started})


def write_duplicate_list(path: str | Path, duplicates: NearDuplicates, source: Source, opts: DedupOptions) -> None:
    data = {"source": source.describe(), "options": vars(opts), "search": asdict(duplicates.search),
            "seconds": {stage: round(s, 1) for stage, s in duplicates.seconds.items()},
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
