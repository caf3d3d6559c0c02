"""`dcgan train` (on a Ray worker group, or torchrun ranks on this machine) and `dcgan monitor`."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

from cluster.stop_signals import stopped_by
from common.arguments import Checked, integer, non_negative_int, positive_int, readable_path

TORCHRUN_GRACE_S = 45.0  # torchrun gives its ranks 30 s after relaying the signal, then kills them


def user_errors() -> tuple[type[BaseException], ...]:
    """What these commands raise for bad input: one line, not a traceback."""
    from cluster.monitor import MonitorError
    from cluster.ray_launch import ClusterError
    from common.ray_address import RayUnreachable
    from trainer.checkpoint_io import CheckpointError
    from trainer.config import ConfigError
    from trainer.step import NonFiniteLoss

    return ConfigError, CheckpointError, NonFiniteLoss, ClusterError, RayUnreachable, MonitorError


def cmd_train(args: argparse.Namespace) -> int:
    from trainer.config import ConfigError, load_config

    if args.launcher == "ray" and args.nproc > 1:
        raise ConfigError("--nproc counts torchrun ranks; with Ray (the default launcher) use --workers N")
    in_launched_rank = "RANK" in os.environ  # started by torchrun, the deepspeed launcher or Ray
    if args.launcher == "torchrun" and args.nproc > 1 and not in_launched_rank:
        return _relaunch_under_torchrun(args)

    overrides = [*args.set, *([f"cluster.workers={args.workers}"] if args.workers else [])]
    cfg = load_config(args.config, overrides)
    if args.launcher == "ray" and not in_launched_rank:
        from cluster.ray_launch import train_on_ray

        metrics = train_on_ray(cfg, args.resume, args.address)
        print(f"done: {metrics.get('step')} steps, run folder {cfg.logging.run_dir}")
        return 0
    return _train_here(cfg, args.resume)


def _relaunch_under_torchrun(args: argparse.Namespace) -> int:
    argv, skip = [], False
    for a in args.argv:
        if skip or a.startswith("--nproc="):
            skip = False
            continue
        skip = a == "--nproc"
        if not skip:
            argv.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "dcgan", *argv]
    # its own process group, so a terminal's Ctrl-C reaches it once, relayed by us: a second signal in the middle
    # of its shutdown makes torchrun exit without waiting for its ranks
    launcher = subprocess.Popen(cmd, process_group=0)
    try:
        return launcher.wait()
    except KeyboardInterrupt:
        _stop_launcher(launcher, stopped_by())
        raise


def _stop_launcher(launcher: subprocess.Popen, signum: int) -> None:
    """Relay the stop signal to torchrun (which relays it to the ranks and waits for them); kill what is left."""
    import psutil

    try:
        tree = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    if launcher.poll() is None:
        launcher.send_signal(signum)
    try:
        launcher.wait(timeout=TORCHRUN_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    for process in tree:  # psutil.Process refuses to signal a PID that was reused since
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    launcher.wait()


def _train_here(cfg, resume: str | None) -> int:
    """This process is the rank (a single process, or one rank under torchrun / deepspeed)."""
    from data_shards.manifest import read_manifest_for
    from trainer.checkpoint import checkpoint_to_resume, list_checkpoints
    from trainer.config import CHECKPOINTS
    from trainer.loop import Trainer

    # a typo in a path fails here, in a second, not after the ranks and engines are up
    start = checkpoint_to_resume(resume, list_checkpoints(Path(cfg.logging.run_dir) / CHECKPOINTS),
                                 cfg.logging.run_dir)
    read_manifest_for(cfg.data.shards, cfg.model.resolution, cfg.model.channels)
    trainer = Trainer(cfg)
    if start:
        trainer.resume(start)
    state = trainer.fit()
    if trainer.ctx.is_main:
        print(f"done: {state.step} steps, run folder {cfg.logging.run_dir}")
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    from cluster.monitor import start_prometheus, stop_prometheus, write_config
    from trainer.config import load_config
    from trainer.telemetry import targets_dir

    cfg = load_config(args.config, args.set)
    targets = targets_dir(cfg.metrics, cfg.logging.run_dir)
    home = targets.parent / "prometheus"
    config = write_config(home / "prometheus.yml", targets, args.scrape_interval)
    process, url = start_prometheus(config, Path(args.data) if args.data else home / "data", args.host, args.port)
    try:
        print(f"Prometheus at {url}, scraping every rank announced in {targets}; Ctrl-C stops it", flush=True)
        return process.wait()
    finally:
        stop_prometheus(process)


# Prometheus's duration syntax (units largest first, each at most once), e.g. 5s, 1m30s, 500ms; zero refused
_DURATION = re.compile(r"(?:\d+y)?(?:\d+w)?(?:\d+d)?(?:\d+h)?(?:\d+m)?(?:\d+s)?(?:\d+ms)?")
prometheus_duration = Checked(
    lambda text: text if _DURATION.fullmatch(text) and re.search(r"[1-9]", text) else None,
    "a Prometheus duration such as 5s, 1m30s or 500ms", accepts=lambda v: v is not None,
    refused=("5", "5 seconds", "0s", "", "1.5s", "s5"))
# free_port_from tries the port and the 99 above it: all of them must be ports
monitor_port = integer(1, 65535 - 99, why="the 99 ports above it are tried too")


def register(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train G and D (one process, or --nproc N ranks)")
    train.add_argument("--config", type=readable_path, help="TOML preset, e.g. configs/fashion-mnist-32.toml")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config value (repeatable), e.g. --set optim.lr=1e-4")
    train.add_argument("--resume", metavar="PATH", type=readable_path,
                       help="a run folder or one checkpoint folder to continue from; "
                            "'auto': the run folder's newest checkpoint, if any")
    train.add_argument("--launcher", choices=["ray", "torchrun"], default="ray",
                       help="ray (default): a Ray Train worker group, on a local Ray or the cluster at --address; "
                            "torchrun: --nproc ranks on this machine (1: in this process)")
    train.add_argument("--workers", type=non_negative_int(), default=0,
                       help="Ray workers (same as --set cluster.workers=N; "
                            "default: one per GPU, or one per node on CPUs)")
    train.add_argument("--address", help="Ray cluster to join, HEAD:6379 (default: RAY_ADDRESS, else a local Ray)")
    train.add_argument("--nproc", type=positive_int(), default=1, help="torchrun ranks on this machine")
    train.set_defaults(func=cmd_train)


def register_monitor(sub: argparse._SubParsersAction) -> None:
    monitor = sub.add_parser("monitor", help="a local Prometheus scraping every rank of the runs beside run_dir")
    monitor.add_argument("--config", type=readable_path, help="the training preset (for logging.run_dir, metrics.*)")
    monitor.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    monitor.add_argument("--host", default="127.0.0.1", help="address Prometheus listens on")
    monitor.add_argument("--port", type=monitor_port, default=9090, help="first port to try")
    monitor.add_argument("--scrape-interval", type=prometheus_duration, default="5s")
    monitor.add_argument("--data", help="Prometheus's storage (default: beside the runs, prometheus/data)")
    monitor.set_defaults(func=cmd_monitor)
