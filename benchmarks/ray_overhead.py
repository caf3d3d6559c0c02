"""What Ray costs: launch-to-first-step latency and 1- vs 2-worker throughput, against torchrun.

Every launcher runs the same `dcgan train` (the embedded Fashion-MNIST preset: the paper's
DCGAN at 32x32, ngf = ndf = 64, bf16, global batch 128) for --steps steps, logging every step:

- torchrun      `dcgan train --launcher torchrun --nproc N` (N = 1: the process itself trains)
- ray           `dcgan train --workers N`: starts a local Ray, then the Ray Train worker group
- ray job       the same command through `ray job submit` to a running head (its start not timed)

Latency: from the launch to the first step's record in metrics.jsonl (records carry wall time).
Throughput: images per second between the record after --warmup steps and the last one.
Launchers alternate within each round and the figures are medians over rounds; the head for
`ray job` runs only during its own runs, so no other launcher shares the cores with it.

    python benchmarks/ray_overhead.py [--steps 150] [--warmup 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.preset_runs import images_per_second, parse_args, records, train_args  # noqa: E402
from benchmarks.report import print_table, write_result  # noqa: E402
from cluster.testing.local_head import LocalRayHead  # noqa: E402


def measure(run_dir: Path, launched: float, warmup: int) -> dict:
    return {"first_step_s": records(run_dir)[0]["time"] - launched,
            "img_per_s": images_per_second(run_dir, warmup)}


def run_once(launcher: str, ranks: int, run_dir: Path, args: argparse.Namespace) -> dict:
    cli = train_args(run_dir, args.shards, args.steps, "ray" if launcher == "ray job" else launcher)
    cli += ["--nproc", str(ranks)] if launcher == "torchrun" else ["--workers", str(ranks)]
    with contextlib.ExitStack() as stack:
        if launcher == "ray job":
            head = stack.enter_context(LocalRayHead())
            cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", head.dashboard_url,
                   "--runtime-env", "cluster/examples/runtime_env.yaml", "--", "dcgan", *cli]
            env = head.env
        else:
            cmd, env = [sys.executable, "-m", "dcgan", *cli], None
        launched = time.time()
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.time() - launched
    if done.returncode:
        sys.exit(f"{launcher} x{ranks} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return {"wall_s": wall, **measure(run_dir, launched, args.warmup)}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "ray_overhead", steps=150, warmup=10, rounds=2)
    plans = [("torchrun", 1), ("ray", 1), ("torchrun", 2), ("ray", 2), ("ray job", 2)]
    runs: dict[tuple[str, int], list[dict]] = {plan: [] for plan in plans}
    with tempfile.TemporaryDirectory(prefix="ray-overhead-") as tmp:
        for round_ in range(args.rounds):
            for launcher, ranks in plans:
                run_dir = Path(tmp) / f"{launcher.replace(' ', '-')}-{ranks}-{round_}"
                result = run_once(launcher, ranks, run_dir, args)
                runs[launcher, ranks].append(result)
                print(f"round {round_}: {launcher} x{ranks}: {result}", flush=True)
    rows = [{"launcher": launcher, "ranks": ranks,
             **{k: statistics.median(r[k] for r in runs[launcher, ranks]) for k in runs[launcher, ranks][0]}}
            for launcher, ranks in plans]
    base = {r["ranks"]: r for r in rows if r["launcher"] == "torchrun"}
    for r in rows:
        r["vs_torchrun"] = r["img_per_s"] / base[r["ranks"]]["img_per_s"]
        r["extra_latency_s"] = r["first_step_s"] - base[r["ranks"]]["first_step_s"]
    print_table(f"dcgan train, {args.steps} steps, batch 128, 32x32 bf16, median of {args.rounds} rounds",
                [("launcher", "launcher", "<9"), ("ranks", "ranks", ">5"), ("first step (s)", "first_step_s", ">14.1f"),
                 ("+ vs torchrun (s)", "extra_latency_s", ">17.1f"), ("img/s", "img_per_s", ">7.0f"),
                 ("x torchrun", "vs_torchrun", ">10.2f"), ("wall (s)", "wall_s", ">8.1f")], rows)
    write_result(args.out, "ray_overhead", steps=args.steps, warmup=args.warmup, rounds=args.rounds, rows=rows,
                 runs={f"{launcher} x{ranks}": r for (launcher, ranks), r in runs.items()})


if __name__ == "__main__":
    main()
