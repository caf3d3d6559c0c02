"""SIGINT, SIGTERM and SIGHUP from outside: each command that starts a server or a Ray cluster stops all of it.

Real processes and real signals, sent to the `dcgan` process only (as `kill`, `timeout` or a service
manager does), never to its process group: what it started must be stopped by `dcgan` itself.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, tiny_train_args

from cluster.monitor import find_prometheus
from common.ports import free_port

# Ctrl-C, `kill` or a service manager, a closed terminal
STOP = [pytest.param(signum, id=signum.name) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)]
STOP_S = 60  # from the signal to `dcgan` having exited (torchrun alone gives its ranks 30 s)
GONE_S = 20  # from `dcgan` having exited to the last process it started having exited


class Command:
    """`dcgan ARGS` in a fresh interpreter, its output in files (a Ray run prints more than a pipe holds)."""

    def __init__(self, tmp_path: Path, *args: str):
        self.out, self.err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            # a session of its own: a Ctrl-C meant for pytest must not reach it; the test sends the signals
            self.process = subprocess.Popen([sys.executable, "-m", "dcgan", *args], cwd=ROOT, stdout=out,
                                            stderr=err, start_new_session=True, preexec_fn=_stop_signals_default)
        self.started: list[psutil.Process] = []

    def output(self) -> str:
        return self.out.read_text() + self.err.read_text()

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def wait_for(self, what: str, ready: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert self.process.poll() is None, f"exited {self.process.returncode} before {what}:\n" + \
                self.output()[-3000:]
            assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s:\n" + self.output()[-3000:]
            time.sleep(0.25)

    def stop(self, signum: int) -> tuple[list[psutil.Process], set[int]]:
        """Send the signal; returns what was running then, and the ports it listened on."""
        self.started = self.descendants()
        ports = listening_ports([psutil.Process(self.process.pid), *self.started])
        os.kill(self.process.pid, signum)
        return self.started, ports

    def kill_leftovers(self) -> None:
        """Only what this test started, by PID (psutil refuses a PID that was reused since)."""
        for process in [*self.descendants(), *self.started]:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def _stop_signals_default() -> None:
    """The stop signals as a terminal leaves them. A suite run in the background (`make test &`, nohup)
    inherits SIGINT and SIGHUP ignored, and `dcgan` rightly keeps ignoring what it was asked to ignore:
    the command under test must start as a user's would."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def listening_ports(processes: list[psutil.Process]) -> set[int]:
    ports = set()
    for process in processes:
        try:
            ports |= {c.laddr.port for c in process.net_connections("inet") if c.status == psutil.CONN_LISTEN}
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return ports


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    running = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                running.append(process)
        except psutil.NoSuchProcess:
            pass
    return running


def names(processes: list[psutil.Process]) -> list[str]:
    """Names of those still alive; a process may exit between being listed and being asked its name."""
    out = []
    for process in alive(processes):
        try:
            out.append(process.name())
        except psutil.Error:
            pass
    return out


def describe(processes: list[psutil.Process]) -> list[str]:
    out = []
    for process in processes:
        try:
            out.append(f"{process.pid} {process.name()}: {' '.join(process.cmdline())[:120]}")
        except psutil.Error:
            out.append(f"{process.pid} (gone while listing)")
    return out


def assert_stopped(command: Command, signum: signal.Signals, started: list[psutil.Process], ports: set[int]) -> None:
    """It exits 128 + signum with one line saying so, and nothing it started lives on or listens."""
    try:
        code = command.process.wait(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {STOP_S} s after {signum.name}:\n{command.output()[-3000:]}")
    deadline = time.monotonic() + GONE_S
    while alive(started) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = alive(started)
    assert not left, f"{len(left)} process(es) outlived `dcgan` by {GONE_S} s:\n" + "\n".join(describe(left))
    assert code == 128 + signum, f"exit code {code}:\n{command.output()[-3000:]}"
    assert command.err.read_text().count(f"dcgan: stopped by {signum.name}\n") == 1, command.output()[-3000:]
    listening = {c.laddr.port for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN}
    assert not ports & listening, f"ports still listened on: {sorted(ports & listening)}"


@pytest.fixture()
def command(tmp_path) -> Iterator[Callable[..., Command]]:
    made: list[Command] = []

    def start(*args: str) -> Command:
        made.append(Command(tmp_path, *args))
        return made[-1]

    yield start
    for c in made:
        c.kill_leftovers()


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Prometheus (Go) binds
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.mark.parametrize("signum", STOP)
def test_monitor_stops_its_prometheus_and_frees_the_port(command, tmp_path, signum):
    find_prometheus()
    port = free_port()
    monitor = command("monitor", "--config", str(ROOT / "configs" / "fashion-mnist-32.toml"), "--set",
                      f"logging.run_dir={tmp_path / 'runs' / 'r'}", "--port", str(port), "--data",
                      str(tmp_path / "tsdb"))
    monitor.wait_for("Prometheus", lambda: "Prometheus at http://127.0.0.1:" in monitor.out.read_text(), 60)
    assert f"127.0.0.1:{port}," in monitor.out.read_text(), monitor.output()
    started, ports = monitor.stop(signum)
    assert names(started) == ["prometheus"] and ports == {port}
    assert_stopped(monitor, signum, started, ports)
    assert port_is_free(port)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [pytest.param(signal.SIGTERM, id="SIGTERM")])  # SIGINT: the same relay, 13 s more
def test_torchrun_training_stops_its_ranks_and_their_metrics(command, fashion_shards, tmp_path, signum):
    run, port = tmp_path / "runs" / "torchrun", free_port()
    training = command(*tiny_train_args(fashion_shards, run, "optim.max_steps=100000", f"metrics.port={port}"),
                       "--nproc", "2")
    targets = run.parent / "prometheus-targets"
    # both ranks announced their metrics endpoint: they are in the training loop
    training.wait_for("training", lambda: len(list(targets.glob("*.json"))) == 2, 180)
    started, ports = training.stop(signum)
    assert {port, port + 1} <= ports
    assert_stopped(training, signum, started, ports)
    assert not list(targets.glob("*.json")), "a rank did not withdraw its metrics target"


def _ray_worker_running(command: Command) -> bool:
    return any("RayTrainWorker" in name for name in names(command.descendants()))


@pytest.mark.slow
# SIGINT, a terminal's Ctrl-C; SIGTERM takes the same relay (the monitor and torchrun tests send it), 24 s more
@pytest.mark.parametrize("signum", [pytest.param(signal.SIGINT, id="SIGINT")])
def test_ray_training_stops_the_local_ray_it_started(command, fashion_shards, tmp_path, signum):
    """The default launcher: a private local Ray (GCS, raylet, dashboard, agents, workers) started by ray.init."""
    args = tiny_train_args(fashion_shards, tmp_path / "runs" / "ray", "optim.max_steps=100000",
                           f"metrics.port={free_port()}", launcher="ray")
    training = command(*args)
    training.wait_for("Ray Train worker", lambda: _ray_worker_running(training), 180)
    time.sleep(1)  # the worker's siblings (agents, actors) finish starting
    started, ports = training.stop(signum)
    assert {"raylet", "gcs_server"} <= set(names(started))
    assert_stopped(training, signum, started, ports)
