"""decode_image on what crawled data holds: values cut short, bombs, tiny and unusual images.

Every case is made with Pillow's real encoders (then cut or patched), not hand-written bytes:
decoding returns the right pixels or raises UndecodableImage with a one-line reason, whichever
command (convert, dedup, the loaders) asks.
"""

import io
import json
import struct
import warnings
import zlib

import lmdb
import numpy as np
import pytest
from conftest import run_dcgan
from PIL import ExifTags, Image, ImageFile

from data_shards.transform import UndecodableImage, decode_image, decode_stored, min_source_side
from data_shards.writer import read_shard

CUTS = (0.1, 0.3, 0.5, 0.7, 0.9)


def encoded(image: Image.Image | np.ndarray, fmt: str, **options) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def picture(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A colour gradient with noise: encoders spread its bytes over the whole stream."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 255 // max(w + h - 2, 1)], -1)
    return (base + rng.integers(-20, 21, base.shape)).clip(0, 255).astype(np.uint8)


def exif_orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = value
    return exif


def skip_reason(data: bytes, channels: int = 3, min_side: int = 0) -> str:
    with pytest.raises(UndecodableImage) as info:
        decode_image(data, channels, min_side)
    reason = str(info.value)
    assert reason.startswith(("undecodable image: ", "zero-byte value")) and "\n" not in reason, reason
    return reason


@pytest.mark.parametrize("fmt, options", [("JPEG", {"quality": 90}), ("JPEG", {"progressive": True}),
                                          ("WEBP", {"quality": 80}), ("WEBP", {"lossless": True}),
                                          ("PNG", {}), ("GIF", {})],
                         ids=["jpeg", "jpeg-progressive", "webp", "webp-lossless", "png", "gif"])
def test_every_cut_of_a_stream_is_skipped(fmt, options):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # True would hand back cut images half grey
    data = encoded(picture(256, 192), fmt, **options)
    for min_side in (0, 32):  # 32: the JPEG draft decode
        whole = decode_image(data, 3, min_side)
        for cut in [int(len(data) * f) for f in CUTS] + [len(data) - 2]:
            try:
                pixels = decode_image(data[:cut], 3, min_side)
            except UndecodableImage as e:
                assert str(e).startswith("undecodable image: ") and "\n" not in str(e)
                continue
            # PNG and GIF hold every pixel before their end markers (12 and 1 bytes): that cut loses none
            assert fmt in ("PNG", "GIF") and cut == len(data) - 2, (fmt, cut, len(data))
            assert np.array_equal(pixels, whole)


def test_errors_at_open_load_and_convert():
    png = encoded(picture(40, 30), "PNG")
    # at open: a PNG with a damaged signature is no format Pillow knows
    assert "UnidentifiedImageError" in skip_reason(b"\x89PNX" + png[4:])
    # at load: Image.open reads the header only, so a JPEG cut mid-stream opens and fails when decoded
    jpeg = encoded(picture(256, 192), "JPEG", quality=90)
    cut = jpeg[: len(jpeg) // 2]
    Image.open(io.BytesIO(cut))
    with pytest.raises(OSError, match="truncated"):
        Image.open(io.BytesIO(cut)).load()
    assert "truncated" in skip_reason(cut) and "truncated" in skip_reason(cut, 1, 32)
    # at convert: a premultiplied grey+alpha TIFF (mode La) loads, but Pillow converts La to nothing
    tiff = encoded(Image.new("LA", (6, 4), (100, 128)), "TIFF")
    unassociated = struct.pack("<HHII", 338, 3, 1, 2)  # the ExtraSamples entry: tag, SHORT, count 1, value 2
    assert tiff.count(unassociated) == 1
    premultiplied = tiff.replace(unassociated, struct.pack("<HHII", 338, 3, 1, 1))
    image = Image.open(io.BytesIO(premultiplied))
    image.load()
    assert image.mode == "La"
    with pytest.raises(ValueError):
        image.convert("RGBA")
    assert "conversion from La" in skip_reason(premultiplied)
    assert (decode_image(tiff, 3) == 177).all()  # the LA original: grey 100 at alpha 128 over white
    # pixels with no agreed 8-bit form
    assert "float pixels" in skip_reason(encoded(Image.fromarray(np.full((4, 4), 0.5, np.float32)), "TIFF"))
    assert skip_reason(b"") == "zero-byte value"


def test_decompression_bombs_are_skipped(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's own limit, which Image.open reads
    assert decode_image(encoded(picture(25, 40), "PNG"), 3).shape == (40, 25, 3)
    with pytest.warns(Image.DecompressionBombWarning):  # 1,200 pixels: under 2x the limit Pillow only warns
        assert "decompression bomb: 40x30 = 1200 pixels" in skip_reason(encoded(picture(40, 30), "PNG"))
    assert "decompression bomb" in skip_reason(encoded(picture(100, 100), "JPEG"))  # over 2x: Pillow refuses


def test_tiny_images_are_skipped():
    one = encoded(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG")
    assert "1x1 pixels, too small" in skip_reason(one)
    # Pillow cannot encode a 0-pixel image: a 1x1 PNG whose IHDR says width 0, its CRC recomputed
    zero = bytearray(one)
    assert zero[12:16] == b"IHDR"
    zero[16:20] = struct.pack(">I", 0)
    zero[29:33] = struct.pack(">I", zlib.crc32(bytes(zero[12:29])))
    skip_reason(bytes(zero))
    assert decode_image(encoded(picture(3, 2), "PNG"), 3).shape == (2, 3, 3)
    # with a target side, a source under a quarter of it is skipped, a quarter is kept
    assert min_source_side(0) == min_source_side(7) == 2 and min_source_side(64) == 16
    assert "80x15 pixels, too small" in skip_reason(encoded(picture(80, 15), "PNG"), 3, 64)
    assert decode_image(encoded(picture(80, 16), "PNG"), 3, 64).shape == (16, 80, 3)


def test_cmyk_jpeg_becomes_rgb():
    rgb = picture(64, 48)
    data = encoded(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data, 3)
    # about what JPEG loses on the same picture stored as RGB
    rgb_error = np.abs(decode_image(encoded(rgb, "JPEG", quality=95), 3).astype(int) - rgb).mean()
    assert out.shape == (48, 64, 3) and np.abs(out.astype(int) - rgb).mean() < 2 * rgb_error + 1


def test_16_bit_grey_is_scaled_not_clipped():
    values = np.linspace(0, 65535, 12 * 16).astype(np.uint16).reshape(12, 16)
    png = encoded(values, "PNG")
    assert Image.open(io.BytesIO(png)).mode == "I;16"
    assert np.asarray(Image.open(io.BytesIO(png)).convert("L")).mean() > 250  # Pillow's convert clips
    want = (values >> 8).astype(np.uint8)[..., None]
    for data in (png, encoded(values.astype(np.int32), "PPM")):  # a 16-bit PGM opens as mode I
        for channels in (1, 3):
            assert np.array_equal(decode_image(data, channels), np.repeat(want, channels, axis=2))
    # a tRNS grey value in a 16-bit PNG is transparent: the white page shows there
    hole = values == values[3, 5]
    out = decode_image(encoded(values, "PNG", transparency=int(values[3, 5])), 1)
    assert (out[hole] == 255).all() and np.array_equal(out[~hole], want[~hole])


def test_palette_and_alpha_are_composited_over_white():
    rgb = picture(20, 10)
    palette = Image.fromarray(rgb).quantize(16)
    colours = np.asarray(palette.convert("RGB"))
    assert np.array_equal(decode_image(encoded(palette, "PNG"), 3), colours)
    index = int(np.asarray(palette)[0, 0])
    data = encoded(palette, "PNG", transparency=index)
    assert Image.open(io.BytesIO(data)).mode == "P"
    out, hole = decode_image(data, 3), np.asarray(palette) == index
    assert (out[hole] == 255).all() and np.array_equal(out[~hole], colours[~hole])
    alpha = np.linspace(0, 255, 200).astype(np.uint8).reshape(10, 20)
    over_white = rgb * (alpha[..., None] / 255) + 255 * (1 - alpha[..., None] / 255)
    for data in (encoded(np.dstack([rgb, alpha]), "PNG"), encoded(np.dstack([rgb, alpha]), "WEBP", lossless=True)):
        assert np.abs(decode_image(data, 3) - over_white).max() <= 1
    grey_alpha = encoded(np.dstack([rgb[..., 0], alpha]), "PNG")
    assert Image.open(io.BytesIO(grey_alpha)).mode == "LA"
    assert np.abs(decode_image(grey_alpha, 1)[..., 0] - over_white[..., 0]).max() <= 1


def test_grey_to_three_channels_and_colour_to_one():
    rgb = picture(20, 10)
    grey = rgb[..., 0]
    out = decode_image(encoded(grey, "PNG"), 3)
    assert out.shape == (10, 20, 3) and all(np.array_equal(out[..., c], grey) for c in range(3))
    out = decode_image(encoded(rgb, "PNG"), 1)
    luma = rgb @ np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, Pillow's L
    assert out.shape == (10, 20, 1) and np.abs(out[..., 0] - luma).max() <= 1
    bilevel = encoded(Image.fromarray(grey > 128), "PNG")
    assert np.array_equal(decode_image(bilevel, 1)[..., 0], np.where(grey > 128, 255, 0))
    lab_white = encoded(Image.new("LAB", (4, 4), (255, 128, 128)), "TIFF")  # Pillow has LAB -> RGB, not -> L
    assert (decode_image(lab_white, 1) >= 253).all()


@pytest.mark.parametrize("fmt", ["WEBP", "GIF"])
def test_animated_image_gives_its_first_frame(fmt):
    frames = [Image.new("RGB", (40, 30), c) for c in ((200, 30, 30), (30, 200, 30), (30, 30, 200))]
    options = {"lossless": True} if fmt == "WEBP" else {}
    data = encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **options)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    out = decode_image(data, 3)
    assert out.shape == (30, 40, 3) and (out == (200, 30, 30)).all()


@pytest.mark.parametrize("orientation, quarter_turns", [(3, 2), (6, -1), (8, 1)])  # 6: turn 90 degrees clockwise
@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_exif_orientation_is_applied(fmt, orientation, quarter_turns):
    data = encoded(picture(48, 32), fmt, exif=exif_orientation(orientation), quality=90)
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # as the camera wrote the rows
    out = decode_image(data, 3)
    assert out.shape == ((32, 48, 3) if orientation == 3 else (48, 32, 3))
    assert np.array_equal(out, np.rot90(stored, quarter_turns))


def test_jpeg_draft_decodes_at_the_smallest_scale_that_keeps_twice_the_target():
    data = encoded(picture(341, 256), "JPEG", quality=90)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an ordinary image decodes without a word
        shapes = {m: decode_image(data, 3, m).shape[:2] for m in (0, 16, 32, 64, 65)}
    assert shapes == {0: (256, 341), 16: (32, 43), 32: (64, 86), 64: (128, 171), 65: (256, 341)}
    turned = encoded(picture(341, 256), "JPEG", quality=90, exif=exif_orientation(6))
    assert decode_image(turned, 3, 32).shape[:2] == (86, 64)


def test_stored_sample_cut_short_is_undecodable():
    stored = encoded(picture(32, 32), "PNG")
    assert decode_stored(stored, "png", (32, 32, 3)).shape == (32, 32, 3)
    with pytest.raises(UndecodableImage, match="truncated"):
        decode_stored(stored[: len(stored) // 2], "png", (32, 32, 3))


def test_cli_convert_and_dedup_skip_bad_values_and_keep_the_rest(tmp_path):
    from data_shards.sample_lsun import build_sample_lsun

    source = tmp_path / "bedroom_train_lmdb"
    build_sample_lsun(source, 24, image_format="JPEG", short_side=64)
    jpeg = encoded(picture(96, 64, 1), "JPEG", quality=90)
    cut = jpeg[: len(jpeg) // 2]
    Image.open(io.BytesIO(cut))  # the header is whole: only the decode fails
    animated = [Image.fromarray(picture(96, 64, s)) for s in (8, 9)]
    bad = {  # key -> what its skip reason says
        "bad-jpeg-cut-mid-stream": (cut, "image file is truncated"),
        "bad-webp-cut": (encoded(picture(96, 64, 2), "WEBP")[:300], "undecodable image: OSError"),
        "bad-zero-byte": (b"", "zero-byte value"),
        "bad-one-pixel": (encoded(Image.new("RGB", (1, 1)), "PNG"), "too small"),
        "bad-too-small": (encoded(picture(40, 7, 3), "PNG"), "too small"),  # 7 px, under 32 // 4
        "bad-float": (encoded(Image.fromarray(np.ones((64, 64), np.float32)), "TIFF"), "float pixels"),
        # 90 M pixels, just over Pillow's default limit (89.5 M) where Pillow itself only warns
        "bad-bomb": (encoded(Image.new("1", (10_000, 9_000)), "PNG", compress_level=1), "decompression bomb"),
    }
    odd = {
        "odd-cmyk": encoded(Image.fromarray(picture(96, 64, 4)).convert("CMYK"), "JPEG"),
        "odd-grey16": encoded(picture(96, 64, 5)[..., 0].astype(np.uint16) * 257, "PNG"),
        "odd-palette-transparent": encoded(Image.fromarray(picture(96, 64, 6)).quantize(32), "PNG", transparency=0),
        "odd-turned": encoded(picture(96, 64, 7), "JPEG", exif=exif_orientation(6)),
        "odd-animated": encoded(animated[0], "GIF", save_all=True, append_images=animated[1:]),
        "odd-alpha-webp": encoded(np.dstack([picture(96, 64, 10), picture(96, 64, 11)[..., 0]]), "WEBP"),
    }
    env = lmdb.open(str(source), map_size=1 << 30)
    with env.begin(write=True) as txn:
        good = [k.decode() for k, _ in txn.cursor()]
        for key, value in [*((k, v) for k, (v, _) in bad.items()), *odd.items()]:
            txn.put(key.encode(), value)
    env.close()

    out = tmp_path / "shards"
    res = run_dcgan("data", "convert", "--source", "lsun", "--input", str(source), "--out", str(out),
                    "--resolution", "32", "--shard-size", "16", "--workers", "2", "--quiet")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    reasons = {s["key"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == set(bad)
    for key, (_, says) in bad.items():
        assert says in reasons[key] and "\n" not in reasons[key], (key, reasons[key])
    samples = {s["__key__"]: s["png"] for shard in manifest["shards"] for s in read_shard(out / shard["name"])}
    assert sorted(samples) == sorted(good + list(odd)) and manifest["total"] == len(good) + len(odd)
    assert decode_image(samples["odd-grey16"], 3).mean() < 200  # not the white of a clipped 16-bit decode

    dups = tmp_path / "dups.json"
    res = run_dcgan("data", "dedup", "--source", "lsun", "--input", str(source), "--out", str(dups),
                    "--train-samples", "64", "--train-steps", "20", "--workers", "1")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    listed = json.loads(dups.read_text())
    # dedup decodes for its 32x32 crops as convert does at --resolution 32: the same skips, the same reasons
    assert {s["key"]: s["reason"] for s in listed["skipped"]} == reasons


def test_dedup_of_a_source_where_nothing_decodes_is_a_one_line_error(tmp_path):
    from data_shards.convert import ConversionError
    from data_shards.dedup import DedupOptions, find_near_duplicates
    from data_shards.sources import open_source

    jpeg = encoded(picture(96, 64), "JPEG")
    env = lmdb.open(str(tmp_path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, value in enumerate([b"", jpeg[: len(jpeg) // 2], encoded(Image.new("RGB", (1, 1)), "PNG")]):
            txn.put(f"k{i}".encode(), value)
    env.close()
    with pytest.raises(ConversionError, match="none of the 3 items sampled .* decode; first reason: zero-byte value"):
        find_near_duplicates(open_source("lsun", tmp_path), DedupOptions(train_samples=10, workers=1))
