"""The DALI loader on CPU (device_id=None): the same pixels as the WebDataset path."""

import numpy as np
import pytest
import torch
from conftest import ArraySource, run_dcgan, tiny_train_args

from data_shards.convert import ConvertOptions, convert_source
from data_shards.loaders import open_loader, to_model_input

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is installed with the dev extra")


@pytest.fixture(scope="module", params=["png", "jpeg", "raw"])
def rgb_shards(request, tmp_path_factory):
    images = np.random.default_rng(0).integers(0, 255, (240, 48, 40, 3), dtype=np.uint8)
    images = (images // 32 * 32).astype(np.uint8)  # blocky images keep JPEG's differences small
    out = tmp_path_factory.mktemp(f"rgb-{request.param}")
    convert_source(ArraySource(images), out, ConvertOptions(resolution=32, channels=3, shard_size=40, workers=2,
                                                            encoding=request.param), progress=False)
    return out, request.param


def by_label(kind, folder, rank=0, world=1, start=0, batch=8):
    ld = open_loader(kind, folder, rank=rank, world_size=world, batch_size=batch, seed=0, channels=3,
                     resolution=32, num_workers=2, shuffle_buffer=64, device="cpu")
    out = {}
    for images, labels in ld.batches(0, start):
        assert images.shape[1:] == (32, 32, 3) and images.dtype == torch.uint8
        for image, label in zip(to_model_input(images), labels.tolist(), strict=True):
            out[label] = image
    return out, ld


def test_dali_matches_webdataset_preprocessing(rgb_shards):
    folder, encoding = rgb_shards
    dali, ld = by_label("dali", folder)
    wds, _ = by_label("webdataset", folder)
    assert len(dali) == ld.steps_per_epoch(0) * 8 == 240 and dali.keys() == wds.keys()
    worst = max((dali[k] - wds[k]).abs().max().item() for k in dali)
    # lossless encodings decode to the same pixels (float rounding aside); JPEG decoders may
    # differ by a few levels
    assert worst <= (1e-6 if encoding != "jpeg" else 8 / 127.5), worst
    values = torch.stack(list(dali.values()))
    assert values.min() >= -1 and values.max() <= 1


def test_dali_two_ranks_are_disjoint_and_complete(rgb_shards):
    folder, _ = rgb_shards
    r0, _ = by_label("dali", folder, rank=0, world=2)
    r1, _ = by_label("dali", folder, rank=1, world=2)
    assert not (r0.keys() & r1.keys()) and len(r0) + len(r1) == 240


def test_dali_resume_mid_epoch(rgb_shards):
    folder, _ = rgb_shards
    kw = dict(rank=0, world_size=1, batch_size=8, seed=0, channels=3, resolution=32, num_workers=1,
              shuffle_buffer=64, device="cpu")
    full = [labels.tolist() for _, labels in open_loader("dali", folder, **kw).batches(0)]
    tail = [labels.tolist() for _, labels in open_loader("dali", folder, **kw).batches(0, 11)]
    assert tail == full[11:]


def test_training_with_the_dali_loader(fashion_shards, tmp_path):
    res = run_dcgan(*tiny_train_args(fashion_shards, tmp_path / "r", "optim.max_steps=6", "data.loader=dali"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "r" / "checkpoints" / "step-00000006").is_dir()
