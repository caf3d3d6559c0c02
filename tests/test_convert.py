"""Conversion of LSUN-format LMDBs and image folders into shard sets."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from conftest import ROOT, ArraySource
from PIL import Image

from data_shards.convert import ConversionError, ConvertOptions, convert, convert_source
from data_shards.loader import ShardLoader
from data_shards.manifest import read_manifest, sha256_file
from data_shards.writer import read_shard


def lsun_options(**kw):
    return ConvertOptions(**{"resolution": 64, "channels": 3, "shard_size": 200, "workers": 2, **kw})


def test_lsun_conversion_counts_and_manifest(lsun_lmdb, tmp_path):
    path, planted = lsun_lmdb
    m = convert("lsun", path, tmp_path, lsun_options(), progress=False)
    total_source = 600 + 60 + 6 + 6
    reasons = {s["key"]: s["reason"] for s in m.skipped}
    assert set(planted.corrupt) <= set(reasons)
    # planted in turn: a zero-byte value, bytes that are no image, a truncated WebP, a JPEG cut mid-stream
    for i, key in enumerate(planted.corrupt):
        assert reasons[key].startswith("zero-byte value" if i % 4 == 0 else "undecodable image"), reasons[key]
    for copy, original in planted.exact_duplicates.items():
        # exactly one of each pair survives, whichever comes first in key order
        assert reasons.get(copy, reasons.get(original, "")).startswith("exact duplicate of")
    assert m.total == total_source - len(planted.corrupt) - len(planted.exact_duplicates) == total_source - len(reasons)
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["total"] == m.total and data["source"]["kind"] == "lsun" and data["source"]["entries"] == total_source
    assert data["transform"] == {"resolution": 64, "channels": 3, "crop": "center", "resize": "bicubic",
                                 "encoding": "png", "quality": None, "keep_original": False}
    for shard in m.shards:
        assert sha256_file(tmp_path / shard.name) == shard.sha256
        assert (tmp_path / shard.name).with_suffix(".idx").is_file()
    keys = [s["__key__"] for shard in m.shards for s in read_shard(tmp_path / shard.name)]
    assert len(keys) == len(set(keys)) == m.total
    sample = next(read_shard(tmp_path / m.shards[0].name))
    assert Image.open(__import__("io").BytesIO(sample["png"])).size == (64, 64)


def test_encodings_and_originals(lsun_lmdb, tmp_path):
    path, _ = lsun_lmdb
    for encoding in ("jpeg", "raw"):
        out = tmp_path / encoding
        m = convert("lsun", path, out, lsun_options(encoding=encoding, limit=250, keep_original=True), progress=False)
        first = next(read_shard(out / m.shards[0].name))
        assert {"jpg" if encoding == "jpeg" else "u8", "orig.webp"} <= set(first) and "cls" not in set(first)
        ld = ShardLoader(out, rank=0, world_size=1, batch_size=16, seed=0, channels=3, resolution=64, num_workers=0)
        images, _ = next(iter(ld.batches(0)))
        assert images.shape == (16, 64, 64, 3) and ld.skipped == 0
    assert len(first["u8"]) == 64 * 64 * 3


def test_raw_and_png_hold_the_same_pixels(lsun_lmdb, tmp_path):
    path, _ = lsun_lmdb
    batches = {}
    for encoding in ("png", "raw"):
        convert("lsun", path, tmp_path / encoding, lsun_options(encoding=encoding, limit=100), progress=False)
        ld = ShardLoader(tmp_path / encoding, rank=0, world_size=1, batch_size=50, seed=0, channels=3,
                         resolution=64, num_workers=0)
        batches[encoding] = next(iter(ld.batches(0)))[0]
    assert (batches["png"] == batches["raw"]).all()


def test_parts_on_two_machines_equal_one_conversion(lsun_lmdb, tmp_path):
    path, _ = lsun_lmdb
    whole = convert("lsun", path, tmp_path / "whole", lsun_options(), progress=False)
    assert convert("lsun", path, tmp_path / "parts", lsun_options(part=(1, 2)), progress=False) is None
    assert not (tmp_path / "parts" / "manifest.json").exists()
    parts = convert("lsun", path, tmp_path / "parts", lsun_options(part=(0, 2)), progress=False)
    assert [(s.name, s.count, s.sha256) for s in parts.shards] == [(s.name, s.count, s.sha256) for s in whole.shards]


def test_exact_duplicate_in_a_later_shard_is_removed_at_finalize(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (40, 40, 40, 3), dtype=np.uint8)
    images[35] = images[3]  # same pixels, different shard (shard size 10)
    m = convert_source(ArraySource(images), tmp_path, ConvertOptions(resolution=32, shard_size=10, workers=2),
                       progress=False)
    assert m.total == 39 and [s.count for s in m.shards] == [10, 10, 10, 9]
    assert m.skipped == [{"key": "k000035", "reason": "exact duplicate of k000003"}]
    assert sha256_file(tmp_path / "shard-000003.tar") == m.shards[3].sha256


def test_settings_change_needs_a_new_folder(lsun_lmdb, tmp_path):
    path, _ = lsun_lmdb
    convert("lsun", path, tmp_path, lsun_options(limit=100, part=(0, 2)), progress=False)
    with pytest.raises(ConversionError, match="other settings"):
        convert("lsun", path, tmp_path, lsun_options(limit=100, resolution=32), progress=False)


def test_image_folder_source_with_classes(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i in range(5):
            pixels = rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "src" / cls / f"{i}.v1.jpg")
    (tmp_path / "src" / "dogs" / "broken.png").write_bytes(b"\x89PNG broken")
    m = convert("folder", tmp_path / "src", tmp_path / "out", ConvertOptions(resolution=32, shard_size=4, workers=1),
                progress=False)
    assert m.classes == ["cats", "dogs"] and m.total == 10
    assert m.skipped == [{"key": "dogs/broken", "reason": m.skipped[0]["reason"]}]
    samples = [s for shard in m.shards for s in read_shard(tmp_path / "out" / shard.name)]
    assert {s["__key__"] for s in samples} == {f"{c}/{i}_v1" for c in ("cats", "dogs") for i in range(5)}
    assert sorted(int(s["cls"]) for s in samples) == [0] * 5 + [1] * 5


def test_missing_source_is_a_one_line_error(tmp_path):
    from conftest import run_dcgan

    res = run_dcgan("data", "convert", "--source", "lsun", "--input", str(tmp_path), "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "is not an LMDB folder" in res.stderr and "Traceback" not in res.stderr


def test_killed_conversion_resumes_to_the_same_shards(lsun_lmdb, tmp_path):
    path, _ = lsun_lmdb
    args = ["data", "convert", "--source", "lsun", "--input", str(path), "--resolution", "64", "--shard-size", "60",
            "--workers", "1", "--quiet"]
    reference = convert("lsun", path, tmp_path / "ref", lsun_options(shard_size=60), progress=False)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "dcgan", *args, "--out", str(out)], cwd=ROOT,
                            start_new_session=True)
    deadline = time.time() + 120
    while len(list((out / ".progress").glob("shard-*.json"))) < 3 and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list((out / ".progress").glob("shard-*.json")))
    assert 3 <= done < len(reference.shards) and not (out / "manifest.json").exists()
    for tar in out.glob("shard-*.tar"):  # whatever carries a final name is a whole shard
        with tarfile.open(tar) as t:
            assert len(t.getmembers()) % 2 == 0
    res = subprocess.run([sys.executable, "-m", "dcgan", *args, "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    resumed = read_manifest(out)
    assert [(s.name, s.count, s.sha256) for s in resumed.shards] == [
        (s.name, s.count, s.sha256) for s in reference.shards]
    assert resumed.skipped == reference.skipped
    assert not list(out.glob(".*.tmp"))
