"""`dcgan data convert` and `dcgan data dedup` on a real two-node Ray cluster on loopback: parts spread over both
nodes, a killed task and a lost node retried, and the result identical to the same command on one machine."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time

import psutil
import pytest
from conftest import ROOT

from cluster.testing.local_head import LocalRayHead
from data_shards.convert import ConvertOptions, convert
from data_shards.dedup import DedupOptions, find_near_duplicates, write_duplicate_list
from data_shards.sources import open_source

# a lost node is declared dead after ~1.5 s instead of Ray's ~30 s, so its parts are retried within the test
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "500",
                   "RAY_health_check_failure_threshold": "3", "RAY_health_check_initial_delay_ms": "0"}
SHARD_SIZE = 100  # 7 shards of the 672-entry LMDB: parts of ~0.3 s, enough to be caught running


@pytest.fixture(scope="module")
def two_nodes():
    head = LocalRayHead(num_cpus=1)
    head.env.update(FAST_NODE_DEATH)
    with head:
        head.add_node(num_cpus=1)
        yield head


def _dcgan_data(head: LocalRayHead, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dcgan", "data", *args, "--quiet", "--address",
                           head.gcs_address], cwd=ROOT, env=head.env, capture_output=True, text=True, timeout=300)


class Killer(threading.Thread):
    """Waits for a part named `task` to run among `processes()`, then SIGKILLs what `victims(part)` names."""

    def __init__(self, task: str, processes, victims):
        super().__init__(daemon=True)
        self.task, self.processes, self.victims = f"ray::{task}", processes, victims
        self.killed: list[int] = []
        self.done = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + 120
        while not self.done.is_set() and time.monotonic() < deadline:
            for p in self.processes():
                try:
                    if p.cmdline()[:1] == [self.task]:
                        for victim in self.victims(p):
                            victim.kill()
                            self.killed.append(victim.pid)
                        return
                except psutil.NoSuchProcess:
                    continue
            time.sleep(0.01)


def test_dedup_on_two_nodes_with_a_killed_task_lists_what_one_machine_lists(two_nodes, lsun_lmdb, tmp_path):
    path, _ = lsun_lmdb
    opts = DedupOptions(train_steps=100, part_size=SHARD_SIZE)
    source = open_source("lsun", path)
    write_duplicate_list(tmp_path / "here.json", find_near_duplicates(source, opts), source, opts)

    # the task's own worker process, on whichever node it runs: Ray retries the part
    killer = Killer("hash_range", two_nodes.processes, lambda part: [part])
    killer.start()
    res = _dcgan_data(two_nodes, "dedup", "--input", str(path), "--out", str(tmp_path / "ray.json"),
                      "--train-steps", "100", "--part-size", str(SHARD_SIZE))
    killer.done.set()
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(killer.killed) == 1, "no hashing part was seen running"
    assert "7 parts ran on 2 node(s)" in res.stdout, res.stdout
    here, there = (json.loads((tmp_path / name).read_text()) for name in ("here.json", "ray.json"))
    assert there.pop("seconds").keys() == here.pop("seconds").keys() == {"train", "hash", "search"}
    assert there == here


def test_a_path_a_node_cannot_read_is_refused_in_one_line(two_nodes, tmp_path):
    """The nodes of one machine share its files: the check is shown a path that no node can read."""
    code = ("import sys; from pathlib import Path; from data_shards.parts import RayParts\n"
            "with RayParts(sys.argv[1]) as r: r.check_paths([Path('/nonexistent/lmdb')], Path(sys.argv[2]))")
    out = tmp_path / "shared"
    out.mkdir()
    res = subprocess.run([sys.executable, "-c", code, two_nodes.gcs_address, str(out)], cwd=ROOT, env=two_nodes.env,
                         capture_output=True, text=True, timeout=120)
    assert re.search(r"RayPartsError: 2 of 2 Ray nodes \(\S+ \w{8}, \S+ \w{8}\) cannot read /nonexistent/lmdb; "
                     "every node reads", res.stderr), res.stderr[-2000:]
    assert list(out.iterdir()) == []  # the marker this machine wrote for the nodes to find is removed


def test_convert_on_two_nodes_loses_a_node_and_writes_the_manifest_one_machine_writes(two_nodes, lsun_lmdb,
                                                                                      tmp_path):
    """Last in this module: the second node does not come back."""
    path, _ = lsun_lmdb
    convert("lsun", path, tmp_path / "here", ConvertOptions(resolution=32, shard_size=SHARD_SIZE, workers=2),
            progress=False)

    # a part running on the second node: every process of that node is killed, the raylet included
    killer = Killer("convert_shard", lambda: two_nodes.node_processes(0), lambda part: two_nodes.node_processes(0))
    killer.start()
    res = _dcgan_data(two_nodes, "convert", "--source", "lsun", "--input", str(path), "--out", str(tmp_path / "ray"),
                      "--resolution", "32", "--shard-size", str(SHARD_SIZE))
    killer.done.set()
    assert res.returncode == 0, res.stderr[-3000:]
    assert killer.killed, "no conversion part was seen running on the second node"
    assert "7 parts ran on" in res.stdout, res.stdout
    assert (tmp_path / "ray" / "manifest.json").read_bytes() == (tmp_path / "here" / "manifest.json").read_bytes()
    shards = sorted(p.name for p in (tmp_path / "ray").glob("shard-*.tar"))
    assert shards == sorted(p.name for p in (tmp_path / "here").glob("shard-*.tar"))
    assert not list((tmp_path / "ray").glob("**/*.tmp"))
