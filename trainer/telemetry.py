"""Prometheus metrics of one rank, served over HTTP and announced in a file_sd targets file.

Every rank serves its own /metrics (base port + local rank; a busy port moves to the next free
one), labelled with run, rank and node, so Prometheus sees each rank and sums them. Values the
loop already reduces to host numbers once per log window (losses, D outputs, gradient norms)
are set then; per-step observations (step and data-wait durations, images) are host floats
the loop has anyway. Nothing here adds a device synchronisation to the step.

Each rank writes `<targets_dir>/<run>-rank-XXXXX.json` (Prometheus file_sd format) atomically
when it starts serving and removes it when it stops, so a Prometheus whose file_sd_configs
watch `<targets_dir>/*.json` finds every rank of every run on every node with no edits.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from common.atomic import atomic_write_bytes
from trainer.config import MetricsConfig

PORT_ATTEMPTS = 100
# step and data-wait durations from ~1 ms (a big GPU, tiny batch) to a minute (CPU, paper widths)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SAVE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
LABELS = ("run", "rank", "node")


def targets_dir(cfg: MetricsConfig, run_dir: str | Path) -> Path:
    """Default: beside the run folder, shared by every run under the same parent (runs/)."""
    return Path(cfg.targets_dir) if cfg.targets_dir else Path(run_dir).resolve().parent / "prometheus-targets"


def advertised_host(bind_host: str) -> str:
    """The address Prometheus should scrape: the bind address, or this node's outward one."""
    if bind_host not in ("0.0.0.0", "::", ""):
        return bind_host
    peer = os.environ.get("MASTER_ADDR", "10.255.255.255")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((peer, 1))  # UDP: no packet is sent; the kernel just picks the route's source address
            return s.getsockname()[0]
        except OSError:
            return socket.gethostname()


