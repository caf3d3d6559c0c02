from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Tiny nets and batches: the tests check behaviour, the benchmarks measure speed.
TINY = ["model.ngf=8", "model.ndf=8", "optim.batch_size=32", "data.shuffle_buffer=256",
        "logging.progress=false", "logging.log_every=5", "logging.sample_every=10"]


@pytest.fixture(scope="session")
def fashion_shards(tmp_path_factory) -> Path:
    """2,048 real Fashion-MNIST images at 32x32 in 8 shards."""
    from data_shards import fashion_mnist
    from data_shards.writer import write_image_shards

    out = tmp_path_factory.mktemp("fashion-32")
    samples = itertools.islice(fashion_mnist.iter_samples(split="train"), 2048)
    write_image_shards(samples, out, resolution=32, shard_size=256, source={"kind": "fashion-mnist"},
                       classes=fashion_mnist.CLASSES)
    return out


def run_dcgan(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real console entry point in a fresh interpreter, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def tiny_train_args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    args = ["train", "--config", str(ROOT / "configs" / "fashion-mnist-32.toml"),
            "--set", f"data.shards={shards}", "--set", f"logging.run_dir={run_dir}"]
    for item in (*TINY, *extra):
        args += ["--set", item]
    return args
