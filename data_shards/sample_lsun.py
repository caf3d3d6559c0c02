"""An LSUN-format LMDB built from the CC0 photographs scikit-image ships.

LSUN itself cannot be downloaded everywhere; this makes a stand-in with the same layout (one
LMDB, key = image id, value = encoded WebP or JPEG, shorter side 256 px) for trying the
pipeline, for the tests and for the benchmarks. Images are random crops (position, scale,
flip, brightness) of the photographs, so they differ from one another. Optionally it plants
near-duplicates (resized, re-encoded, slightly cropped copies), exact duplicates and corrupt
values, and returns where it put them.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "retina", "hubble_deep_field", "immunohistochemistry")
# never used to tune the dedup thresholds: recall and false positives are measured on these as well (grey ones
# become three equal channels; the logo loses its alpha)
HELD_OUT = ("stereo_motorcycle", "colorwheel", "logo", "camera", "moon", "coins", "clock", "brick", "grass", "gravel",
            "cell")
PHOTO_SETS = {"tuned": PHOTOS, "held-out": HELD_OUT}


@dataclass
class Planted:
    near_duplicates: dict[str, str] = field(default_factory=dict)  # copy key -> original key
    exact_duplicates: dict[str, str] = field(default_factory=dict)
    corrupt: list[str] = field(default_factory=list)


def _photos(names: tuple[str, ...]) -> list[np.ndarray]:
    import skimage.data

    photos = []
    for name in names:
        photo = getattr(skimage.data, name)()
        photo = photo[0] if isinstance(photo, tuple) else photo  # the stereo pair's left view
        photo = np.repeat(photo[..., None], 3, axis=2) if photo.ndim == 2 else photo[..., :3]
        photos.append(np.ascontiguousarray(photo))
    return photos


def _random_view(photo: np.ndarray, rng: np.random.Generator, short_side: int) -> Image.Image:
    """A crop of a photo with a few random shapes over it: seven photos alone give too few
    distinct-looking 32x32 thumbnails for duplicate detection to be measured against."""
    from PIL import ImageDraw

    image = _crop_view(photo, rng, short_side)
    draw = ImageDraw.Draw(image, "RGBA")
    w, h = image.size
    for _ in range(int(rng.integers(3, 7))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(w // 8, w // 2)), y0 + int(rng.integers(h // 8, h // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3)) + (int(rng.integers(120, 230)),)
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    return image


def _crop_view(photo: np.ndarray, rng: np.random.Generator, short_side: int) -> Image.Image:
    # quarter turns, flips and channel orders multiply the looks of each photo
    photo, channels = np.rot90(photo, int(rng.integers(4))), rng.permutation(3)  # a view: nothing copied yet
    h, w = photo.shape[:2]
    crop_h = int(min(h, w) * rng.uniform(0.2, 0.5))
    crop_w = min(w, int(crop_h * rng.uniform(1.0, 1.5)))
    top, left = rng.integers(0, h - crop_h + 1), rng.integers(0, w - crop_w + 1)
    # channels reordered on the crop alone: on the whole photo that copy took most of an image's time
    view = photo[top:top + crop_h, left:left + crop_w][..., channels].astype(np.float32) * rng.uniform(0.7, 1.2)
    image = Image.fromarray(view.clip(0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    scale = short_side / min(image.size)
    return image.resize((round(image.size[0] * scale), round(image.size[1] * scale)), Image.Resampling.BICUBIC)


def _near_copy(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Slightly cropped (2-5 %), down- and re-upscaled: what re-posting does to a picture."""
    w, h = image.size
    dx, dy = int(w * rng.uniform(0.02, 0.05)), int(h * rng.uniform(0.02, 0.05))
    copy = image.crop((dx, dy, w - dx, h - dy))
    small = copy.resize((int(copy.size[0] * rng.uniform(0.5, 0.8)), int(copy.size[1] * rng.uniform(0.5, 0.8))))
    return small.resize(image.size, Image.Resampling.BILINEAR)


def _encode(image: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, quality=quality)
    return buf.getvalue()


CORRUPT_KINDS = ("zero-byte value", "bytes that are no image", "value cut to a third", "JPEG cut mid-stream")


