"""Decoding source images, the paper's centre crop + resize, and the stored encodings.

Encodings and what decoding them costs per 64x64x3 image (measured in
benchmarks/loader_throughput.py, which prints the current figures):
- "png": lossless, ~8-10 KB, a zlib inflate per image;
- "jpeg": lossy at quality q, ~2-3 KB at q=95, the cheapest to store, DALI can decode it on GPU;
- "raw": the uint8 pixels as they are, 12,288 bytes, no decode at all (a memcpy).
"""

from __future__ import annotations

import hashlib
import io
import re

import numpy as np
from PIL import Image

ENCODINGS = ("png", "jpeg", "raw")
# tar member extension per encoding, which is also what the loaders select
EXTENSIONS = {"png": "png", "jpeg": "jpg", "raw": "u8"}


class UndecodableImage(ValueError):
    pass


def decode_image(data: bytes, channels: int, min_side: int = 0) -> np.ndarray:
    """Encoded bytes (JPEG, WebP, PNG, ...) -> uint8 H x W x C.

    With `min_side`, a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) whose shorter
    side still reaches 2 x min_side: a far cheaper decode, and the bicubic resize after it
    still averages enough source pixels to avoid aliasing.
    """
    if not data:
        raise UndecodableImage("zero-byte value")
    try:
        image = Image.open(io.BytesIO(data))
        if min_side and image.format == "JPEG":
            w, h = image.size
            scale = min(w, h) / (2 * min_side)
            if scale >= 2:
                image.draft(image.mode, (int(w / scale) + 1, int(h / scale) + 1))
        mode = "L" if channels == 1 else "RGB"
        if image.mode != mode:
            image = image.convert(mode)
    except Exception as e:  # Pillow raises many types for broken input
        detail = re.sub(r" ?<[^>]* at 0x[0-9a-f]+>", "", str(e))  # object addresses differ run to run
        raise UndecodableImage(f"undecodable image: {type(e).__name__}: {detail}") from None
    array = np.asarray(image)
    return array[..., None] if array.ndim == 2 else array


def center_crop_resize(image: np.ndarray, resolution: int) -> np.ndarray:
    """H x W x C uint8 -> resolution x resolution x C: centre square crop, bicubic resize."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top:top + side, left:left + side]
    if side != resolution:
        # Pillow's bicubic filter widens its support when shrinking, so it antialiases
        pil = Image.fromarray(square[..., 0] if square.shape[2] == 1 else square)
        square = np.asarray(pil.resize((resolution, resolution), Image.Resampling.BICUBIC))
        if square.ndim == 2:
            square = square[..., None]
    return np.ascontiguousarray(square)


def encode(image: np.ndarray, encoding: str, quality: int = 95) -> bytes:
    if encoding == "raw":
        return image.tobytes()
    pil = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
    buf = io.BytesIO()
    if encoding == "png":
        pil.save(buf, format="PNG", compress_level=1)
    elif encoding == "jpeg":
        pil.save(buf, format="JPEG", quality=quality)
    else:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    return buf.getvalue()


def decode_stored(data: bytes, encoding: str, shape: tuple[int, int, int]) -> np.ndarray:
    """A stored sample -> uint8 C x H x W, the layout the loaders batch."""
    if encoding == "raw":
        if len(data) != shape[0] * shape[1] * shape[2]:
            raise UndecodableImage(f"raw sample of {len(data)} bytes, expected {shape}")
        array = np.frombuffer(data, dtype=np.uint8).reshape(shape)
    else:
        array = decode_image(data, shape[2])
        if array.shape != shape:
            raise UndecodableImage(f"stored image is {array.shape}, manifest says {shape}")
    return array.transpose(2, 0, 1)


def pixel_hash(image: np.ndarray) -> int:
    """64-bit hash of the decoded pixels (and shape): equal for exact duplicates."""
    digest = hashlib.blake2b(image.tobytes(), digest_size=8, person=str(image.shape).encode()[:16])
    return int.from_bytes(digest.digest(), "little", signed=True)
