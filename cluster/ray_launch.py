"""Training through Ray Train: join a cluster (or start a local one), size the worker group,
run it with automatic restarts from the newest checkpoint.

Storage: Ray persists checkpoints to `<root>/checkpoints/step-XXXXXXXX/`, where root is
`cluster.storage_path` (NFS path or object-store URI) or else the run folder. Ray's run
snapshot lives beside them, so starting the same run again continues from its newest
checkpoint. Samples and metrics.jsonl are written by rank 0 into `logging.run_dir`; on a
cluster that folder should be on shared storage too.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cluster.scaling import WorkerPlan, plan_workers, shortfall
from common.ray_address import check_reachable, in_ray_job
from trainer.config import CHECKPOINTS, Config, ConfigError

# RunConfig.name is CHECKPOINTS: Ray's folder under the storage root is named as a run folder's checkpoints are
_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's reported checkpoints


# Ray Train routes print() in workers through its logger, which shows every progress line twice.
# Ray also starts workers at nice 15, so its own services (dashboard, agents, at nice 0) take
# the cores first: training in one worker ran at 0.80x the same run without Ray on 2 cores.
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_worker_niceness": "0"}
# For the private local Ray only. Ray Train's PreemptionWatcher actor watches for nodes being drained (spot
# reclaims), which cannot happen to a one-node Ray whose address nobody else knows; and creating it makes Ray
# core log a warning at ERROR level into the terminal ("E ... core_worker.cc: Actor with class name:
# 'PreemptionWatcher' ... has constructor arguments in the object store and max_restarts > 0", Ray #53727).
# On a cluster the watcher stays: a drain there is real.
LOCAL_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


class ClusterError(RuntimeError):
    """The Ray cluster cannot be reached, or the worker group failed for good."""


def _is_uri(path: str) -> bool:
    return "://" in path


def resolve_paths(cfg: Config) -> None:
    """Make local paths absolute: Ray workers run in other directories (and on other nodes)."""
    for section, key in (("logging", "run_dir"), ("cluster", "storage_path"), ("data", "shards")):
        value = getattr(getattr(cfg, section), key)
        if not value or _is_uri(value) or Path(value).is_absolute():
            continue
        if in_ray_job() and key != "shards":
            raise ConfigError(f"{section}.{key} = {value!r} is relative; a Ray job runs in a temporary copy of its "
                              "working directory that Ray deletes, so give an absolute path on shared storage")
        setattr(getattr(cfg, section), key, str(Path(value).resolve()))


def storage_root(cfg: Config) -> str:
    return cfg.cluster.storage_path or cfg.logging.run_dir


def has_run_snapshot(cfg: Config) -> bool:
    """Whether an earlier run reported checkpoints under this storage root."""
    import pyarrow.fs

    root = storage_root(cfg)
    try:
        fs, base = pyarrow.fs.FileSystem.from_uri(root if _is_uri(root) else Path(root).resolve().as_uri())
        info = fs.get_file_info(f"{base.rstrip('/')}/{CHECKPOINTS}/{_SNAPSHOT}")
    except (OSError, pyarrow.ArrowException) as e:
        raise ClusterError(f"cannot read the storage path {root}: {e}") from None
    return info.type != pyarrow.fs.FileType.NotFound


@contextmanager
def keep_signal_handler(signum: int) -> Iterator[None]:
    """Give back a signal to the handler the caller installed, after Ray's code replaced it.

    ray.init makes SIGTERM call sys.exit(15), then its core worker installs a C++ crash handler for SIGTERM
    that prints a stack trace and aborts; TorchTrainer.fit makes SIGINT abort the run, then call sys.exit(0).
    Neither tells the caller which signal ended the call. With a Python handler installed (`dcgan` installs one
    for SIGINT and SIGTERM), it is put back afterwards, and a SystemExit from Ray's handler becomes a call of it.
    """
    ours = signal.getsignal(signum)
    if not callable(ours) or threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        yield
    except SystemExit:
        if signal.getsignal(signum) is ours:  # not Ray's handler
            raise
        signal.signal(signum, ours)
        ours(signum, None)
        raise
    finally:
        signal.signal(signum, ours)


def connect(address: str | None) -> None:
    """Join the cluster at `address` (checked reachable); without one, start a local Ray for this run."""
    import ray

    quiet: dict[str, Any] = dict(logging_level=logging.WARNING, log_to_driver=True)
    if not in_ray_job():  # a job's runtime_env is fixed at submission (cluster/examples/runtime_env.yaml)
        quiet["runtime_env"] = {"env_vars": WORKER_ENV}
    with keep_signal_handler(signal.SIGTERM):
        if address:
            ray.init(address=address, **quiet)
        else:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a private local instance reports nothing
            for name, value in LOCAL_ENV.items():  # Ray Train hands these on from the driver's environment
                os.environ.setdefault(name, value)
            ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", **quiet)


def plan_for_cluster(cfg: Config) -> WorkerPlan:
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    plan = plan_workers(cfg.cluster, nodes)
    gap = shortfall(plan, nodes)
    if gap:
        print(f"dcgan: note: {gap}; Ray waits until the cluster (or its autoscaler) provides it", flush=True)
    return plan


def check_shards(cfg: Config, joins_cluster: bool) -> None:
    """Input errors found here cost a second; found in the workers, each costs a restart.

    On a cluster the shards may live only on the workers' disks; then the workers check them.
    """
    from data_shards.manifest import read_manifest_for

    if joins_cluster and not Path(cfg.data.shards).exists():
        print(f"dcgan: note: {cfg.data.shards} is not on this machine; the workers will read it", flush=True)
        return
    manifest = read_manifest_for(cfg.data.shards, cfg.model.resolution, cfg.model.channels)
    if manifest.total < cfg.optim.batch_size:
        raise ConfigError(f"{cfg.data.shards} holds {manifest.total} samples, fewer than one batch of "
                          f"{cfg.optim.batch_size}")


def check_worker_count(cfg: Config, plan: WorkerPlan, continues: str | Path | None) -> None:
    from trainer.checkpoint import read_meta, resolve_checkpoint

    cfg.optim.rank_batch(plan.workers)
    if continues:
        written_by = read_meta(resolve_checkpoint(continues)).get("world_size")
        if written_by != plan.workers:
            raise ConfigError(f"the checkpoint to continue from was written by {written_by} worker(s); "
                              f"resume with --workers {written_by}, not {plan.workers}")


def resume_plan(cfg: Config, resume: str | None) -> tuple[str | None, Path | None]:
    """(the checkpoint the workers start from, the checkpoint that continues an earlier Ray run).

    Ray continues a run from its own record under the storage path. That record lags: Ray
    registers a checkpoint when it next polls the workers, so a head that died in between leaves
    a newer complete checkpoint on disk than in the record. The workers therefore get the newest
    complete checkpoint too and start from whichever of the two is newer.
    """
    from trainer.checkpoint import checkpoint_to_resume, earlier_run_error, list_checkpoints

    root = storage_root(cfg)
    snapshot = has_run_snapshot(cfg)
    local = [] if _is_uri(root) else list_checkpoints(Path(root) / CHECKPOINTS)
    if snapshot and not local and not resume:
        raise earlier_run_error(cfg.logging.run_dir, "recorded by Ray")
    start = checkpoint_to_resume(resume, local, cfg.logging.run_dir)
    if resume not in (None, "auto") and snapshot and (not local or start.resolve() != local[-1].resolve()):
        raise ConfigError(f"Ray continues {cfg.logging.run_dir} from its newest checkpoint"
                          f"{' (' + local[-1].name + ')' if local else ''}; to start from {start.resolve()}, set "
                          "logging.run_dir to a new folder and keep --resume")
    return (str(start) if start else None), (local[-1] if snapshot and local else None)


def train_on_ray(cfg: Config, resume: str | None, address: str | None) -> dict[str, Any]:
    """Run the whole training on a Ray worker group; returns rank 0's last reported metrics.

    `resume` as `dcgan train --resume` takes it; `address`: the cluster, else RAY_ADDRESS,
    else a local Ray. Everything checkable is checked before Ray starts.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cluster.ray_worker import train_worker

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)  # first: the other checks are useless if there is no cluster
    resolve_paths(cfg)
    resume, continues = resume_plan(cfg, resume)
    check_shards(cfg, joins_cluster=bool(address))
    try:
        connect(address)  # inside: a signal during ray.init must still end in ray.shutdown()
        plan = plan_for_cluster(cfg)
        check_worker_count(cfg, plan, resume or continues)
        print(f"dcgan: {plan.workers} Ray worker(s) x {plan.resources()}; checkpoints in "
              f"{storage_root(cfg).rstrip('/')}/{CHECKPOINTS}", flush=True)
        job = {"config": cfg.to_dict(), "threads": plan.threads, "resume": resume}
        trainer = TorchTrainer(
            train_worker, train_loop_config=job,
            scaling_config=ScalingConfig(num_workers=plan.workers, use_gpu=bool(plan.gpus_per_worker),
                                         resources_per_worker=plan.resources()),
            run_config=RunConfig(name=CHECKPOINTS, storage_path=storage_root(cfg),
                                 failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
                                 logging_config=LoggingConfig(log_level="WARNING")))
        try:
            with keep_signal_handler(signal.SIGINT):
                result = trainer.fit()
        except ray.train.TrainingFailedError as e:
            raise ClusterError(f"training failed ({cfg.cluster.max_failures} restart(s) allowed): "
                               f"{_first_worker_error(e)}; {_newest_checkpoint(cfg)}") from None
        except ray.exceptions.RayError as e:
            # the controller actor, or the whole cluster, is gone (a dead head ends its GCS and raylet):
            # Ray raises this within seconds; nothing the driver could retry would bring the head back
            lost = f"the Ray cluster at {address}" if address else "the local Ray"
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ClusterError(f"lost {lost} during training ({type(e).__name__}: {reason[:200]}); "
                               f"{_newest_checkpoint(cfg)}; start the cluster again and rerun with "
                               "--resume auto") from None
        return dict(result.metrics or {})
    finally:
        ray.shutdown()
        _remove_stale_staging(cfg)


def _remove_stale_staging(cfg: Config) -> None:
    """A worker killed mid-save, and not restarted after, left its staged part on its node: this one's."""
    from cluster.ray_checkpointer import remove_stale_staging

    remove_stale_staging(storage_root(cfg))


def _newest_checkpoint(cfg: Config) -> str:
    from trainer.checkpoint import list_checkpoints

    root = storage_root(cfg)
    if _is_uri(root):
        return f"checkpoints are in {root.rstrip('/')}/{CHECKPOINTS}"
    found = list_checkpoints(Path(root) / CHECKPOINTS)
    if not found:
        return "no checkpoint was written"
    return f"newest checkpoint: {found[-1]}"


def _first_worker_error(error: Exception) -> str:
    failures = getattr(error, "worker_failures", None) or {}
    for rank in sorted(failures):
        lines = [line for line in str(failures[rank]).strip().splitlines() if line.strip()]
        if lines:
            return f"rank {rank}: {lines[-1].strip()}"
    return str(error).strip().splitlines()[-1]
