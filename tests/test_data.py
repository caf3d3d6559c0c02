import gzip
import json
import struct
import subprocess
import tarfile

import numpy as np
import pytest
import torch
from conftest import ArraySource

from data_shards.convert import ConvertOptions, convert, convert_source
from data_shards.idx import IdxError, read_idx
from data_shards.loader import ShardLoader, round_robin_resume
from data_shards.loaders import to_model_input
from data_shards.manifest import Manifest, ShardSetError, read_manifest, sha256_file, write_manifest
from data_shards.sources import fashion_mnist
from data_shards.writer import write_shard


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_roundtrip_and_truncation(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", a)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), a)
    raw = gzip.decompress((tmp_path / "a.gz").read_bytes())
    (tmp_path / "b").write_bytes(raw[:-3])
    with pytest.raises(IdxError, match="truncated"):
        read_idx(tmp_path / "b")
    (tmp_path / "c").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(IdxError, match="magic"):
        read_idx(tmp_path / "c")


def test_real_fashion_mnist_files():
    images, labels = fashion_mnist.load_split(split="test")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert sorted(np.unique(labels)) == list(range(10))


def test_missing_dataset_says_how_to_install(tmp_path):
    with pytest.raises(fashion_mnist.DatasetMissing, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.load_split(tmp_path)


def test_convert_writes_manifest_and_is_idempotent(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    rng = np.random.default_rng(0)
    write_idx(root / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (700, 28, 28)))
    write_idx(root / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, (700,)))
    opts = ConvertOptions(resolution=32, channels=1, shard_size=300)
    m = convert("fashion-mnist", root, tmp_path / "out", opts, progress=False)
    assert [s.count for s in m.shards] == [300, 300, 100] and m.total == 700
    for s in m.shards:
        assert sha256_file(tmp_path / "out" / s.name) == s.sha256
    data = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert data["total"] == 700 and data["transform"]["resolution"] == 32
    assert not list((tmp_path / "out").glob(".*.tmp"))  # no temp files left behind
    assert all((tmp_path / "out" / s.name).with_suffix(".idx").is_file() for s in m.shards)  # DALI indices
    again = convert("fashion-mnist", root, tmp_path / "out", opts, progress=False)
    assert again.shards == m.shards


def unique_shards(tmp_path, n=600, shard_size=50, resolution=32):
    """Images whose label is their index, so batches can be checked for coverage."""
    images = np.random.default_rng(1).integers(0, 255, (n, 28, 28, 1), dtype=np.uint8)
    convert_source(ArraySource(images), tmp_path, ConvertOptions(resolution=resolution, channels=1,
                                                                 shard_size=shard_size, workers=2), progress=False)
    return tmp_path


def loader(folder, rank=0, world=1, workers=0, batch=10, seed=0, buffer=64):
    return ShardLoader(folder, rank=rank, world_size=world, batch_size=batch, seed=seed, channels=1,
                       resolution=32, num_workers=workers, shuffle_buffer=buffer)


def labels_of(batches):
    return [int(v) for _, labels in batches for v in labels]


def test_ranks_and_workers_split_disjoint_and_complete(tmp_path):
    folder = unique_shards(tmp_path)
    seen = []
    for rank in range(2):
        ld = loader(folder, rank=rank, world=2, workers=2, batch=10)
        got = labels_of(ld.batches(epoch=0))
        assert len(got) == ld.steps_per_epoch(0) * 10
        seen += got
    assert len(seen) == len(set(seen)) == 600  # 12 shards of 50 over 2 ranks x 2 workers: no remainder


def test_order_is_a_function_of_seed_and_epoch(tmp_path):
    folder = unique_shards(tmp_path)
    a = labels_of(loader(folder).batches(0))
    assert a == labels_of(loader(folder).batches(0))
    assert a != labels_of(loader(folder).batches(1))
    assert a != labels_of(loader(folder, seed=1).batches(0))
    assert sorted(a) == list(range(600))


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_resume_mid_epoch_is_exact(tmp_path, workers):
    folder = unique_shards(tmp_path, n=650)  # 13 shards: workers hold different batch counts
    full = list(loader(folder, workers=workers).batches(0))
    for start in (0, 7, len(full) - 2):
        tail = list(loader(folder, workers=workers).batches(0, start_step=start))
        assert len(tail) == len(full) - start
        for (x1, y1), (x2, y2) in zip(full[start:], tail, strict=True):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_round_robin_with_exhausted_worker():
    assert round_robin_resume(0, [3, 3]) == ([0, 0], [0, 1])
    assert round_robin_resume(5, [2, 5]) == ([2, 3], [1, 0])
    assert round_robin_resume(4, [4, 4, 4]) == ([2, 1, 1], [1, 2, 0])
    assert round_robin_resume(100, [1, 2]) == ([1, 2], [0, 1])


def test_batches_are_uint8_nhwc_and_become_channels_last_model_input(tmp_path):
    folder = unique_shards(tmp_path)
    images, labels = next(iter(loader(folder).batches(0)))
    assert images.shape == (10, 32, 32, 1) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    for dtype in (torch.float32, torch.bfloat16):
        x = to_model_input(images, dtype)
        assert x.shape == (10, 1, 32, 32) and x.dtype == dtype
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert x.min() >= -1 and x.max() <= 1
    x = to_model_input(torch.tensor([0, 255, 128], dtype=torch.uint8).view(1, 1, 3, 1))
    assert x.flatten().tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1], abs=1e-7)


