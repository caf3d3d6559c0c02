"""Run configuration: dataclasses whose defaults are the paper's, TOML presets, CLI overrides.

Every value is checked once, here, so the rest of the trainer can trust it: an unknown key
names the valid keys, a bad value names the allowed range.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration key or value the trainer cannot use."""


@dataclass
class ModelConfig:
    resolution: int = 64  # the paper's LSUN images
    channels: int = 3
    z_dim: int = 100
    z_dist: str = "uniform"  # the paper samples z uniformly; pytorch/examples uses "normal"
    ngf: int = 64  # G's last hidden width; the projection has ngf * 2**(layers-1) channels
    ndf: int = 64
    init_std: float = 0.02
    # G's conv-transpose + BatchNorm + ReLU blocks as fused Triton kernels where CUDA is present
    # (the PyTorch blocks otherwise); same parameters and state_dict either way
    fused_kernels: bool = False
    # the step's networks and optimiser steps under torch.compile: inductor's fused kernels, and on
    # CUDA graphs that replay a network's kernels with one launch (the host, not the GPU, bounds a
    # DCGAN step there); costs a compilation at start (tens of seconds)
    compile: bool = False
    # BatchNorm over the global batch rather than each rank's share (trainer/sync_batchnorm.py): with
    # N ranks, per-rank BN normalises over batch_size / N images, the paper's over 128
    sync_batchnorm: bool = False


@dataclass
class DataConfig:
    shards: str = "data/fashion-mnist-32"  # a folder holding manifest.json and the tar shards
    loader: str = "webdataset"  # webdataset | dali | device (the rank's part of the set held in device memory)
    num_workers: int = 1
    shuffle_buffer: int = 5000
    # what data.loader = "device" may hold, in GiB; 0: half of the device's free memory (host RAM on a CPU)
    device_memory_gib: float = 0.0


@dataclass
class OptimConfig:
    batch_size: int = 128  # global: split evenly across ranks
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    epochs: int = 25
    max_steps: int = 0  # > 0 stops there instead of after `epochs`
    seed: int = 0

    def rank_batch(self, ranks: int) -> int:
        """Each rank's share of the global batch (ConfigError where it does not split evenly)."""
        if self.batch_size % ranks:
            raise ConfigError(f"optim.batch_size = {self.batch_size} does not split evenly over {ranks} ranks")
        return self.batch_size // ranks


@dataclass
class PrecisionConfig:
    # auto | fp32 | bf16 | fp16; auto: what this machine runs fast (trainer/precision.py), and the run
    # records what it resolved to. fp16: CUDA only, one loss scaler per engine
    dtype: str = "auto"
    zero_stage: int = 0


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    keep_last: int = 3
    on_nonfinite: str = "stop"  # stop | skip


CHECKPOINTS = "checkpoints"  # a run folder's checkpoints: RUN/checkpoints/step-XXXXXXXX


@dataclass
class LoggingConfig:
    run_dir: str = "runs/dcgan"
    log_every: int = 10
    sample_every: int = 200
    progress: bool = True


@dataclass
class MetricsConfig:
    """Prometheus metrics served by every rank (trainer/telemetry.py)."""

    enabled: bool = True
    host: str = "127.0.0.1"  # bind address; on a cluster "0.0.0.0" (the node's address is announced)
    port: int = 9520  # rank r serves on port + local rank, or the next free port above it
    targets_dir: str = ""  # file_sd targets for Prometheus; "": <run_dir>/../prometheus-targets


@dataclass
class EvalConfig:
    """Sample quality measured while training, on rank 0 (the other ranks wait at their next step)."""

    fid_every: int = 0  # steps between FID/KID measurements; 0: never (InceptionV3: ~0.5 s per image on a CPU)
    fid_samples: int = 1000  # generated images per measurement, and reference images (cached per shard set)
    fid_reference: str = ""  # the shard set to compare with; "": data.shards


@dataclass
class ClusterConfig:
    """Where the ranks run when training goes through Ray (the trainer itself never reads this)."""

    workers: int = 0  # 0: one per GPU in the cluster; on CPU-only clusters one per node
    cpus_per_worker: float = 0.0  # 0: the node's CPUs shared evenly by its workers
    gpus_per_worker: float = -1.0  # -1: 1 if the cluster has GPUs, else 0
    max_failures: int = 3  # worker-group restarts from the newest checkpoint before giving up
    storage_path: str = ""  # "": the run folder; or shared storage, e.g. /mnt/nfs/runs/x or s3://bucket/runs/x


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


