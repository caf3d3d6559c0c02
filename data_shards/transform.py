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
from PIL import ExifTags, Image, ImageOps

ENCODINGS = ("png", "jpeg", "raw")
# tar member extension per encoding, which is also what the loaders select
EXTENSIONS = {"png": "png", "jpeg": "jpg", "raw": "u8"}


class UndecodableImage(ValueError):
    """A value that does not decode to a usable picture; the message is the one-line skip reason,
    "zero-byte value" or "undecodable image: ..." (the manifest's categories)."""


# Pillow decodes 16-bit greyscale into these modes; its own convert("L") clips them at 255 (a white
# image), so decoding scales them to 8 bits instead.
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# A source far below the target side is upscaled into a blur: under a quarter of it (more than a
# 4x upscale) a sample shows the resize more than the scene. A 0- or 1-pixel side holds no
# picture at any target, hence a floor of 2.
_MAX_UPSCALE = 4
# The page colour an image with transparency was meant to be seen on: web graphics (logos,
# product shots, icons) are drawn for white pages, and the colour values under alpha 0 are
# arbitrary (often black), so dropping alpha would show whatever the encoder left there.
_BACKGROUND = (255, 255, 255)


def min_source_side(min_side: int) -> int:
    """The shortest source side that decoding accepts for a target side of `min_side` (0: none)."""
    return max(2, min_side // _MAX_UPSCALE)


def decode_image(data: bytes, channels: int, min_side: int = 0) -> np.ndarray:
    """Encoded bytes (JPEG, WebP, PNG, GIF, TIFF, ...) -> uint8 H x W x C, upright.

    Every failure (a value cut short, bytes that are no image, a pixel mode that has no 8-bit
    form, a decompression bomb, a picture too small) raises UndecodableImage with a one-line
    reason, so a caller can count the skip and go on. Animated images give their first frame;
    transparency is composited over white; EXIF orientation is applied.

    With `min_side`, a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) whose shorter
    side still reaches 2 x min_side: a far cheaper decode, and the bicubic resize after it
    still averages enough source pixels to avoid aliasing. It also sets the smallest source
    accepted (`min_source_side`).
    """
    if not data:
        raise UndecodableImage("zero-byte value")
    try:
        # reads the header only: a value cut short opens fine and fails at load() below
        image = Image.open(io.BytesIO(data))
        w, h = image.size
        # Pillow raises above twice its limit but only warns between 1x and 2x; a skip either way
        limit = Image.MAX_IMAGE_PIXELS
        if limit and w * h > limit:
            raise UndecodableImage(f"undecodable image: decompression bomb: {w}x{h} = {w * h} pixels, "
                                   f"over the limit of {limit}")
        smallest = min_source_side(min_side)
        if min(w, h) < smallest:
            target = f" for a {min_side} px target" if min_side else ""
            raise UndecodableImage(f"undecodable image: {w}x{h} pixels, too small (shorter side under "
                                   f"{smallest} px{target})")
        if min_side and image.format in ("JPEG", "MPO"):
            scale = next((s for s in (8, 4, 2) if min(w, h) // s >= 2 * min_side), 1)
            if scale > 1:  # Pillow picks the largest DCT scale s with size // request >= s: ask for size // s
                image.draft(image.mode, (w // scale, h // scale))
        image.load()  # the decode itself; LOAD_TRUNCATED_IMAGES stays False, so a cut stream raises
        if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            ImageOps.exif_transpose(image, in_place=True)
        return _to_channels(image, channels)
    except UndecodableImage:
        raise
    except Image.DecompressionBombError as e:  # over twice the limit: Pillow refuses it at open
        raise UndecodableImage(f"undecodable image: decompression bomb: {e}") from None
    except Exception as e:  # Pillow raises many types for broken input
        detail = re.sub(r" ?<[^>]* at 0x[0-9a-f]+>", "", str(e))  # object addresses differ run to run
        detail = " ".join(detail.split())  # a reason is one line
        raise UndecodableImage(f"undecodable image: {type(e).__name__}: {detail}") from None


def _to_channels(image: Image.Image, channels: int) -> np.ndarray:
    """A loaded image of any mode -> uint8 H x W x `channels`."""
    mode = "L" if channels == 1 else "RGB"
    if image.mode in _WIDE_GREY:
        # 16-bit PGM opens as mode I (32-bit): read it as 16-bit too (a rare 32-bit TIFF saturates)
        values = np.asarray(image)
        grey = (values.clip(0, 65535) >> 8).astype(np.uint8)
        if isinstance(image.info.get("transparency"), int):  # a tRNS grey value: the background shows there
            grey[values == image.info["transparency"]] = _BACKGROUND[0]
        return np.repeat(grey[..., None], channels, axis=2)
    if image.mode == "F":
        raise UndecodableImage("undecodable image: float pixels (mode F) have no agreed range to map to 8 bits")
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        image = Image.new("RGB", image.size, _BACKGROUND)
        image.paste(rgba, mask=rgba)
    if mode == "L" and image.mode not in ("1", "L", "P", "RGB"):
        image = image.convert("RGB")  # some modes (LAB) convert to RGB but not straight to L
    if image.mode != mode:
        image = image.convert(mode)
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
    """A stored sample -> uint8 H x W x C, the layout the loaders batch (see data_shards/loaders.py)."""
    if encoding == "raw":
        if len(data) != shape[0] * shape[1] * shape[2]:
            raise UndecodableImage(f"raw sample of {len(data)} bytes, expected {shape}")
        array = np.frombuffer(data, dtype=np.uint8).reshape(shape)
    else:
        array = decode_image(data, shape[2])
        if array.shape != shape:
            raise UndecodableImage(f"stored image is {array.shape}, manifest says {shape}")
    return array


def pixel_hash(image: np.ndarray) -> int:
    """64-bit hash of the decoded pixels (and shape): equal for exact duplicates."""
    digest = hashlib.blake2b(image.tobytes(), digest_size=8, person=str(image.shape).encode()[:16])
    return int.from_bytes(digest.digest(), "little", signed=True)
