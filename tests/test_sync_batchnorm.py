"""model.sync_batchnorm on gloo: two ranks, each with half a batch, normalise, train and keep
running statistics exactly as one process with the whole batch does."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from trainer.sync_batchnorm import GlobalBatchNorm2d, synchronise_batchnorm

CHANNELS, BATCH = 4, 16


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, CHANNELS, 5, 5, generator=generator) * 3 + 1
    weights = torch.randn(BATCH, CHANNELS, 5, 5, generator=generator)  # makes the loss depend on every output
    return x, weights


def _batchnorm() -> nn.BatchNorm2d:
    norm = nn.BatchNorm2d(CHANNELS)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, CHANNELS))
        norm.bias.copy_(torch.linspace(-1, 1, CHANNELS))
    return norm


def _rank(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    x, weights = _inputs()
    half = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
    norm = synchronise_batchnorm(nn.Sequential(_batchnorm()), torch.device("cpu"))[0]
    assert type(norm) is GlobalBatchNorm2d
    mine = x[half].clone().requires_grad_(True)
    for _ in range(2):  # two steps: the running statistics' update rule too
        y = norm(mine)
    (y * weights[half]).sum().backward()
    torch.save({"y": y.detach(), "x_grad": mine.grad, "weight_grad": norm.weight.grad, "bias_grad": norm.bias.grad,
                "state": norm.state_dict()}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_normalise_and_learn_as_one_global_batch(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    x, weights = _inputs()
    whole = x.clone().requires_grad_(True)
    norm = _batchnorm()
    for _ in range(2):
        y = norm(whole)
    (y * weights).sum().backward()

    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), whole.grad, rtol=1e-4, atol=1e-5)
    # each rank's parameter gradient is its share; DeepSpeed's all-reduce adds them up
    torch.testing.assert_close(ranks[0]["weight_grad"] + ranks[1]["weight_grad"], norm.weight.grad, rtol=1e-4,
                               atol=1e-4)
    torch.testing.assert_close(ranks[0]["bias_grad"] + ranks[1]["bias_grad"], norm.bias.grad, rtol=1e-4, atol=1e-4)
    for key, value in norm.state_dict().items():
        for r in ranks:  # the same statistics on both ranks, those of the whole batch, under the same keys
            torch.testing.assert_close(r["state"][key], value, rtol=1e-5, atol=1e-6)


def test_one_process_and_eval_mode_are_plain_batchnorm():
    x, _ = _inputs()
    plain = _batchnorm()
    synced = synchronise_batchnorm(nn.Sequential(_batchnorm()), torch.device("cpu"))[0]
    torch.testing.assert_close(synced(x), plain(x))
    plain.eval(), synced.eval()
    torch.testing.assert_close(synced(x), plain(x))
