"""Prometheus metrics: a real Prometheus scrapes a 2-rank training; the dashboard's queries answer."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from conftest import ROOT, run_dcgan, tiny_train_args

from cluster.monitor import find_prometheus
from common.ports import free_port
from trainer.config import MetricsConfig
from trainer.telemetry import NoMetrics, RankMetrics, open_metrics

DASHBOARD = ROOT / "cluster" / "monitoring" / "grafana" / "dashboards" / "dcgan-training.json"


def test_a_busy_port_moves_to_the_next_free_one_and_the_target_file_comes_and_goes(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        metrics = RankMetrics(MetricsConfig(port=port, targets_dir=str(tmp_path / "targets")), "busy", rank=3,
                              local_rank=0, run_dir=tmp_path / "busy")
        try:
            assert metrics.port > port
            assert f"port {port} is busy; rank 3 serves on 127.0.0.1:{metrics.port}" in capsys.readouterr().err
            target = json.loads((tmp_path / "targets" / "busy-rank-00003.json").read_text())
            assert target[0]["targets"] == [f"127.0.0.1:{metrics.port}"]
            assert target[0]["labels"]["rank"] == "3" and target[0]["labels"]["run"] == "busy"
            metrics.on_step(16, 0.02, 0.001)
            body = urllib.request.urlopen(f"http://127.0.0.1:{metrics.port}/metrics").read().decode()
            line = next(x for x in body.splitlines() if x.startswith("dcgan_images_total{"))
            assert line.startswith('dcgan_images_total{node="') and line.endswith('rank="3",run="busy"} 16.0')
        finally:
            metrics.close()
    assert not (tmp_path / "targets" / "busy-rank-00003.json").exists()


def test_training_goes_on_without_metrics_when_they_cannot_be_served(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    metrics = open_metrics(MetricsConfig(port=free_port(), targets_dir=str(blocker / "targets")), "r", 0, 0,
                           tmp_path / "r")
    assert isinstance(metrics, NoMetrics)
    assert "metrics: rank 0 trains without metrics" in capsys.readouterr().err
    metrics.on_step(1, 0.1, 0.0)
    metrics.close()


def test_every_candidate_port_taken_leaves_training_without_metrics_in_one_line(tmp_path, capsys, fashion_shards):
    from trainer.telemetry import PORT_ATTEMPTS

    with contextlib.ExitStack() as stack:
        for _ in range(50):  # a run of PORT_ATTEMPTS free ports, each held by a listening socket
            first = free_port()
            try:
                for port in range(first, first + PORT_ATTEMPTS):
                    taken = stack.enter_context(socket.socket())
                    taken.bind(("127.0.0.1", port))
                    taken.listen()
                break
            except OSError:
                stack.close()
        else:
            pytest.skip(f"no run of {PORT_ATTEMPTS} free ports on 127.0.0.1")
        metrics = open_metrics(MetricsConfig(port=first, targets_dir=str(tmp_path / "targets")), "r", 0, 0,
                               tmp_path / "r")
        assert isinstance(metrics, NoMetrics)
        # and a real run: it trains, checkpoints and logs, with that one line about its metrics
        run = tmp_path / "run"
        res = run_dcgan(*tiny_train_args(fashion_shards, run, "optim.max_steps=5", "metrics.enabled=true",
                                         f"metrics.port={first}", f"metrics.targets_dir={tmp_path / 'targets'}"))
    said = f"trains without metrics: no free port in {first}-{first + PORT_ATTEMPTS - 1} on 127.0.0.1"
    assert res.returncode == 0, res.stderr[-3000:]
    assert [line for line in res.stderr.splitlines() if "metrics" in line] == [f"metrics: rank 0 {said}"]
    assert (run / "checkpoints" / "step-00000005").is_dir() and (run / "metrics.jsonl").read_text()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"metrics: rank 0 {said}"]
    assert not (tmp_path / "targets").exists() or not list((tmp_path / "targets").iterdir())


def _query(url: str, expr: str, at: float | None = None) -> list[dict]:
    params = {"query": expr, **({"time": f"{at:.3f}"} if at else {})}
    with urllib.request.urlopen(f"{url}/api/v1/query?{urllib.parse.urlencode(params)}", timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


QUALITY = ("dcgan_fid", "dcgan_kid")  # filled only with eval.fid_every: checked against the exporter below


def _dashboard_queries(with_quality: bool = False) -> list[tuple[str, str]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t["expr"]) for p in panels for t in p["targets"]
            if with_quality or not any(m in t["expr"] for m in QUALITY)]


def test_every_dashboard_metric_is_exported(tmp_path):
    """Each metric name a panel queries (FID/KID included) appears on a rank's /metrics."""
    metrics = RankMetrics(MetricsConfig(port=free_port(), targets_dir=str(tmp_path)), "names", rank=0, local_rank=0,
                          run_dir=tmp_path / "names")
    try:
        metrics.on_quality({"fid": 81.2, "kid": 0.044})
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics.port}/metrics").read().decode()
    finally:
        metrics.close()
    exported = {line.split()[2] for line in body.splitlines() if line.startswith("# TYPE")}
    exported |= {f"{name}_{suffix}" for name in exported for suffix in ("total", "bucket", "sum", "count")}
    queried = {name for _, expr in _dashboard_queries(with_quality=True) for name in re.findall(r"dcgan_[a-z_]+", expr)}
    assert queried and queried <= exported, queried - exported
    assert 'dcgan_fid{node="' in body and body.count("81.2") == 1


