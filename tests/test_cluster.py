"""Training through Ray: a real head on this machine, `ray job submit`, a killed worker."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from conftest import RAY_REDIRECTS, ROOT, child_env, run_dcgan, tiny_train_args

from cluster.ray_checkpointer import remove_stale_staging, staged_folders, staging_prefix
from cluster.scaling import WorkerPlan, plan_workers, shortfall
from cluster.testing.local_head import LocalRayHead
from common.ports import free_port
from common.ray_address import RayUnreachable, check_reachable
from trainer.checkpoint import list_checkpoints, read_meta
from trainer.config import ClusterConfig, ConfigError

ANSI = re.compile(r"\x1b\[[0-9;]*m")
# glog/absl ("E1201 22:45:43.174 ..."), Ray's C++ log ("[2026-12-01 22:34:42,035 E 6740 6779] core_worker.cc:...")
# behind Ray's "(RayTrainWorker pid=N)" prefix or not, and bracketed levels
ERROR_LINE = re.compile(r"(^|\) )E\d{4} \d\d:\d\d|\[\d{4}-\d\d-\d\d [\d:,.]+ E \d+ \d+\]|\[E\]|core_worker\.cc")


# --- sizing the worker group -------------------------------------------------------------------------
def test_gpu_cluster_gets_one_worker_per_gpu_and_skips_a_cpu_only_head():
    nodes = [{"CPU": 8.0}, {"CPU": 32.0, "GPU": 4.0}, {"CPU": 16.0, "GPU": 4.0}]
    plan = plan_workers(ClusterConfig(), nodes)
    assert plan == WorkerPlan(workers=8, cpus_per_worker=4.0, gpus_per_worker=1.0)
    assert plan.resources() == {"CPU": 4.0, "GPU": 1.0} and plan.threads == 4


def test_cpu_cluster_gets_one_worker_per_node_with_all_its_cores():
    plan = plan_workers(ClusterConfig(), [{"CPU": 2.0}, {"CPU": 16.0}])
    assert plan == WorkerPlan(workers=2, cpus_per_worker=2.0, gpus_per_worker=0.0)
    assert plan.resources() == {"CPU": 2.0}
    assert plan_workers(ClusterConfig(workers=2), [{"CPU": 2.0}]).cpus_per_worker == 1.0


def test_explicit_sizes_win_and_a_shortfall_is_reported_not_refused():
    plan = plan_workers(ClusterConfig(workers=16, cpus_per_worker=6, gpus_per_worker=1), [{"CPU": 8.0, "GPU": 8.0}])
    assert plan == WorkerPlan(16, 6.0, 1.0)
    assert shortfall(plan, [{"CPU": 8.0, "GPU": 8.0}]) == "16 workers x 6 CPU = 96 CPU, the cluster has 8"
    assert shortfall(plan_workers(ClusterConfig(), [{"CPU": 4.0}]), [{"CPU": 4.0}]) is None
    with pytest.raises(ConfigError, match="no node of the Ray cluster has 2 GPU"):
        plan_workers(ClusterConfig(gpus_per_worker=2), [{"CPU": 8.0, "GPU": 1.0}])


# --- addresses ------------------------------------------------------------------------------------------
def test_unreachable_or_wrong_addresses_fail_in_seconds_with_the_reason():
    port = free_port()
    started = time.monotonic()
    with pytest.raises(RayUnreachable, match=f"cannot reach a Ray cluster at 127.0.0.1:{port}: nothing answers"):
        check_reachable(f"127.0.0.1:{port}")
    with pytest.raises(RayUnreachable, match="dashboard's job address"):
        check_reachable("http://127.0.0.1:8265")
    with pytest.raises(RayUnreachable, match="must be HOST:PORT"):
        check_reachable("headnode")
    assert time.monotonic() - started < 15


def test_train_with_an_unreachable_address_is_a_one_line_error(fashion_shards, tmp_path):
    started = time.monotonic()
    res = run_dcgan(*tiny_train_args(fashion_shards, tmp_path / "r", launcher="ray"), "--address",
                    f"127.0.0.1:{free_port()}", timeout=60)
    assert res.returncode == 2 and "dcgan: error: cannot reach a Ray cluster" in res.stderr
    assert "Traceback" not in res.stderr and time.monotonic() - started < 30


def test_a_ray_address_in_the_callers_environment_reaches_no_ray_the_tests_start(monkeypatch):
    """The real proof is the embedded-Ray run below, which trains with RAY_ADDRESS pointing nowhere."""
    for name in RAY_REDIRECTS:
        monkeypatch.setenv(name, "127.0.0.1:1")
    env = child_env({"OMP_NUM_THREADS": "3"})
    assert not set(RAY_REDIRECTS) & env.keys() and env["OMP_NUM_THREADS"] == "3"
    assert child_env({"RAY_ADDRESS": "10.0.0.1:6379"})["RAY_ADDRESS"] == "10.0.0.1:6379"  # a test's own choice stands
    assert "RAY_ADDRESS" not in LocalRayHead().env  # the head's `ray start` and `ray job` calls: their own address


# --- a real Ray head on loopback ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_head():
    with LocalRayHead(num_cpus=2) as head:
        yield head


def test_ray_job_submit_trains_two_workers_and_leaves_checkpoints_and_samples(ray_head, fashion_shards, tmp_path):
    run = tmp_path / "job-run"
    # the documented runtime environment: this checkout as the working dir, without .venv, data/, runs/
    train = tiny_train_args(fashion_shards, run, "optim.max_steps=12", "checkpoint.every_steps=6", launcher="ray")
    res = ray_head.ray("job", "submit", "--runtime-env", "cluster/examples/runtime_env.yaml", "--", "dcgan", *train,
                       "--workers", "2", check=False, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "succeeded" in res.stdout + res.stderr and "done: 12 steps" in res.stdout
    steps = [read_meta(c)["step"] for c in list_checkpoints(run / "checkpoints")]
    assert steps == [6, 12]
    newest = list_checkpoints(run / "checkpoints")[-1]
    assert read_meta(newest)["world_size"] == 2
    assert (newest / "rank-00000.pt").is_file() and (newest / "rank-00001.pt").is_file()
    assert (run / "samples" / "step-00000012.png").is_file()
    listing = ray_head.ray("job", "list", check=False)
    assert listing.returncode == 0 and "SUCCEEDED" in listing.stdout


def test_a_job_with_a_relative_run_folder_is_refused(ray_head, fashion_shards):
    res = ray_head.ray("job", "submit", "--working-dir", ".", "--", "dcgan", "train", "--config",
                       "configs/fashion-mnist-32.toml", "--set", f"data.shards={fashion_shards}", check=False,
                       timeout=120, cwd=ROOT)
    assert res.returncode != 0
    assert "logging.run_dir = 'runs/fashion-mnist-32' is relative" in res.stdout + res.stderr


def test_a_dead_workers_staged_checkpoint_is_removed_and_no_live_or_other_runs_one(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where gettempdir() points, in this process
    dead = subprocess.Popen(["true"])
    dead.wait()
    zombie = subprocess.Popen(["true"])  # exited, not yet reaped: dead too
    _wait_until(lambda: psutil.Process(zombie.pid).status() == psutil.STATUS_ZOMBIE)
    live = subprocess.Popen(["sleep", "60"])
    try:
        folders = {name: tmp_path / f"{staging_prefix(root)}rank{rank}-pid{pid}-x{rank}"
                   for name, root, rank, pid in [("dead", "/runs/a", 0, dead.pid), ("zombie", "/runs/a", 1, zombie.pid),
                                                 ("live", "/runs/a", 2, live.pid), ("other", "/runs/b", 0, dead.pid)]}
        for folder in folders.values():
            (folder / "step-00000005").mkdir(parents=True)
        assert staged_folders("/runs/a") == sorted(folders[n] for n in ("dead", "zombie", "live"))
        remove_stale_staging("/runs/a")
        assert [n for n, f in folders.items() if f.is_dir()] == ["live", "other"]
    finally:
        live.kill()
        live.wait()
        zombie.wait()


def _wait_until(condition, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


EVERY = 5  # checkpoint.every_steps of the restart test


def _registered_step(run: Path) -> int | None:
    """The newest checkpoint Ray has registered, from its run record: what it hands a restarted group."""
    try:
        record = json.loads((run / "checkpoints" / "checkpoint_manager_snapshot.json").read_text())
        latest = record["latest_checkpoint_result"]
    except (OSError, ValueError, KeyError):
        return None  # not written yet, or caught while Ray rewrites it
    return int(latest["checkpoint_dir_name"].removeprefix("step-")) if latest else None


def _train_workers(driver: psutil.Process) -> list[psutil.Process]:
    workers = []
    for process in driver.children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                workers.append(process)
        except psutil.Error:
            pass  # exited since listed
    return workers


def _both_train_workers(training: subprocess.Popen) -> dict[int, psutil.Process] | None:
    workers = _train_workers(psutil.Process(training.pid))
    return {p.pid: p for p in workers} if len(workers) == 2 else None


def _owner(staged: Path) -> int:
    """The PID in a staged folder's name: which worker writes it."""
    return int(re.search(r"-pid(\d+)-", staged.name)[1])