def test_shard_set_errors(tmp_path):
    with pytest.raises(ShardSetError, match="does not exist"):
        read_manifest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardSetError, match="no manifest.json"):
        read_manifest(tmp_path / "empty")
    folder = unique_shards(tmp_path / "set", n=100, shard_size=50)
    with pytest.raises(ShardSetError, match="are 32x32, the model wants 64x64"):
        ShardLoader(folder, rank=0, world_size=1, batch_size=4, seed=0, channels=1, resolution=64)
    with pytest.raises(ShardSetError, match="2 shards but 2 rank"):
        loader(folder, world=2, workers=2)
    (folder / "shard-000001.tar").unlink()
    with pytest.raises(ShardSetError, match="lacks 1 shard"):
        read_manifest(folder)


def test_corrupt_sample_is_skipped_and_counted(tmp_path):
    import io

    from PIL import Image

    from data_shards.transform import encode

    good = encode(np.zeros((32, 32, 1), np.uint8), "png")
    noise = encode(np.random.default_rng(0).integers(0, 256, (32, 32, 1), dtype=np.uint8), "png")
    cut = noise[: len(noise) // 2]  # a stored PNG cut mid-stream: it opens, and fails only when decoded
    Image.open(io.BytesIO(cut))
    bad = {5: b"not a png", 6: b"", 7: cut}
    samples = [(f"k{i}", {"png": bad.get(i, good), "cls": b"0"}) for i in range(30)]
    info = write_shard(tmp_path / "shard-000000.tar", samples)
    write_manifest(tmp_path, Manifest(source={}, transform={"resolution": 32, "channels": 1}, encoding="png",
                                      shards=[info]))
    ld = loader(tmp_path, batch=27, buffer=0)
    batches = list(ld.batches(0))
    assert len(batches) == 1 and ld.skipped == 3


def test_truncated_shard_is_counted_and_ranks_keep_their_step_count(tmp_path):
    folder = unique_shards(tmp_path, n=600, shard_size=50)
    shard = folder / "shard-000004.tar"
    with tarfile.open(shard) as tar:  # key.cls then key.png for each sample; a key's number is its label
        images = [m for m in tar.getmembers() if m.name.endswith(".png")]
    subprocess.run(["truncate", "-s", str(images[15].offset_data + images[15].size // 2), str(shard)], check=True)
    # the sample whose image was cut and every one after it
    lost = {int(m.name.partition(".")[0].lstrip("k")) for m in images[15:]}
    assert len(lost) == 35
    ranks = [loader(folder, rank=r, world=2, workers=2, batch=10) for r in range(2)]
    for ld in ranks:
        seen = labels_of(ld.batches(0))
        assert len(seen) == ld.steps_per_epoch(0) * 10 == 300  # the rank short of data topped up
        assert not set(seen) & lost
    # the truncated shard belongs to one rank: that one counted exactly what the cut lost, the other nothing
    assert sorted(ld.skipped for ld in ranks) == [0, len(lost)]