@pytest.fixture()
def monitored_training(fashion_shards, tmp_path):
    """`dcgan monitor` (Prometheus scraping every second) and a 2-rank torchrun training, both running."""
    # prometheus_client is no optional extra (ray[default] brings it; trainer.telemetry, imported above, needs
    # it), so nothing here is skipped; a missing Prometheus server fails with the line saying how to install it
    find_prometheus()
    runs = tmp_path / "runs"
    settings = [f"logging.run_dir={runs / 'watched'}", f"metrics.port={free_port()}"]
    monitor = subprocess.Popen(
        [sys.executable, "-m", "dcgan", "monitor", "--config", str(ROOT / "configs" / "fashion-mnist-32.toml"),
         "--set", settings[0], "--port", str(free_port()), "--scrape-interval", "1s"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    training = None
    try:
        line = monitor.stdout.readline()
        assert line.startswith("Prometheus at http://127.0.0.1:"), line + monitor.stderr.read()
        url = line.split()[2].rstrip(",")
        args = tiny_train_args(fashion_shards, runs / "watched", "optim.max_steps=100000", "checkpoint.every_steps=100",
                               "logging.log_every=5", "logging.sample_every=100000", settings[1])
        training = subprocess.Popen([sys.executable, "-m", "dcgan", *args, "--nproc", "2"], cwd=ROOT,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True)
        yield url, runs / "watched", training
    finally:
        for process in (training, monitor):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()


def test_prometheus_scrapes_both_ranks_and_every_dashboard_query_answers(monitored_training):
    url, run_dir, training = monitored_training
    deadline = time.monotonic() + 180
    while True:  # until both ranks have been scraped for a while and a checkpoint was saved
        assert training.poll() is None, training.stderr.read()[-3000:]
        up = _query(url, 'sum(up{job="dcgan"})')
        saved = _query(url, "min(dcgan_checkpoints_total)")
        if up and float(up[0]["value"][1]) == 2 and saved and float(saved[0]["value"][1]) >= 1:
            break
        assert time.monotonic() < deadline, "Prometheus never saw both ranks and a checkpoint"
        time.sleep(1)
    time.sleep(12)  # a rate window of steady training after the checkpoint

    with urllib.request.urlopen(f"{url}/api/v1/targets?state=active", timeout=10) as r:
        targets = json.load(r)["data"]["activeTargets"]
    ours = [t for t in targets if t["labels"].get("job") == "dcgan"]
    assert sorted(t["labels"]["rank"] for t in ours) == ["0", "1"] and {t["health"] for t in ours} == {"up"}

    empty = []
    for title, expr in _dashboard_queries():
        concrete = expr.replace("$__rate_interval", "10s").replace("$run", ".+")
        if not _query(url, concrete):
            empty.append(f"{title}: {concrete}")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)

    # the counter's rate against metrics.jsonl over the same 10 s
    now = time.time()
    rate = float(_query(url, "sum(rate(dcgan_images_total[10s]))", at=now)[0]["value"][1])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    window = [r for r in records if now - 10 <= r["time"] <= now]
    assert len(window) >= 3
    logged = (window[-1]["step"] - window[0]["step"]) * 32 / (window[-1]["time"] - window[0]["time"])
    assert abs(rate - logged) / logged < 0.10, (rate, logged)


def test_metrics_can_be_switched_off_and_unknown_metric_keys_are_refused(fashion_shards, tmp_path):
    res = run_dcgan(*tiny_train_args(fashion_shards, tmp_path / "off", "optim.max_steps=3", "metrics.enabled=false"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert not (tmp_path / "prometheus-targets").exists()
    res = run_dcgan(*tiny_train_args(fashion_shards, tmp_path / "bad", "metrics.prot=1"))
    assert res.returncode == 2 and "unknown config key 'metrics.prot'" in res.stderr