class RankMetrics:
    """The metrics one rank exports. `None`-safe: a disabled exporter is `NoMetrics`."""

    def __init__(self, cfg: MetricsConfig, run: str, rank: int, local_rank: int, run_dir: str | Path):
        self.registry = CollectorRegistry(auto_describe=True)
        self.labels = {"run": run, "rank": str(rank), "node": socket.gethostname()}

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, LABELS + extra, registry=self.registry)

        self.images = Counter("dcgan_images", "Training images processed by this rank", LABELS,
                              registry=self.registry).labels(**self.labels)
        self.skipped_samples = Counter("dcgan_skipped_samples", "Corrupt or undecodable samples skipped",
                                       LABELS, registry=self.registry).labels(**self.labels)
        self.skipped_steps = Counter("dcgan_skipped_steps", "Steps dropped for a non-finite loss", LABELS,
                                     registry=self.registry).labels(**self.labels)
        self.checkpoints = Counter("dcgan_checkpoints", "Checkpoints saved", LABELS,
                                   registry=self.registry).labels(**self.labels)
        self.step_seconds = Histogram("dcgan_step_seconds", "Wall time of one training step (without data wait)",
                                      LABELS, buckets=STEP_BUCKETS, registry=self.registry).labels(**self.labels)
        self.data_wait_seconds = Histogram("dcgan_data_wait_seconds", "Wait for the next batch before a step",
                                           LABELS, buckets=STEP_BUCKETS, registry=self.registry).labels(**self.labels)
        self.save_seconds = Histogram("dcgan_checkpoint_save_seconds", "Wall time of one checkpoint save",
                                      LABELS, buckets=SAVE_BUCKETS, registry=self.registry).labels(**self.labels)
        self.throughput = gauge("dcgan_images_per_second", "Global images per second over the last log window")
        self.loss = gauge("dcgan_loss", "Mean loss over the last log window", ("net",))
        self.d_output = gauge("dcgan_d_output", "Mean D probability over the last log window: real = D(x), "
                                                "fake = D(G(z)) before D's update, fake_after = after it", ("input",))
        self.grad_norm = gauge("dcgan_grad_norm", "Mean global gradient L2 norm over the last log window", ("net",))
        self.learning_rate = gauge("dcgan_learning_rate", "Current learning rate", ("net",))
        self.loss_scale = gauge("dcgan_loss_scale", "fp16 loss scale (1 without loss scaling)", ("net",))
        self.memory = gauge("dcgan_memory_bytes", "Memory in use: host resident set, and CUDA allocated/peak",
                            ("kind",))
        self.restarts = gauge("dcgan_restarts", "Times this run was resumed from a checkpoint "
                                                "(worker-group restarts and continued runs)")
        self.fid = gauge("dcgan_fid", "FID of eval.fid_samples generated images against the reference shards")
        self.kid = gauge("dcgan_kid", "KID (unbiased MMD^2, cubic kernel) of the same samples")
        self.epoch = gauge("dcgan_epoch", "Current epoch")
        self.step = gauge("dcgan_step", "Optimiser steps completed")

        self._skipped_seen = 0
        self.host = advertised_host(cfg.host)
        self.port, self.server = self._serve(cfg.host, cfg.port + local_rank)
        self.targets_file = targets_dir(cfg, run_dir) / f"{run}-rank-{rank:05d}.json"
        try:
            self._announce()
        except OSError:
            self.server.shutdown()
            self.server.server_close()
            raise

    # --- serving -------------------------------------------------------------------------------------
    def _serve(self, host: str, first_port: int) -> tuple[int, Any]:
        for port in range(first_port, first_port + PORT_ATTEMPTS):
            try:
                server, _ = start_http_server(port, addr=host, registry=self.registry)
            except OSError:
                continue
            if port != first_port:
                print(f"metrics: port {first_port} is busy; rank {self.labels['rank']} serves on {host}:{port}",
                      file=sys.stderr, flush=True)
            return port, server
        raise OSError(f"no free port in {first_port}-{first_port + PORT_ATTEMPTS - 1} on {host}")

    def _announce(self) -> None:
        entry = [{"targets": [f"{self.host}:{self.port}"], "labels": {"job": "dcgan", **self.labels}}]
        self.targets_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.targets_file, json.dumps(entry).encode())  # Prometheus never reads half a file

    def close(self) -> None:
        self.targets_file.unlink(missing_ok=True)
        self.server.shutdown()
        self.server.server_close()

    # --- what the loop reports -------------------------------------------------------------------
    def on_step(self, images: int, step_s: float, wait_s: float) -> None:
        self.images.inc(images)
        self.step_seconds.observe(step_s)
        self.data_wait_seconds.observe(wait_s)

    def on_skipped_step(self) -> None:
        self.skipped_steps.inc()

    def on_checkpoint(self, seconds: float) -> None:
        self.checkpoints.inc()
        self.save_seconds.observe(seconds)

    def on_window(self, summary: Mapping[str, float], step: int, epoch: int, restarts: int, skipped_samples: int,
                  learning_rates: Mapping[str, float], loss_scales: Mapping[str, float]) -> None:
        lab = self.labels
        self.throughput.labels(**lab).set(summary["img_per_s"])
        for net in ("d", "g"):
            self.loss.labels(**lab, net=net).set(summary[f"loss_{net}"])
            self.grad_norm.labels(**lab, net=net).set(summary[f"grad_norm_{net}"])
        for which in ("real", "fake", "fake_after"):
            self.d_output.labels(**lab, input=which).set(summary[f"d_{which}"])
        for net, lr in learning_rates.items():
            self.learning_rate.labels(**lab, net=net).set(lr)
        for net, scale in loss_scales.items():
            self.loss_scale.labels(**lab, net=net).set(scale)
        if skipped_samples > self._skipped_seen:  # the loader counts in total; the counter takes increments
            self.skipped_samples.inc(skipped_samples - self._skipped_seen)
            self._skipped_seen = skipped_samples
        self.step.labels(**lab).set(step)
        self.epoch.labels(**lab).set(epoch)
        self.restarts.labels(**lab).set(restarts)
        for kind, value in memory_in_use().items():
            self.memory.labels(**lab, kind=kind).set(value)


    def on_quality(self, scores: Mapping[str, float]) -> None:
        self.fid.labels(**self.labels).set(scores["fid"])
        self.kid.labels(**self.labels).set(scores["kid"])


class NoMetrics:
    """metrics.enabled = false: the same calls, nothing served."""

    port = None

    def on_step(self, images: int, step_s: float, wait_s: float) -> None: ...
    def on_skipped_step(self) -> None: ...
    def on_checkpoint(self, seconds: float) -> None: ...
    def on_window(self, *args: Any, **kwargs: Any) -> None: ...
    def on_quality(self, scores: Mapping[str, float]) -> None: ...
    def close(self) -> None: ...


def memory_in_use() -> dict[str, float]:
    import resource

    import torch

    # ru_maxrss is the peak (KiB on Linux); the current RSS comes from /proc where there is one
    try:
        rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"host_rss": float(rss)}
    if torch.cuda.is_available():
        out["cuda_allocated"] = float(torch.cuda.memory_allocated())
        out["cuda_peak"] = float(torch.cuda.max_memory_allocated())
    return out


def open_metrics(cfg: MetricsConfig, run: str, rank: int, local_rank: int, run_dir: str | Path
                 ) -> RankMetrics | NoMetrics:
    """The rank's exporter; training goes on without one if it cannot serve or announce itself."""
    if not cfg.enabled:
        return NoMetrics()
    try:
        return RankMetrics(cfg, run, rank, local_rank, run_dir)
    except OSError as e:
        print(f"metrics: rank {rank} trains without metrics: {e}", file=sys.stderr, flush=True)
        return NoMetrics()
