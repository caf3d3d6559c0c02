from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

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

# What points Ray's clients at a running cluster, or makes `dcgan` believe it runs inside a Ray job. Set in the
# shell that runs the tests, they would send the tests' own Ray runs (a private local Ray, or the loopback head
# they start) to someone's cluster, or change how `dcgan` sets them up; every Ray the tests use is their own.
RAY_REDIRECTS = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR")
for _name in RAY_REDIRECTS:
    os.environ.pop(_name, None)

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


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without the Ray redirects (a test may have set one since), plus `env`."""
    return {**{k: v for k, v in os.environ.items() if k not in RAY_REDIRECTS}, **(env or {})}


def run_dcgan(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real console entry point in a fresh interpreter, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "dcgan", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=child_env(env))


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


def engine_state(checkpoint: Path, tag: str) -> dict:
    """Everything DeepSpeed saved for one engine: weights, Adam state, step counters."""
    from trainer.checkpoint_io import safe_load

    path = next((checkpoint / tag).glob("mp_rank_*_model_states.pt"))
    return safe_load(path)


def model_state(checkpoint: Path, tag: str) -> dict:
    return engine_state(checkpoint, tag)["module"]


def zero_optimizer_states(checkpoint: Path, tag: str) -> dict[str, Any]:
    """Each ZeRO partition's optimiser file (Adam moments and step, fp32 master weights), by file name:
    under ZeRO 1/2 the model-states file holds no optimiser state at all."""
    from trainer.checkpoint_io import safe_load

    return {p.name: safe_load(p) for p in sorted((checkpoint / tag).glob("zero_pp_rank_*_optim_states.pt"))}


def _tensor_difference(a: torch.Tensor, b: torch.Tensor, exact: bool, atol: float) -> str | None:
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"{a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
    floating = a.is_floating_point() or a.is_complex()
    if exact or not floating:  # counters and indices are never "close"
        if torch.equal(a, b):
            return None
        if floating:  # NaN where the other has NaN is the same state
            nan_a, nan_b = a.isnan(), b.isnan()
            if torch.equal(nan_a, nan_b) and torch.equal(a[~nan_a], b[~nan_b]):
                return None
        return "differs" if floating or exact else "differs (an integer tensor: compared exactly)"
    if torch.allclose(a, b, atol=atol, rtol=0, equal_nan=True):
        return None
    return f"max |a - b| = {(a.double() - b.double()).abs().nan_to_num(math.inf).max().item():.3g} > atol {atol:g}"


def assert_same(a: Any, b: Any, exact: bool = True, atol: float = 0.0, path: str = "") -> None:
    """`a` equals `b` through nested dicts, lists and tuples, leaf by leaf; nothing is skipped.

    Floating tensors and floats: equal, or within `atol` when not `exact`. Integer and bool tensors,
    ints, bools, strings, bytes and None: always equal (step counters must match, not be close). Any
    other type fails, naming where it sits, rather than passing unchecked.
    """
    where = path or "<top>"
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: a tensor against a {type(b).__name__}"
        difference = _tensor_difference(a, b, exact, atol)
        assert difference is None, f"{where}: {difference}"
    elif isinstance(a, dict):
        assert isinstance(b, dict), f"{where}: a dict against a {type(b).__name__}"
        assert a.keys() == b.keys(), f"{where}: keys differ: {sorted(map(str, a.keys() ^ b.keys()))}"
        for key in a:
            assert_same(a[key], b[key], exact, atol, f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)), f"{where}: a {type(a).__name__} against a {type(b).__name__}"
        assert len(a) == len(b), f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, exact, atol, f"{path}[{i}]")
    elif isinstance(a, float):
        assert isinstance(b, float), f"{where}: {a!r} vs {b!r}"
        same = a == b or (math.isnan(a) and math.isnan(b)) or (not exact and abs(a - b) <= atol)
        assert same, f"{where}: {a!r} vs {b!r}" + ("" if exact else f" (atol {atol:g})")
    elif isinstance(a, int):  # bools, and enums built on int (ZeroStageEnum), too
        assert isinstance(b, int) and isinstance(a, bool) == isinstance(b, bool) and a == b, f"{where}: {a!r} vs {b!r}"
    elif a is None or isinstance(a, (str, bytes)):
        assert type(a) is type(b) and a == b, f"{where}: {a!r} vs {b!r}"
    elif type(a).__module__.startswith("deepspeed.") and hasattr(a, "__dict__"):
        # the record classes of DeepSpeed's that checkpoint_io lets a checkpoint hold (its loss scaler): plain
        # attribute bags without __eq__, so their attributes are compared
        assert type(b) is type(a), f"{where}: a {type(a).__name__} against a {type(b).__name__}"
        assert_same(vars(a), vars(b), exact, atol, f"{path}.__dict__")
    else:
        raise AssertionError(f"{where}: assert_same cannot compare a {type(a).__module__}.{type(a).__qualname__}")


def checkpoint_files(checkpoint: Path) -> list[str]:
    """Every file in a checkpoint folder, relative to it."""
    return sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file())


def assert_same_checkpoint(a: Path, b: Path, exact: bool = True, atol: float = 0.0,
                           restarts: tuple[int, int] = (0, 1)) -> None:
    """Checkpoint folders `a` (say an uninterrupted run's) and `b` (a resumed one's) hold the same files, and each
    file the same state leaf by leaf (assert_same): every engine's weights, Adam state and counters, ZeRO's
    partition files, every rank file's RNG states and loss scalers, trainer.json's counters and config.

    `exact` / `atol` apply to the .pt files' floating tensors. trainer.json holds no wall-clock field; it is
    compared exactly but for what differs by design: `restarts` (must be `restarts`: the runs' resumes) and
    config.logging.run_dir (each run's own folder). Any other file is compared byte for byte.
    """
    from trainer.checkpoint_io import safe_load

    files = checkpoint_files(a)
    assert files == checkpoint_files(b), f"{a} and {b} hold different files"
    assert "trainer.json" in files and any(name.endswith(".pt") for name in files), files
    for name in files:
        if name.endswith(".pt"):
            assert_same(safe_load(a / name), safe_load(b / name), exact, atol, name)
        elif name == "trainer.json":
            metas = [json.loads((c / name).read_text()) for c in (a, b)]
            assert (metas[0].pop("restarts"), metas[1].pop("restarts")) == restarts, f"{name}: restarts"
            for meta in metas:
                meta["config"]["logging"].pop("run_dir")
            assert_same(metas[0], metas[1], path=name)
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs"


@pytest.fixture(scope="session")
def trained_run(fashion_shards, tmp_path_factory):
    """An eager fp32 run of 30 steps with checkpoints at 20 and 30, which several tests compare against."""
    run = tmp_path_factory.mktemp("run") / "r"
    res = run_dcgan(*tiny_train_args(fashion_shards, run, "optim.max_steps=30", "checkpoint.every_steps=10",
                                     "checkpoint.keep_last=2", "precision.dtype=fp32"))
    assert res.returncode == 0, res.stderr[-3000:]
    return run