# name -> (predicate, description of the allowed values)
_CHECKS: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "model.resolution": (lambda v: v in (32, 64, 128), "one of 32, 64, 128"),
    "model.channels": (lambda v: v in (1, 3), "1 or 3"),
    "model.z_dim": (lambda v: v >= 1, ">= 1"),
    "model.z_dist": (lambda v: v in ("uniform", "normal"), "'uniform' or 'normal'"),
    "model.ngf": (lambda v: v >= 1, ">= 1"),
    "model.ndf": (lambda v: v >= 1, ">= 1"),
    "model.init_std": (lambda v: v > 0, "> 0"),
    "data.loader": (lambda v: v in ("webdataset", "dali", "device"), "'webdataset', 'dali' or 'device'"),
    "data.device_memory_gib": (lambda v: v >= 0, ">= 0 (0: half of the free memory)"),
    "data.num_workers": (lambda v: v >= 0, ">= 0"),
    "data.shuffle_buffer": (lambda v: v >= 0, ">= 0"),
    "optim.batch_size": (lambda v: v >= 1, ">= 1"),
    "optim.lr": (lambda v: 0 < v < 1, "in (0, 1)"),
    "optim.beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optim.beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optim.epochs": (lambda v: v >= 1, ">= 1"),
    "optim.max_steps": (lambda v: v >= 0, ">= 0 (0: run `epochs`)"),
    "precision.dtype": (lambda v: v in ("auto", "fp32", "bf16", "fp16"), "one of 'auto', 'fp32', 'bf16', 'fp16'"),
    "precision.zero_stage": (lambda v: v in (0, 1, 2), "0, 1 or 2"),
    "checkpoint.every_steps": (lambda v: v >= 1, ">= 1"),
    "checkpoint.keep_last": (lambda v: v >= 1, ">= 1"),
    "checkpoint.on_nonfinite": (lambda v: v in ("stop", "skip"), "'stop' or 'skip'"),
    "logging.log_every": (lambda v: v >= 1, ">= 1"),
    "logging.sample_every": (lambda v: v >= 1, ">= 1"),
    "metrics.port": (lambda v: 1024 <= v <= 65535 - 100, "in [1024, 65435] (ranks take the ports above it)"),
    "eval.fid_every": (lambda v: v >= 0, ">= 0 (0: never)"),
    "eval.fid_samples": (lambda v: v >= 4, ">= 4 (KID compares pairs within subsets of half the samples)"),
    "cluster.workers": (lambda v: v >= 0, ">= 0 (0: automatic)"),
    "cluster.cpus_per_worker": (lambda v: v >= 0, ">= 0 (0: automatic)"),
    "cluster.gpus_per_worker": (lambda v: v == -1 or v >= 0, ">= 0, or -1 for automatic"),
    "cluster.max_failures": (lambda v: v >= -1, ">= 0, or -1 for unlimited restarts"),
}


def _sections() -> dict[str, type]:
    return {f.name: f.type if isinstance(f.type, type) else globals()[f.type] for f in dataclasses.fields(Config)}


def _valid_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in _sections().items() for f in dataclasses.fields(cls)]


def _coerce(key: str, value: Any, annotation: str) -> Any:
    expected = {"int": int, "float": float, "str": str, "bool": bool}[annotation]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        raise ConfigError(f"{key} must be {annotation}, got {value!r}")
    return value


def _set(cfg: Config, key: str, value: Any) -> None:
    section, _, name = key.partition(".")
    sections = _sections()
    if section not in sections or name not in {f.name for f in dataclasses.fields(sections[section])}:
        raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(_valid_keys())}")
    annotation = {f.name: f.type for f in dataclasses.fields(sections[section])}[name]
    value = _coerce(key, value, annotation)
    check = _CHECKS.get(key)
    if check and not check[0](value):
        raise ConfigError(f"{key} = {value!r} is out of range: must be {check[1]}")
    setattr(getattr(cfg, section), name, value)


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare words such as bf16 or a path are strings
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Paper defaults, then the TOML preset at `path`, then `section.key=value` overrides."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"--config {path} is a folder; give a TOML file, e.g. configs/fashion-mnist-32.toml")
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section]; "
                                  f"sections: {', '.join(_sections())}")
            for name, value in values.items():
                _set(cfg, f"{section}.{name}", value)
    for text in overrides:
        _set(cfg, *_parse_override(text))
    return cfg


def config_from_dict(data: dict[str, dict[str, Any]]) -> Config:
    """Rebuild a Config saved with `to_dict` (e.g. the one stored beside a checkpoint)."""
    cfg = Config()
    for section, values in data.items():
        for name, value in values.items():
            _set(cfg, f"{section}.{name}", value)
    return cfg


def to_toml(cfg: Config) -> str:
    lines: list[str] = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for name, value in values.items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, str):
                text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
            else:
                text = repr(value)
            lines.append(f"{name} = {text}")
        lines.append("")
    return "\n".join(lines)
