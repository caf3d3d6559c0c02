"""data.loader = "device": the rank's part of the set decoded once and held as one uint8 tensor."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ArraySource, run_dcgan, tiny_train_args
from test_data import unique_shards

from data_shards.convert import ConvertOptions, convert_source
from data_shards.device_loader import DeviceLoader
from data_shards.loader import ShardLoader
from data_shards.manifest import Manifest, ShardSetError, read_manifest, write_manifest
from data_shards.transform import EXTENSIONS, decode_stored, encode
from data_shards.writer import write_shard

N = 650  # 13 shards of 50: ranges of 2 and 3 ranks start and end inside shards


@pytest.fixture(scope="module")
def grey(tmp_path_factory) -> Path:
    """Grey 32x32 images whose label is their index."""
    return unique_shards(tmp_path_factory.mktemp("grey"), n=N, shard_size=50)


@pytest.fixture(scope="module", params=["png", "jpeg", "raw"])
def rgb(request, tmp_path_factory) -> tuple[Path, str]:
    images = np.random.default_rng(0).integers(0, 255, (96, 40, 36, 3), dtype=np.uint8)
    out = tmp_path_factory.mktemp(f"rgb-{request.param}")
    convert_source(ArraySource(images), out, ConvertOptions(resolution=32, channels=3, shard_size=32, workers=2,
                                                            encoding=request.param), progress=False)
    return out, request.param


def device_loader(folder, rank=0, world=1, batch=10, seed=0, workers=0, channels=1, **kw) -> DeviceLoader:
    return DeviceLoader(folder, rank=rank, world_size=world, batch_size=batch, seed=seed, channels=channels,
                        resolution=32, num_workers=workers, shuffle_buffer=64, device="cpu", **kw)


def labels_of(batches) -> list[int]:
    return [int(v) for _, labels in batches for v in labels]


def test_batches_are_uint8_nhwc_and_every_sample_comes_once_per_epoch(grey):
    ld = device_loader(grey, batch=16)
    batches = list(ld.batches(0))
    assert len(batches) == ld.steps_per_epoch(0) == N // 16
    for images, labels in batches:
        assert images.shape == (16, 32, 32, 1) and images.dtype == torch.uint8 and images.is_contiguous()
        assert labels.dtype == torch.int64 and labels.device.type == "cpu"
    seen = labels_of(batches)
    assert len(seen) == len(set(seen)) == N // 16 * 16 and set(seen) <= set(range(N))
    assert ld.images.shape == (N, 32, 32, 1) and ld.skipped == 0 and ld.bytes_needed == N * 32 * 32


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_are_disjoint_cover_the_set_and_agree_on_steps(grey, world):
    loaders = [device_loader(grey, rank=r, world=world) for r in range(world)]
    held = [set(ld.labels.tolist()) for ld in loaders]
    assert sum(len(h) for h in held) == len(set().union(*held)) == N  # the split: disjoint and complete
    assert max(map(len, held)) - min(map(len, held)) <= 1
    steps = {ld.steps_per_epoch(e) for ld in loaders for e in (0, 1)}
    assert steps == {N // world // 10}
    for epoch in (0, 1):
        seen = [labels_of(ld.batches(epoch)) for ld in loaders]
        for got, part in zip(seen, held, strict=True):
            assert len(got) == len(set(got)) == N // world // 10 * 10 and set(got) <= part
        assert N - sum(map(len, seen)) < world * 10  # only each rank's last partial batch is left out


def test_order_is_a_function_of_seed_and_epoch(grey):
    ld = device_loader(grey, batch=16)  # 40 batches: 10 samples left out each epoch
    a = labels_of(ld.batches(0))
    assert a == labels_of(ld.batches(0)) == labels_of(device_loader(grey, batch=16, workers=2).batches(0))
    assert a != labels_of(ld.batches(1))
    assert a != labels_of(device_loader(grey, batch=16, seed=1).batches(0))
    assert set(a) != set(labels_of(ld.batches(1)))  # the left-out remainder moves between epochs


def test_workers_decode_the_same_set(grey):
    one, two = device_loader(grey, world=2, rank=1), device_loader(grey, world=2, rank=1, workers=2)
    assert torch.equal(one.images, two.images) and torch.equal(one.labels, two.labels)


def test_the_device_gather_gives_the_cpu_batches(grey):
    """On a CPU batches are gathered with numpy; the index_select a device uses must give the same."""
    host, device_path = device_loader(grey), device_loader(grey)
    device_path._gather_with_numpy = False
    for (x1, y1), (x2, y2) in zip(host.batches(1), device_path.batches(1, 0), strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_resume_mid_epoch_is_exact(grey):
    ld = device_loader(grey)
    full = list(ld.batches(3))
    for start in (0, 7, len(full) - 2, len(full)):
        tail = list(device_loader(grey).batches(3, start_step=start))
        assert len(tail) == len(full) - start
        for (x1, y1), (x2, y2) in zip(full[start:], tail, strict=True):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_pixels_match_the_webdataset_loader(rgb):
    folder, _ = rgb
    ours = {}
    for images, labels in device_loader(folder, batch=8, channels=3).batches(0):
        ours.update(zip(labels.tolist(), images, strict=True))
    theirs = {}
    shard_loader = ShardLoader(folder, rank=0, world_size=1, batch_size=8, seed=0, channels=3, resolution=32,
                               num_workers=0, shuffle_buffer=0)
    for images, labels in shard_loader.batches(0):
        assert images.dtype == torch.uint8 and images.shape == (8, 32, 32, 3)  # the same contract
        theirs.update(zip(labels.tolist(), images, strict=True))
    assert ours.keys() == theirs.keys() and len(ours) == 96
    for label, image in ours.items():
        assert image.shape == (32, 32, 3) and torch.equal(image, theirs[label]), label


def test_pixels_are_the_stored_ones(rgb):
    """Against the tars read with tarfile and decode_stored: no WebDataset on this side."""
    folder, encoding = rgb
    ld = device_loader(folder, batch=8, channels=3)
    members: dict[str, dict[str, bytes]] = {}
    for shard in read_manifest(folder).shards:
        with tarfile.open(folder / shard.name) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
    expected = {int(v["cls"]): decode_stored(v[EXTENSIONS[encoding]], encoding, (32, 32, 3)) for v in members.values()}
    assert len(ld.labels) == len(expected) == 96
    for image, label in zip(ld.images, ld.labels.tolist(), strict=True):
        assert np.array_equal(image.numpy(), expected[label]), label


def test_a_set_over_the_budget_is_refused_in_one_line(grey, monkeypatch):
    with pytest.raises(ShardSetError) as e:
        device_loader(grey, memory_gib=1e-4)
    message = str(e.value)
    assert "\n" not in message
    for part in ("650 images", "need 0.00062 GiB", "budget of 0.0001 GiB (data.device_memory_gib)",
                 "allow more with data.device_memory_gib", "more ranks", "data.loader = 'webdataset'"):
        assert part in message, message

    class Scarce:
        available = 100_000

    monkeypatch.setattr("data_shards.device_loader.psutil.virtual_memory", lambda: Scarce)
    with pytest.raises(ShardSetError, match="half of the available host memory"):
        device_loader(grey)
    device_loader(grey, memory_gib=0.01)  # an explicit budget overrides the automatic one


def test_truncated_shard_is_counted_and_ranks_keep_their_step_count(tmp_path):
    folder = unique_shards(tmp_path, n=600, shard_size=50)
    shard = folder / "shard-000004.tar"  # samples 200..249: rank 0's of 2
    os.truncate(shard, shard.stat().st_size // 3)
    full = device_loader(folder)
    assert 0 < full.skipped < 50 and len(full.labels) + full.skipped == 600
    batches = list(full.batches(0))
    assert len(batches) == full.steps_per_epoch(0) == 60  # topped up: some samples come twice
    seen = labels_of(batches)
    assert set(seen) == set(full.labels.tolist()) and max(seen.count(v) for v in set(seen)) == 2
    ranks = [device_loader(folder, rank=r, world=2) for r in range(2)]
    assert ranks[0].skipped == full.skipped and ranks[1].skipped == 0
    assert [len(list(ld.batches(1))) for ld in ranks] == [ld.steps_per_epoch(1) for ld in ranks] == [30, 30]


def test_undecodable_samples_are_skipped_and_counted(tmp_path):
    good = encode(np.zeros((32, 32, 1), np.uint8), "png")
    noise = encode(np.random.default_rng(0).integers(0, 256, (32, 32, 1), dtype=np.uint8), "png")
    bad = {5: b"not a png", 6: b"", 7: noise[: len(noise) // 2]}
    samples = [(f"k{i}", {"png": bad.get(i, good), "cls": b"0" if i != 9 else b"x"}) for i in range(30)]
    info = write_shard(tmp_path / "shard-000000.tar", samples)
    write_manifest(tmp_path, Manifest(source={}, transform={"resolution": 32, "channels": 1}, encoding="png",
                                      shards=[info]))
    ld = device_loader(tmp_path, batch=26)
    assert ld.skipped == 4 and len(list(ld.batches(0))) == 1
    with pytest.raises(ShardSetError, match="fewer than one batch of 27"):
        device_loader(tmp_path, batch=27)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_set_is_on_the_device_and_batches_never_wait_for_it(grey, monkeypatch):
    ld = DeviceLoader(grey, rank=0, world_size=1, batch_size=16, seed=0, channels=1, resolution=32, num_workers=2,
                      shuffle_buffer=0, device="cuda")
    assert ld.images.device.type == "cuda" and ld.labels.device.type == "cpu"
    torch.cuda.set_sync_debug_mode("error")  # any host-device sync raises, the epoch's order included
    try:
        got = list(ld.batches(0)) + list(ld.batches(1))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(got) == 2 * ld.steps_per_epoch(0) == 2 * (N // 16)
    on_cpu = device_loader(grey)
    by_label = dict(zip(on_cpu.labels.tolist(), on_cpu.images, strict=True))
    for images, labels in got:
        assert images.device.type == "cuda" and images.dtype == torch.uint8
        for image, label in zip(images.cpu(), labels.tolist(), strict=True):
            assert torch.equal(image, by_label[label])
    assert labels_of(ld.batches(2, 5)) == labels_of(list(ld.batches(2))[5:])
    monkeypatch.setattr("torch.cuda.mem_get_info", lambda *_: (100_000, 1 << 40))
    with pytest.raises(ShardSetError, match="half of the free memory of cuda:"):
        DeviceLoader(grey, rank=0, world_size=1, batch_size=16, seed=0, channels=1, resolution=32, num_workers=0,
                     shuffle_buffer=0, device="cuda")


@pytest.mark.slow
def test_training_with_the_device_loader(fashion_shards, tmp_path):
    res = run_dcgan(*tiny_train_args(fashion_shards, tmp_path / "r", "optim.max_steps=6", "data.loader=device"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "r" / "checkpoints" / "step-00000006").is_dir()

