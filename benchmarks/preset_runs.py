"""Benchmarks that time whole `dcgan train` runs of the embedded preset: the command, the
arguments they share, and throughput read back from metrics.jsonl's wall times."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "fashion-mnist-32.toml"
BATCH = 128  # the preset's global batch


def parse_args(description: str, result_name: str, steps: int, warmup: int, rounds: int) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--shards", type=Path, default=ROOT / "data" / "fashion-mnist-32")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--warmup", type=int, default=warmup, help="steps left out of the throughput")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / f"{result_name}.json")
    args = parser.parse_args()
    if not (Path(args.shards) / "manifest.json").is_file():
        sys.exit(f"{args.shards}: no shard set; run `make data` first")
    return args


def train_args(run_dir: Path, shards: str, steps: int, launcher: str, *settings: str, log_every: int = 1
               ) -> list[str]:
    """`train` with the preset, one checkpoint at the end and no sample grids in between."""
    args = ["train", "--config", str(PRESET), "--launcher", launcher]
    for item in (f"data.shards={shards}", f"logging.run_dir={run_dir}", f"optim.max_steps={steps}",
                 f"logging.log_every={log_every}", "logging.progress=false", f"checkpoint.every_steps={steps}",
                 "logging.sample_every=100000", *settings):
        args += ["--set", item]
    return args


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def images_per_second(run_dir: Path, warmup: int) -> float:
    """From the first record at or after `warmup` steps to the last one."""
    logged = records(run_dir)
    start = next(r for r in logged if r["step"] >= warmup)
    end = logged[-1]
    return (end["step"] - start["step"]) * BATCH / (end["time"] - start["time"])
