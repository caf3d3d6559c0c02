"""`dcgan monitor`: a Prometheus on this machine that scrapes every rank of every run.

The ranks announce themselves in a targets folder (trainer/telemetry.py); the configuration
written here points Prometheus's file_sd at that folder (and at Ray's own service-discovery
file when a Ray head runs here), so runs that start later are picked up without a restart.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from common.ports import free_port_from

RAY_SERVICE_DISCOVERY = Path("/tmp/ray/prom_metrics_service_discovery.json")
UNPACKED = Path(sys.prefix) / "prometheus" / "usr" / "bin" / "prometheus"  # where `make monitoring` puts it
STOP_GRACE_S = 10.0


class MonitorError(RuntimeError):
    """Prometheus is missing or did not start."""


def find_prometheus() -> str:
    found = shutil.which("prometheus") or (str(UNPACKED) if UNPACKED.is_file() else None)
    if not found:
        raise MonitorError("Prometheus is not installed: `make monitoring` unpacks Debian's package into the "
                           "venv (no service, no root), or `sudo apt-get install prometheus`")
    return found


def write_config(path: Path, targets: Path, scrape_interval: str = "5s") -> Path:
    """A prometheus.yml (JSON is YAML) with absolute paths, so it works from any directory."""
    scrape_configs = [{
        "job_name": "dcgan", "honor_labels": True, "scrape_interval": scrape_interval,
        "file_sd_configs": [{"files": [str(targets.resolve() / "*.json")], "refresh_interval": "1s"}],
    }]
    if RAY_SERVICE_DISCOVERY.is_file():
        scrape_configs.append({"job_name": "ray",
                               "file_sd_configs": [{"files": [str(RAY_SERVICE_DISCOVERY)]}]})
    config = {"global": {"scrape_interval": scrape_interval, "evaluation_interval": "15s"},
              "scrape_configs": scrape_configs}
    path.parent.mkdir(parents=True, exist_ok=True)
    targets.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=1) + "\n")
    return path


def start_prometheus(config: Path, data_dir: Path, host: str, port: int, timeout_s: float = 60
                     ) -> tuple[subprocess.Popen, str]:
    """Start Prometheus and wait until it is ready; returns the process and its URL.

    The caller owns the process from then on and ends it with stop_prometheus.
    """
    binary = find_prometheus()
    chosen = free_port_from(host, port)
    if chosen is None:
        raise MonitorError(f"no free port in {port}-{port + 99} on {host}")
    if chosen != port:
        print(f"monitor: port {port} is busy; Prometheus listens on {host}:{chosen}", file=sys.stderr)
    url = f"http://{host}:{chosen}"
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "prometheus.log", "ab") as log:
        process = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={data_dir}",
                                    f"--web.listen-address={host}:{chosen}", "--storage.tsdb.retention.time=30d"],
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_until_ready(process, url, time.monotonic() + timeout_s, data_dir / "prometheus.log")
    except BaseException:  # a stop signal while it starts, too: it must not outlive us holding the port
        stop_prometheus(process)
        raise
    return process, url


def _wait_until_ready(process: subprocess.Popen, url: str, deadline: float, log: Path) -> None:
    while True:
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise MonitorError(f"Prometheus did not start; see {log}")
        time.sleep(0.5)


def stop_prometheus(process: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM (Prometheus then flushes its head block and closes the TSDB), SIGKILL after grace_s."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