def _corrupt_value(i: int, good: bytes) -> bytes:
    """The i-th planted corrupt value, of kind CORRUPT_KINDS[i % 4]."""
    kind = i % len(CORRUPT_KINDS)
    if kind == 0:
        return b""
    if kind == 1:
        return b"this is not an image"
    if kind == 2:
        return good[: len(good) // 3]
    # what crawled data holds: Pillow opens it (the header is whole) and fails only when decoding
    jpeg = _encode(Image.open(io.BytesIO(good)).convert("RGB"), "JPEG", 90) if good else b""
    return jpeg[: len(jpeg) // 2]


def _key(i: int) -> str:
    # LSUN keys are 40-hex-digit ids, so LMDB order is unrelated to insertion order
    return hashlib.sha1(f"dcgan-scale-sample-{i}".encode()).hexdigest()


_PHOTO_CACHE: dict[str, list[np.ndarray]] = {}


def _original(job: tuple[int, int, str, int, str]) -> bytes:
    seed, index, image_format, short_side, photo_set = job
    if photo_set not in _PHOTO_CACHE:
        _PHOTO_CACHE[photo_set] = _photos(PHOTO_SETS[photo_set])
    photos = _PHOTO_CACHE[photo_set]
    rng = np.random.default_rng([seed, index])  # image i is the same however the work is split
    image = _random_view(photos[rng.integers(len(photos))], rng, short_side)
    return _encode(image, image_format, int(rng.integers(75, 95)))


def planted_near_duplicates(n: int, near_duplicates: int) -> dict[str, str]:
    """copy key -> original key of the near-duplicates `build_sample_lsun(out, n, near_duplicates=...)` plants
    (the same whatever the seed: keys follow the item's place)."""
    return {_key(n + j): _key(j) for j in range(near_duplicates)}


def build_sample_lsun(out: str | Path, n: int, *, seed: int = 0, image_format: str = "WEBP", short_side: int = 256,
                      near_duplicates: int = 0, exact_duplicates: int = 0, corrupt: int = 0,
                      workers: int = 1, photos: str = "tuned") -> Planted:
    """Write `n` distinct images plus the planted extras into the LMDB folder `out`, cut from the photographs
    of `photos` ("tuned": those the dedup thresholds were chosen on, or "held-out")."""
    if photos not in PHOTO_SETS:
        raise ValueError(f"unknown photo set {photos!r}; sets: {', '.join(PHOTO_SETS)}")
    if min(n, seed, near_duplicates, exact_duplicates, corrupt) < 0 or near_duplicates + exact_duplicates > n:
        raise ValueError(f"need n, seed and the planted counts >= 0 and at most n duplicates, got n={n}, seed={seed}, "
                         f"near_duplicates={near_duplicates}, exact_duplicates={exact_duplicates}, corrupt={corrupt}")
    import multiprocessing

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, n])
    planted = Planted()
    env = lmdb.open(str(out), map_size=1 << 40, subdir=True)
    originals: list[str] = []
    jobs = [(seed, i, image_format, short_side, photos) for i in range(n)]
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        values = pool.imap(_original, jobs, chunksize=64) if pool else map(_original, jobs)
        with env.begin(write=True) as txn:
            for i, value in enumerate(values):
                txn.put(_key(i).encode(), value)
                if i < near_duplicates + exact_duplicates:
                    originals.append(_key(i))
            count = n
            for original in originals[:near_duplicates]:
                image = Image.open(io.BytesIO(txn.get(original.encode()))).convert("RGB")
                txn.put(_key(count).encode(), _encode(_near_copy(image, rng), "JPEG", int(rng.integers(60, 90))))
                planted.near_duplicates[_key(count)] = original
                count += 1
            for original in originals[near_duplicates:]:
                txn.put(_key(count).encode(), txn.get(original.encode()))
                planted.exact_duplicates[_key(count)] = original
                count += 1
            good = txn.get(_key(0).encode()) if n else b""
            for i in range(corrupt):
                txn.put(_key(count).encode(), _corrupt_value(i, good))
                planted.corrupt.append(_key(count))
                count += 1
    finally:
        if pool:
            pool.close()
            pool.join()
        env.close()
    return planted
