"""A Ray head on this machine's loopback, as `ray start --head` makes one, that stops cleanly.

For trying `ray job submit` on one machine, and for the tests and benchmarks that submit jobs.
Every port is a free one (several heads can run side by side), authentication uses a fresh
token, and stopping ends every process the head started, by PID: `ray stop` would end every
Ray process of the machine, including other users' clusters.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from common.ports import free_port

RAY = Path(sys.executable).parent / "ray"


class LocalRayHead:
    def __init__(self, num_cpus: int | None = None):
        self.num_cpus = num_cpus or os.cpu_count() or 1
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {**os.environ, "PATH": f"{RAY.parent}{os.pathsep}{os.environ.get('PATH', '')}",
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
                    "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)
        self._process: subprocess.Popen | None = None
        self._nodes: list[subprocess.Popen] = []  # further nodes on this machine, `ray start --address`
        self._started: dict[int, psutil.Process] = {}  # psutil refuses to signal a reused PID
        self._temp_dir = ""

    def start(self, timeout_s: float = 90) -> LocalRayHead:
        # short: Ray's socket paths under it must fit in 107 bytes
        self._temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        self._process = subprocess.Popen(
            [str(RAY), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(self.gcs_port),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
             "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
             "--num-cpus", str(self.num_cpus), "--disable-usage-stats", "--temp-dir", self._temp_dir],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout_s
            while self.ray("job", "list", check=False).returncode != 0:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    error = self._process.stderr.read() if self._process.poll() is not None else "timed out"
                    raise RuntimeError(f"the local Ray head did not start: {error.strip()[-500:]}")
                time.sleep(1)
            self._remember_children()
        except BaseException:  # Ctrl-C or SIGTERM while it starts, too: `with` calls stop() only after a start
            self.stop()
            raise
        return self

    def add_node(self, num_cpus: int = 1, timeout_s: float = 60) -> None:
        """Another Ray node on this machine (its own raylet and object store), joined to this head: with it
        the cluster has two nodes, as tasks spread over them and a node lost mid-job need."""
        log = Path(self._temp_dir) / f"node-{len(self._nodes) + 1}.log"
        with log.open("w") as output:
            node = subprocess.Popen(
                [str(RAY), "start", "--block", "--address", self.gcs_address, "--num-cpus", str(num_cpus),
                 "--disable-usage-stats"],
                env=self.env, stdout=output, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self._nodes.append(node)
        wanted = len(self._nodes) + 1
        deadline = time.monotonic() + timeout_s
        # `ray status` costs a second or two of CLI start-up: asked only once the node says it runs
        while "Ray runtime started" not in log.read_text() or self.alive_nodes() < wanted:
            if node.poll() is not None or time.monotonic() > deadline:
                error = log.read_text() if node.poll() is not None else "timed out"
                raise RuntimeError(f"the Ray node did not join {self.gcs_address}: {error.strip()[-500:]}")
            time.sleep(0.2)
        self._remember_children()

    def alive_nodes(self) -> int:
        """The head's count of its alive nodes (`ray status`)."""
        res = self.ray("status", "--address", self.gcs_address, check=False)
        active = res.stdout.partition("Active:")[2].partition("Pending:")[0]
        return sum(1 for line in active.splitlines() if "node_" in line)

    def node_processes(self, index: int) -> list[psutil.Process]:
        """Every process of the `index`-th added node (its `ray start`, raylet, agents and workers)."""
        return _tree(self._nodes[index].pid)

    def processes(self) -> list[psutil.Process]:
        """Every process of the cluster: the head's and every added node's."""
        roots = [p for p in [self._process, *self._nodes] if p is not None]
        return [process for root in roots for process in _tree(root.pid)]

    def ray(self, *args: str, check: bool = True, timeout: float | None = None,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        """The `ray` CLI against this head (job commands get --address)."""
        if args and args[0] == "job":
            args = (*args[:2], "--address", self.dashboard_url, *args[2:])
        return subprocess.run([str(RAY), *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                              cwd=cwd, check=check)

    def _remember_children(self) -> None:
        for root in [self._process, *self._nodes]:
            if root is not None and root.poll() is None:
                self._started.update({p.pid: p for p in psutil.Process(root.pid).children(recursive=True)})

    def stop(self) -> None:
        if self._process is None:
            return
        self._remember_children()  # the workers and job drivers started since
        for node in self._nodes:  # --block ends its node's processes on SIGTERM; any left are killed below
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
        for node in self._nodes:
            try:
                node.wait(timeout=5)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
        self._nodes = []
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)  # --block ends what it started, after a drain of up to 30 s
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        for process in self._started.values():
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        self._process = None
        shutil.rmtree(self._temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalRayHead:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
