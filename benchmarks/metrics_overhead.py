"""What the Prometheus metrics cost: training throughput with metrics on (scraped every second
by a real Prometheus) and off, side by side, and the exporter's own cost per step.

This machine's throughput drifts by 10-20 % over minutes, more than the effect measured, so
the end-to-end arms are paired with a bound that does not drift: the exporter's calls timed in
a tight loop (per step: one counter increment and two histogram observations; per log window:
the gauges; per second: rendering /metrics for a scrape), as a fraction of a training step.

Both arms run the same `dcgan train --launcher torchrun` (the embedded Fashion-MNIST preset: the
paper's DCGAN at 32x32, ngf = ndf = 64, bf16, batch 128, one process on all cores) for --steps
steps; throughput comes from metrics.jsonl's wall times after --warmup steps. The arms alternate
within each round; the figure per arm is the median over rounds.

    python benchmarks/metrics_overhead.py [--steps 200] [--rounds 3]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.preset_runs import images_per_second, parse_args, train_args  # noqa: E402
from benchmarks.report import print_table, write_result  # noqa: E402
from cluster.monitor import start_prometheus, write_config  # noqa: E402
from common.ports import free_port  # noqa: E402


def run_once(run_dir: Path, shards: str, steps: int, warmup: int, metrics_on: bool, port: int) -> float:
    cmd = [sys.executable, "-m", "dcgan",
           *train_args(run_dir, shards, steps, "torchrun", f"metrics.enabled={str(metrics_on).lower()}",
                       f"metrics.port={port}", log_every=10)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"training failed:\n{done.stderr[-3000:]}")
    return images_per_second(run_dir, warmup)


def exporter_cost_us(log_every: int, repeats: int = 20000) -> dict[str, float]:
    """Microseconds per call of what a rank does for its metrics, with a live HTTP endpoint."""
    from trainer.config import MetricsConfig
    from trainer.telemetry import RankMetrics

    with tempfile.TemporaryDirectory() as tmp:
        metrics = RankMetrics(MetricsConfig(port=free_port(), targets_dir=tmp), "bench", 0, 0, Path(tmp) / "run")
        summary = {k: 0.5 for k in ("img_per_s", "loss_d", "loss_g", "grad_norm_d", "grad_norm_g", "d_real",
                                    "d_fake", "d_fake_after")}
        try:
            started = time.perf_counter()
            for _ in range(repeats):
                metrics.on_step(128, 0.25, 0.001)
            on_step = (time.perf_counter() - started) / repeats * 1e6
            started = time.perf_counter()
            for i in range(repeats // 10):
                metrics.on_window(summary, i, 0, 0, 0, {"g": 2e-4, "d": 2e-4}, {"g": 1.0, "d": 1.0})
            on_window = (time.perf_counter() - started) / (repeats // 10) * 1e6
            started = time.perf_counter()
            for _ in range(200):
                urllib.request.urlopen(f"http://127.0.0.1:{metrics.port}/metrics").read()
            scrape = (time.perf_counter() - started) / 200 * 1e6
        finally:
            metrics.close()
    return {"on_step_us": on_step, "on_window_us": on_window, "scrape_us": scrape,
            "per_step_us": on_step + on_window / log_every}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "metrics_overhead", steps=200, warmup=20, rounds=3)
    results: dict[str, list[float]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory(prefix="metrics-overhead-") as tmp:
        runs = Path(tmp) / "runs"
        config = write_config(Path(tmp) / "prometheus.yml", runs / "prometheus-targets", scrape_interval="1s")
        prometheus, _ = start_prometheus(config, Path(tmp) / "data", "127.0.0.1", free_port())
        try:
            for round_ in range(args.rounds):
                for arm in ("off", "on"):
                    img_s = run_once(runs / f"{arm}-{round_}", args.shards, args.steps, args.warmup, arm == "on",
                                     free_port())
                    results[arm].append(img_s)
                    print(f"round {round_}: metrics {arm}: {img_s:.1f} img/s", flush=True)
        finally:
            prometheus.terminate()
            prometheus.wait()
    off, on = statistics.median(results["off"]), statistics.median(results["on"])
    rows = [{"arm": "metrics off", "img_per_s": off, "ratio": 1.0},
            {"arm": "metrics on, scraped every 1 s", "img_per_s": on, "ratio": on / off}]
    print_table(f"dcgan train, {args.steps} steps, batch 128, 32x32 bf16, median of {args.rounds} rounds",
                [("arm", "arm", "<30"), ("img/s", "img_per_s", ">7.1f"), ("x off", "ratio", ">6.3f")], rows)
    cost = exporter_cost_us(log_every=10)
    step_us = 128 / off * 1e6
    # one scrape per second: its rendering steals that share of every step's wall time
    fraction = (cost["per_step_us"] + cost["scrape_us"] * step_us / 1e6) / step_us
    print(f"\nexporter: {cost['on_step_us']:.1f} us per step, {cost['on_window_us']:.1f} us per log window, "
          f"{cost['scrape_us']:.0f} us per scrape; at {step_us / 1e3:.0f} ms per step that is "
          f"{fraction * 100:.3f} % of the step")
    write_result(args.out, "metrics_overhead", steps=args.steps, warmup=args.warmup, rounds=args.rounds, rows=rows,
                 runs=results, exporter_cost=cost, step_us=step_us, exporter_fraction_of_step=fraction)


if __name__ == "__main__":
    main()
