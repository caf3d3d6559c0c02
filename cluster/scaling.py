"""How many Ray Train workers to start, and what each reserves, from what the cluster has."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from trainer.config import ClusterConfig, ConfigError


@dataclass(frozen=True)
class WorkerPlan:
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float

    @property
    def threads(self) -> int:
        """Intra-op threads per worker: its CPU share (Ray sets OMP_NUM_THREADS=1 in workers)."""
        return max(1, int(self.cpus_per_worker))

    def resources(self) -> dict[str, float]:
        out = {"CPU": self.cpus_per_worker}
        if self.gpus_per_worker:
            out["GPU"] = self.gpus_per_worker
        return out


def plan_workers(cluster: ClusterConfig, nodes: Sequence[dict[str, float]]) -> WorkerPlan:
    """Fill the automatic (0 / -1) fields of `cluster` from the alive nodes' resources.

    GPU clusters get one worker per GPU; CPU-only clusters one worker per node, because a
    process group of one rank per core spends more in gloo all-reduces than it gains. CPUs
    are split evenly among the workers a node holds, counting only nodes that can host one
    (a CPU-only head node of a GPU cluster does not).
    """
    total_gpus = sum(n.get("GPU", 0.0) for n in nodes)
    gpus = cluster.gpus_per_worker if cluster.gpus_per_worker >= 0 else (1.0 if total_gpus else 0.0)
    hosts = [n for n in nodes if (n.get("GPU", 0.0) >= gpus if gpus else n.get("CPU", 0.0) >= 1)]
    if not hosts:
        kind = f"{gpus:g} GPU(s)" if gpus else "1 CPU"
        raise ConfigError(f"no node of the Ray cluster has {kind} for a worker")
    if cluster.workers:
        workers = cluster.workers
    elif gpus:
        workers = max(1, int(sum(n["GPU"] // gpus for n in hosts)))
    else:
        workers = len(hosts)
    cpus = cluster.cpus_per_worker
    if not cpus:
        per_node = math.ceil(workers / len(hosts))
        cpus = max(1.0, float(min(n.get("CPU", 1.0) for n in hosts) // per_node))
    return WorkerPlan(workers, cpus, gpus)


def shortfall(plan: WorkerPlan, nodes: Sequence[dict[str, float]]) -> str | None:
    """What the plan needs beyond the cluster's current total, if anything.

    Not an error: an autoscaling cluster adds nodes once Ray asks for them.
    """
    for kind, each in (("CPU", plan.cpus_per_worker), ("GPU", plan.gpus_per_worker)):
        have = sum(n.get(kind, 0.0) for n in nodes)
        if each and plan.workers * each > have:
            need = plan.workers * each
            return f"{plan.workers} workers x {each:g} {kind} = {need:g} {kind}, the cluster has {have:g}"
    return None