def _kill_a_worker_mid_save(training: subprocess.Popen, run: Path, output: Path) -> tuple[int, Path]:
    """SIGKILL, from outside, a Ray Train worker while it stages a checkpoint newer than the newest one Ray registered;
    returns the checkpoint Ray has registered once the kill landed (what it hands the new group) and the staged
    folder the dead worker left."""
    workers = _wait("both train workers", lambda: _both_train_workers(training), training, output)
    deadline = time.monotonic() + 300
    while True:
        assert training.poll() is None, f"the run ended before a kill landed mid-save:\n{output.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no kill landed mid-save:\n{output.read_text()[-3000:]}"
        registered = _registered_step(run)
        if registered is not None:
            newer = [f for f in staged_folders(str(run)) if _owner(f) in workers and any(
                int(part.name[5:]) > registered for part in f.glob("step-*"))]
            if newer:
                workers[_owner(newer[0])].kill()  # no exception, no cleanup: as the OOM killer ends a process
                # a poll answered just before the kill may still register; after, the dead worker answers none
                time.sleep(1)
                return _registered_step(run), newer[0]
        time.sleep(0.005)


def test_a_killed_worker_is_restarted_from_the_last_checkpoint_and_a_stopped_run_continues(fashion_shards,
                                                                                           tmp_path, monkeypatch):
    """Embedded local Ray (no address), as the README's main job runs."""
    # where the tests run, a RAY_ADDRESS (here: nothing listens) must not turn the private Ray into a join
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    run, output = tmp_path / "faulty", tmp_path / "out.txt"
    # ZeRO-2: each rank's optimiser partition reaches storage in its own upload and must load back
    args = tiny_train_args(fashion_shards, run, "optim.max_steps=16", f"checkpoint.every_steps={EVERY}",
                           "checkpoint.keep_last=2", "cluster.max_failures=1", "precision.zero_stage=2",
                           launcher="ray")
    training = subprocess.Popen([sys.executable, "-m", "dcgan", *args, "--workers", "2"], cwd=ROOT,
                                env=child_env(), stdout=output.open("w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        resumes_at, left = _kill_a_worker_mid_save(training, run, output)
        assert left.is_dir()  # what a worker killed mid-save leaves, until the run removes it
        assert training.wait(timeout=400) == 0, output.read_text()[-4000:]
    finally:
        if training.poll() is None:
            training.kill()
    out = output.read_text()
    # the new group starts from the newest checkpoint Ray registered; the steps after it are redone
    assert resumes_at is not None and f"resumed from step {resumes_at}" in out and "done: 16 steps" in out
    assert out.count("resumed from step") == 1, out[-4000:]
    checkpoints = list_checkpoints(run / "checkpoints")
    assert [read_meta(c)["step"] for c in checkpoints] == [15, 16]  # keep_last = 2 pruned 5 and 10
    assert len(list((checkpoints[-1] / "generator").glob("zero_pp_rank_*_optim_states.pt"))) == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 15 and {r["step"] for r in records} == {5, 10, 15}
    assert not staged_folders(str(run)), "a staged checkpoint of the run outlived it"

    # the user continues the finished run for 4 more steps: Ray restores its newest checkpoint
    res = run_dcgan(*tiny_train_args(fashion_shards, run, "optim.max_steps=20", f"checkpoint.every_steps={EVERY}",
                                     "checkpoint.keep_last=2", "precision.zero_stage=2", launcher="ray"),
                    "--workers", "2", "--resume",
                    str(run), timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "resumed from step 16" in res.stdout + res.stderr and "done: 20 steps" in res.stdout
    assert [read_meta(c)["step"] for c in list_checkpoints(run / "checkpoints")] == [16, 20]
    # a run that went well shows no line that reads like an error (Ray's PreemptionWatcher note was one)
    errors = [line for line in ANSI.sub("", res.stdout + res.stderr).splitlines() if ERROR_LINE.search(line)]
    assert not errors, "\n".join(errors)


# --- the cluster fails under a run -------------------------------------------------------------------------
def _head_processes(head: LocalRayHead) -> list[psutil.Process]:
    root = psutil.Process(head._process.pid)
    return [root, *root.children(recursive=True)]


def _wait(what: str, ready, process: subprocess.Popen, output: Path, timeout_s: float = 180):
    deadline = time.monotonic() + timeout_s
    while not (found := ready()):
        assert process.poll() is None, f"exited {process.returncode} before {what}:\n{output.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s:\n{output.read_text()[-3000:]}"
        time.sleep(0.2)
    return found


def _train_against(head: LocalRayHead, args: list[str], output: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dcgan", *args, "--address", head.gcs_address], cwd=ROOT,
                            env=child_env(head.env), stdout=output.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _checkpoint_steps(run: Path) -> list[int]:
    return [read_meta(c)["step"] for c in list_checkpoints(run / "checkpoints")]


def _last_line(output: Path) -> str:
    return ANSI.sub("", output.read_text()).strip().splitlines()[-1]


def test_a_worker_killed_more_often_than_allowed_ends_the_run_in_one_line_with_its_checkpoints(
        ray_head, fashion_shards, tmp_path):
    run, output = tmp_path / "r", tmp_path / "out.txt"
    args = tiny_train_args(fashion_shards, run, "optim.max_steps=100000", "checkpoint.every_steps=10",
                           "cluster.max_failures=0", "metrics.enabled=false", "precision.dtype=fp32",
                           launcher="ray")
    training = _train_against(ray_head, args, output)
    try:
        _wait("a checkpoint", lambda: _checkpoint_steps(run), training, output)
        worker = _wait("the train worker", lambda: [p for p in _head_processes(ray_head)
                                                    if "RayTrainWorker" in " ".join(p.cmdline())], training, output)
        worker[0].kill()  # SIGKILL from outside: no exception, no cleanup, as the OOM killer does it
        assert training.wait(timeout=120) == 2, output.read_text()[-3000:]
    finally:
        if training.poll() is None:
            training.kill()
    last = _last_line(output)
    assert last.startswith("dcgan: error: training failed (0 restart(s) allowed)"), last
    assert "newest checkpoint: " in last
    steps = _checkpoint_steps(run)
    assert steps and all(step % 10 == 0 for step in steps)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith("step-") and p.name[5:].isdigit()
                and int(p.name[5:]) not in steps], "a checkpoint folder that is not complete"


def test_a_dead_head_ends_the_driver_in_bounded_time_and_resume_auto_continues_on_a_new_one(fashion_shards,
                                                                                          tmp_path):
    run, output = tmp_path / "r", tmp_path / "out.txt"
    args = tiny_train_args(fashion_shards, run, "optim.max_steps=100000", "checkpoint.every_steps=10",
                           "metrics.enabled=false", "precision.dtype=fp32", launcher="ray")
    with LocalRayHead(num_cpus=2) as head:
        training = _train_against(head, args, output)
        try:
            _wait("two checkpoints", lambda: len(_checkpoint_steps(run)) >= 2, training, output)
            for process in _head_processes(head):  # the head machine fails: GCS, raylet, workers, dashboard
                with contextlib.suppress(psutil.NoSuchProcess):  # a worker that ended after it was listed
                    process.kill()
            killed = time.monotonic()
            assert training.wait(timeout=90) == 2, output.read_text()[-3000:]
            assert time.monotonic() - killed < 60
        finally:
            if training.poll() is None:
                training.kill()
    last = _last_line(output)
    assert last.startswith(f"dcgan: error: lost the Ray cluster at {head.gcs_address} during training"), last
    assert last.endswith("start the cluster again and rerun with --resume auto"), last
    newest = _checkpoint_steps(run)[-1]
    assert f"newest checkpoint: {list_checkpoints(run / 'checkpoints')[-1]}" in last

    target = newest + 5
    args[args.index("optim.max_steps=100000")] = f"optim.max_steps={target}"
    with LocalRayHead(num_cpus=2) as head:
        res = subprocess.run([sys.executable, "-m", "dcgan", *args, "--address", head.gcs_address, "--resume",
                              "auto"], cwd=ROOT, env=child_env(head.env), capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    # from the newest complete checkpoint on disk, though the dead head may not have registered it
    assert f"resumed from step {newest}" in out and f"done: {target} steps" in out
    assert _checkpoint_steps(run)[-1] == target
