"""The paper's experiments across seeds: the embedded preset (32x32 Fashion-MNIST, the paper's
architecture at ngf = ndf = 64) trained from several seeds, FID/KID measured every --fid-every
steps into each run's metrics.jsonl, then the representation-learning protocol (`dcgan eval
features`) on each run's last checkpoint. The random-D and raw-pixel baselines do not depend on
the GAN's seed: they are measured once (random D over --random-seeds initialisations).

Writes benchmarks/results/paper_runs.json (every run's numbers), paper_runs.md (the SVM table:
trained D as mean +- std over the GAN seeds) and paper_runs_fid.png (FID against step, one line
per seed). Runs that finished are reused (--work keeps them), so an interrupted sweep continues.

    python benchmarks/paper_runs.py [--seeds 0,1,2] [--epochs 25] [--fid-every 2000]

The paper trains 25 epochs; on a 2-core CPU an epoch of the preset takes about 2 minutes (bf16).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import ttest_1samp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.preset_runs import PRESET, records  # noqa: E402
from benchmarks.report import settings_of, write_result  # noqa: E402

TASKS = ("fashion_all", "fashion_labels", "mnist_transfer")
# --quick: a check that the sweep works end to end in minutes, not a measurement
QUICK = ("--train-limit", "1000", "--test-limit", "500", "--labels", "200", "--subsets", "2", "--mnist-train", "1000",
         "--bn-images", "1000")


def dcgan(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "dcgan", *args], cwd=ROOT)
    if done.returncode:
        sys.exit(f"dcgan {' '.join(args[:2])} failed ({done.returncode})")


def train(run: Path, seed: int, args: argparse.Namespace) -> None:
    if (run / "done").exists():
        return
    settings = [f"data.shards={args.shards}", f"logging.run_dir={run}", f"optim.seed={seed}",
                f"optim.epochs={args.epochs}", f"optim.max_steps={args.max_steps}", f"eval.fid_every={args.fid_every}",
                f"eval.fid_samples={args.fid_samples}", "logging.progress=false"]
    dcgan("train", "--launcher", "torchrun", "--config", str(PRESET), *(x for s in settings for x in ("--set", s)),
          "--resume", "auto")
    (run / "done").write_text("")


def features(run: Path, out: Path, sources: str, args: argparse.Namespace) -> dict:
    report = out / "features.json"
    if not report.exists():
        dcgan("eval", "features", "--checkpoint", str(run), "--sources", sources, "--random-seeds",
              str(args.random_seeds), "--out", str(out), *(QUICK if args.quick else shlex.split(args.eval_args)))
        next(out.glob("features-*.json")).rename(report)
    return json.loads(report.read_text())


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def initialisations(source: dict) -> list[dict]:
    """A source's evaluations: one per random-D seed, or the only one."""
    return source.get("seeds", [source])


def subset_accuracies(source: dict) -> np.ndarray:
    """(initialisations, subsets) accuracies at the few-label task; every source uses the same label subsets."""
    return np.array([[r["accuracy"] for r in run["fashion_labels"]["runs"]] for run in initialisations(source)])


def paired(trained: list[dict], baseline: dict) -> dict[str, float]:
    """Trained D against a baseline on the shared label subsets: per subset, the mean over GAN seeds minus the
    mean over the baseline's initialisations; how many subsets it wins and the paired t of the differences."""
    diff = np.concatenate([subset_accuracies(t) for t in trained]).mean(0) - subset_accuracies(baseline).mean(0)
    t = float(ttest_1samp(diff, 0.0).statistic) if len(diff) > 1 and diff.std() > 0 else 0.0
    return {"mean_difference": float(diff.mean()), "wins": int((diff > 0).sum()), "subsets": len(diff),
            "paired_t": t}


def choices(source: dict) -> list[dict[str, Any]]:
    """The preprocessing and c each fit chose, and whether c is an end of the grid the CV finally searched."""
    picked = []
    for run in initialisations(source):
        for task in TASKS:
            for fit in run[task].get("runs", [run[task]]):
                grid = sorted(float(c) for c in fit["cv_accuracy"][fit["preprocessing"]])
                picked.append({"task": task, "preprocessing": fit["preprocessing"], "c": fit["c"],
                               "edge": fit["c"] in (grid[0], grid[-1]) and len(grid) > 1})
    return picked


def fid_curves(runs: dict[int, Path]) -> dict[int, list[tuple[int, float, float]]]:
    """(step, FID, KID) of each measurement of each run."""
    return {seed: [(r["step"], r["fid"], r["kid"]) for r in records(run) if "fid" in r] for seed, run in runs.items()}


def plot(curves: dict[int, list[tuple[int, float, float]]], path: Path, samples: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), dpi=120)
    for column, (axis, name) in enumerate(zip(axes, ("FID", "KID"), strict=True)):
        for seed, points in curves.items():
            axis.plot([p[0] for p in points], [p[1 + column] for p in points], marker="o", label=f"seed {seed}")
        axis.set_xlabel("step (batch 128)")
        axis.set_ylabel(f"{name} ({samples:,} samples)")
        axis.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path)


