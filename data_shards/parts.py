"""Where the parts of a conversion or a dedup pass run: processes on this machine, or Ray tasks
spread over a cluster's nodes.

A part is `task(context, job)`: a module-level function, the context all parts share (the
source, the options, a model) and its own job (a key range). Runners yield (job index, result)
as parts finish, in any order; closing the iterator early stops the parts still running.

On Ray, each part is a task of one CPU, spread over the nodes; a task whose worker process or
node dies is retried (up to RETRIES times) on whatever node is left, so a lost node costs the
parts it was running, no more. Every node reads the input and writes the output at the same
paths (shared storage, or a copy at the same path on each node); that is checked on every node
before any part starts, and refused in one line otherwise.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import secrets
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from common.ray_address import check_reachable, in_ray_job

Task = Callable[[Any, Any], Any]
RETRIES = 3  # per part: a node lost mid-job is one retry; a part that keeps killing its worker is not waited out
NODE_CHECK_S = 120.0  # a node busy with other work still answers a zero-CPU task within this


class PartRunner(Protocol):
    nodes_used: Counter[str]

    def check_paths(self, inputs: Sequence[Path], output: Path | None = None) -> None: ...

    def run(self, task: Task, context: Any, jobs: Sequence[Any]) -> Iterator[tuple[int, Any]]: ...


class RayPartsError(RuntimeError):
    """The parts cannot run on the Ray cluster (paths a node does not see), or one could not be finished
    there; what was finished is kept for a rerun."""


# --- this machine ------------------------------------------------------------------------------
_CONTEXT: dict[str, Any] = {}


def _adopt(task: Task, context: Any) -> None:
    _CONTEXT.update(task=task, context=context)


def _run_indexed(item: tuple[int, Any]) -> tuple[int, Any]:
    index, job = item
    return index, _CONTEXT["task"](_CONTEXT["context"], job)


class LocalParts:
    """Forked worker processes on this machine; the context reaches them by fork, not by pickling."""

    def __init__(self, workers: int = 0):
        self.workers = workers or os.cpu_count() or 1
        self.nodes_used: Counter[str] = Counter()

    def check_paths(self, inputs: Sequence[Path], output: Path | None = None) -> None:
        """Nothing to check: this machine is the only one that reads and writes."""

    def run(self, task: Task, context: Any, jobs: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        workers = max(1, min(self.workers, len(jobs)))
        if workers == 1:
            for index, job in enumerate(jobs):
                yield index, task(context, job)
            return
        pool = multiprocessing.get_context("fork").Pool(workers, _adopt, (task, context))
        try:
            yield from pool.imap_unordered(_run_indexed, enumerate(jobs))
        except BaseException:  # GeneratorExit too: stop the other workers now, closing would run every queued part
            pool.terminate()
            pool.join()
            raise
        pool.close()
        pool.join()


# --- a Ray cluster -----------------------------------------------------------------------------
def _run_part(task: Task, context: Any, job: Any) -> tuple[str, Any]:
    import ray
    import torch

    torch.set_num_threads(1)  # one CPU per task: more threads would fight the other tasks of the node
    return ray.get_runtime_context().get_node_id(), task(context, job)


def _unreadable(inputs: list[str], output: str | None, token: str) -> list[str]:
    """On one node: the paths it cannot read, and the output folder if it does not hold `token`."""
    missing = [p for p in inputs if not os.access(p, os.R_OK)]
    if output is not None:
        try:
            if (Path(output) / _token_name(token)).read_text() != token:
                missing.append(output)
        except OSError:
            missing.append(output)
    return missing


def _token_name(token: str) -> str:
    return f".node-check-{token[:8]}"


def ray_address(address: str | None) -> str | None:
    """The cluster to run on: `--address`, else RAY_ADDRESS (set inside `ray job submit`), else None."""
    return address or os.environ.get("RAY_ADDRESS") or None


def absolute_path(path: str | Path, what: str) -> Path:
    """Ray tasks run in other folders, on other nodes: relative paths are resolved here, except inside a Ray
    job, whose working folder is a temporary copy that Ray deletes."""
    path = Path(path)
    if not path.is_absolute() and in_ray_job():
        raise RayPartsError(f"{what} {path} is relative; a Ray job runs in a temporary copy of its working "
                         "folder that Ray deletes, so give an absolute path on shared storage")
    return path.resolve()


class RayParts:
    """Parts as Ray tasks of one CPU each, spread over the nodes of the cluster at `address`."""

    def __init__(self, address: str):
        self.address = address
        self.nodes_used: Counter[str] = Counter()  # node id -> parts it finished

    def __enter__(self) -> RayParts:
        import ray

        check_reachable(self.address)
        # Ray starts workers at nice 15, below its own services: on a small node those took 0.18 of the
        # conversion's cores. A job's environment is fixed at submission (cluster/examples/runtime_env.yaml)
        job_env = {} if in_ray_job() else {"runtime_env": {"env_vars": {"RAY_worker_niceness": "0"}}}
        ray.init(address=self.address, logging_level=logging.WARNING, **job_env)
        return self

    def __exit__(self, *exc: object) -> None:
        import ray

        ray.shutdown()

    def nodes(self) -> list[dict]:
        import ray

        return [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]

    def check_paths(self, inputs: Sequence[Path], output: Path | None = None) -> None:
        """Every node that runs parts must read `inputs` and see `output` as this machine does (a file written
        here is read there): refuse in one line where one does not."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        token = secrets.token_hex(16)
        marker = output / _token_name(token) if output is not None else None
        if marker is not None:
            marker.write_text(token)
        try:
            check = ray.remote(num_cpus=0, max_retries=0)(_unreadable)
            nodes = self.nodes()
            refs = [check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                [str(p) for p in inputs], str(output) if output is not None else None, token) for n in nodes]
            answers = ray.get(refs, timeout=NODE_CHECK_S)
        finally:
            if marker is not None:
                marker.unlink(missing_ok=True)
        for path in [*map(str, inputs), *([str(output)] if output is not None else [])]:
            lacking = [f"{n['NodeManagerAddress']} {n['NodeID'][:8]}" for n, missing in zip(nodes, answers, strict=True)
                       if path in missing]
            if lacking:
                what = "does not show what this machine writes into" if output is not None and path == str(output) \
                    else "cannot read"
                raise RayPartsError(f"{len(lacking)} of {len(nodes)} Ray nodes ({', '.join(sorted(lacking))}) "
                                  f"{what} {path}; every node reads the input and writes the output at the same "
                                  "paths: put them on shared storage (e.g. NFS) or copy the input to the same path "
                                  "on every node")

    def run(self, task: Task, context: Any, jobs: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        import ray

        # named after the part's function: `ray::convert_shard` in the task list, the dashboard and `ps`
        remote = ray.remote(_run_part).options(num_cpus=1, max_retries=RETRIES, scheduling_strategy="SPREAD",
                                               name=task.__name__.lstrip("_"))
        context_ref = ray.put(context)  # once into the object store, not once per part
        pending = {remote.remote(task, context_ref, job): index for index, job in enumerate(jobs)}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    index = pending.pop(ref)
                    node, result = self._result(ref, index, len(jobs))
                    self.nodes_used[node] += 1
                    yield index, result
        finally:
            for ref in pending:  # an error or an interrupt: what is still running would write after we left
                ray.cancel(ref, force=True)

    @staticmethod
    def _result(ref: Any, index: int, count: int) -> Any:
        import ray

        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:  # the part's own error (bad input, a full disk): as on one machine
            raise e.cause from None
        except ray.exceptions.RayError as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RayPartsError(f"part {index + 1} of {count} was lost {RETRIES + 1} times on the cluster "
                              f"({type(e).__name__}: {reason}); the parts finished are kept: run the same "
                              "command again") from None
