"""What synchronised BatchNorm costs a step: the embedded preset (32x32, ngf = ndf = 64, global batch
128) on 2 ranks (torchrun, gloo, one thread each), with `model.sync_batchnorm` off and on, the arms
alternating within each round; throughput from metrics.jsonl's wall times after --warmup steps,
the median over rounds per arm. Synchronised, each BatchNorm layer adds one all-reduce of 2C + 1
numbers forward and one backward: G has 3 such layers and D 2, and D runs 3 times a step.

    python benchmarks/sync_batchnorm.py [--steps 60] [--rounds 3]

The preset's precision (auto: bf16 on a CPU with native bf16, fp32 elsewhere).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.preset_runs import BATCH, images_per_second, parse_args, train_args  # noqa: E402
from benchmarks.report import print_table, settings_of, write_result  # noqa: E402

RANKS = 2


def run_once(run_dir: Path, shards: str, steps: int, warmup: int, synced: bool) -> float:
    cmd = [sys.executable, "-m", "dcgan",
           *train_args(run_dir, shards, steps, "torchrun", f"model.sync_batchnorm={str(synced).lower()}",
                       "metrics.enabled=false", log_every=10),
           "--nproc", str(RANKS)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one core per rank: 2 ranks on this 2-core machine
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"training failed:\n{done.stderr[-3000:]}")
    return images_per_second(run_dir, warmup)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "sync_batchnorm", steps=60, warmup=20, rounds=3)
    rates: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for synced in (False, True):
                run = Path(tmp) / f"r{round_}-{int(synced)}"
                rates[synced].append(run_once(run, args.shards, args.steps, args.warmup, synced))
                print(f"round {round_ + 1}: sync_batchnorm={synced}: {rates[synced][-1]:.1f} img/s", flush=True)
    per_rank = BATCH // RANKS
    rows = [{"batchnorm": "synchronised" if synced else "per rank", "img_per_s": statistics.median(r),
             "ms_per_step": 1000 * BATCH / statistics.median(r), "normalised_over": BATCH if synced else per_rank,
             "rounds": [round(x, 1) for x in r]} for synced, r in rates.items()]
    rows[1]["vs_per_rank"] = rows[1]["img_per_s"] / rows[0]["img_per_s"]
    rows[0]["vs_per_rank"] = 1.0
    print_table(f"BatchNorm over {RANKS} ranks, global batch {BATCH}, median of {args.rounds} rounds",
                [("batchnorm", "batchnorm", "<13"), ("images per BN", "normalised_over", ">13d"),
                 ("img/s", "img_per_s", ">7.1f"), ("ms/step", "ms_per_step", ">8.1f"),
                 ("vs per rank", "vs_per_rank", ">11.3f")], rows)
    write_result(args.out, "sync_batchnorm", settings={**settings_of(args), "ranks": RANKS}, rows=rows)


if __name__ == "__main__":
    main()
