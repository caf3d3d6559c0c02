from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# this interpreter's tools first, for every subprocess (dcgan, ray, torchrun), as `make test` sets it:
# DeepSpeed JIT-builds with the first ninja on PATH and rebuilds whenever that changes
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

# Triton kernels run on CPU tensors through Triton's interpreter; it must be chosen before any
# kernel is defined. With a GPU they run compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tiny nets and batches: the tests check behaviour, the benchmarks measure speed.
TINY = ["model.ngf=8", "model.ndf=8", "optim.batch_size=32", "data.shuffle_buffer=256",
        "logging.progress=false", "logging.log_every=5", "logging.sample_every=10"]


@pytest.fixture(scope="session")
def fashion_shards(tmp_path_factory) -> Path:
    """2,048 real Fashion-MNIST images at 32x32 in 8 shards."""
    from data_shards.convert import ConvertOptions, convert

    out = tmp_path_factory.mktemp("fashion-32")
    convert("fashion-mnist", None, out, ConvertOptions(resolution=32, channels=1, shard_size=256, limit=2048),
            progress=False)
    return out


class ArraySource:
    """An in-memory source of (key, pixels, label) for tests; label = index unless given."""

    kind = "arrays"
    classes: list[str] = []

    def __init__(self, images, labels=None, values=None):
        self.images, self.labels, self.values = images, labels, values or {}
        self.keys = [f"k{i:06d}" for i in range(len(images))]

    def describe(self):
        return {"kind": self.kind, "n": len(self.images)}

    def scan_keys(self):
        yield from self.keys

    def read(self, first_key, count):
        start = self.keys.index(first_key)
        for i in range(start, min(start + count, len(self.keys))):
            value = self.values.get(i, self.images[i])
            yield self.keys[i], value, int(self.labels[i]) if self.labels is not None else i


def run_dcgan(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real console entry point in a fresh interpreter, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def tiny_train_args(shards: Path, run_dir: Path, *extra: str, launcher: str = "torchrun") -> list[str]:
    """A short training on tiny nets; torchrun (this process, or --nproc ranks) unless told otherwise."""
    args = ["train", "--launcher", launcher, "--config", str(ROOT / "configs" / "fashion-mnist-32.toml"),
            "--set", f"data.shards={shards}", "--set", f"logging.run_dir={run_dir}"]
    for item in (*TINY, *extra):
        args += ["--set", item]
    return args


@pytest.fixture(scope="session")
def lsun_lmdb(tmp_path_factory):
    """An LSUN-format LMDB (WebP values, 256 px shorter side) with planted extras."""
    from data_shards.sample_lsun import build_sample_lsun

    path = tmp_path_factory.mktemp("lsun") / "bedroom_train_lmdb"
    planted = build_sample_lsun(path, 600, near_duplicates=60, exact_duplicates=6, corrupt=6)
    return path, planted


def engine_state(checkpoint, tag):
    """Everything DeepSpeed saved for one engine: weights, Adam state, step counters."""
    from trainer.checkpoint_io import safe_load

    path = next((checkpoint / tag).glob("mp_rank_*_model_states.pt"))
    return safe_load(path)


def model_state(checkpoint, tag):
    return engine_state(checkpoint, tag)["module"]


def assert_same(a, b, exact=True, atol=0.0):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b) if exact else torch.allclose(a.float(), b.float(), atol=atol, rtol=0)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            if k not in ("ds_config", "ds_version"):
                assert_same(a[k], b[k], exact, atol)
    elif isinstance(a, (list, tuple)):
        for x, y in zip(a, b, strict=True):
            assert_same(x, y, exact, atol)


@pytest.fixture(scope="session")
def trained_run(fashion_shards, tmp_path_factory):
    """An eager fp32 run of 30 steps with checkpoints at 20 and 30, which several tests compare against."""
    run = tmp_path_factory.mktemp("run") / "r"
    res = run_dcgan(*tiny_train_args(fashion_shards, run, "optim.max_steps=30", "checkpoint.every_steps=10",
                                     "checkpoint.keep_last=2", "precision.dtype=fp32"))
    assert res.returncode == 0, res.stderr[-3000:]
    return run