def headers(protocol: dict) -> list[str]:
    return [f"Fashion-MNIST, {protocol['fashion_train_used']:,} labels",
            f"Fashion-MNIST, {protocol['labels']:,} labels (mean of {protocol['subsets']} subsets)",
            f"MNIST transfer ({protocol['mnist_train']:,} train, {protocol['mnist_test']:,} test)"]


def table(trained: dict[str, dict], baselines: dict, seeds: int) -> str:
    def cell(s: dict[str, float]) -> str:
        return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f} %"

    lines = [f"| features | {' | '.join(headers(baselines['protocol']))} |",
             "| --- | " + " | ".join("---:" for _ in TASKS) + " |",
             f"| trained D (mean ± std over {seeds} GAN seeds) | " + " | ".join(cell(trained[t]) for t in TASKS) + " |"]
    for name, result in baselines["sources"].items():
        if "seeds" in result:  # a random D: spread over its initialisations
            cells = [cell({"mean": result[t]["accuracy"], "std": result[t]["accuracy_std"]}) for t in TASKS]
            lines.append(f"| {name} (mean ± std over {len(result['seeds'])} seeds) | " + " | ".join(cells) + " |")
        else:  # raw pixels: one deterministic set of features, the only spread is the label subsets'
            cells = [f"{100 * result[t]['accuracy']:.2f} %" for t in TASKS]
            cells[1] += f" (subsets: ± {100 * result['fashion_labels']['accuracy_std']:.2f})"
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def margins(trained: dict[str, dict], baselines: dict, comparisons: dict[str, dict], picked: dict[str, list],
            final: dict[str, dict]) -> str:
    lines = ["", "| trained D minus | " + " | ".join(headers(baselines["protocol"])) + " | subsets won, paired t |",
             "| --- | " + " | ".join("---:" for _ in TASKS) + " | ---: |"]
    for name, result in baselines["sources"].items():
        diffs = [f"{100 * (trained[t]['mean'] - result[t]['accuracy']):+.2f} points" for t in TASKS]
        pair = comparisons[name]
        lines.append(f"| {name} | " + " | ".join(diffs) + f" | {pair['wins']} of {pair['subsets']}, "
                     f"t = {pair['paired_t']:.1f} |")
    edges = sum(c["edge"] for fits in picked.values() for c in fits)
    fits = sum(len(f) for f in picked.values())
    lines += ["", f"C at an end of the searched grid: {edges} of {fits} fits."]
    if final:
        lines.append(f"Final FID {final['fid']['mean']:.1f} ± {final['fid']['std']:.1f}, "
                     f"KID {final['kid']['mean']:.4f} ± {final['kid']['std']:.4f} (over the GAN seeds).")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--max-steps", type=int, default=0, help="> 0: stop there instead (quick checks)")
    parser.add_argument("--quick", action="store_true", help="small evaluation sets: checks the sweep only")
    parser.add_argument("--fid-every", type=int, default=2000)
    parser.add_argument("--fid-samples", type=int, default=1000)
    parser.add_argument("--random-seeds", type=int, default=3)
    parser.add_argument("--eval-args", default="",
                        help="more options for `dcgan eval features`, e.g. \"--train-limit 5000\"")
    parser.add_argument("--shards", type=Path, default=ROOT / "data" / "fashion-mnist-32")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "paper-runs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "paper_runs.json")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = {seed: args.work / f"seed-{seed}" for seed in seeds}
    for seed, run in runs.items():
        train(run, seed, args)
    per_seed = {seed: features(run, run / "eval", "trained", args)["sources"]["trained D"]
                for seed, run in runs.items()}
    baselines = features(runs[seeds[0]], args.work / "baselines", "random,pixels", args)
    trained = {t: summary([per_seed[s][t]["accuracy"] for s in seeds]) for t in TASKS}
    curves = fid_curves(runs)
    plot(curves, args.out.with_name("paper_runs_fid.png"), args.fid_samples)
    comparisons = {name: paired(list(per_seed.values()), result) for name, result in baselines["sources"].items()}
    picked = {"trained D": [c for s in seeds for c in choices(per_seed[s])],
              **{name: choices(result) for name, result in baselines["sources"].items()}}
    final = {"fid": summary([points[-1][1] for points in curves.values()]),
             "kid": summary([points[-1][2] for points in curves.values()])} if all(curves.values()) else {}
    markdown = table(trained, baselines, len(seeds)) + margins(trained, baselines, comparisons, picked, final)
    args.out.with_suffix(".md").write_text(markdown)
    print(markdown)
    write_result(args.out, "paper_runs", settings=settings_of(args), trained_d=trained,
                 trained_d_per_seed={s: {t: per_seed[s][t]["accuracy"] for t in TASKS} for s in seeds},
                 baselines={name: {t: r[t] for t in TASKS} for name, r in baselines["sources"].items()},
                 paired_few_labels=comparisons, choices=picked, fid=curves, final_fid_kid=final,
                 protocol=baselines["protocol"])

if __name__ == "__main__":
    main()
