"""The reliability soak: faults change nothing but time.

One training (fp32 on the CPU, tiny nets on the Fashion-MNIST shards, one worker) runs twice per
launcher: once undisturbed, once SIGKILLed from outside at --kills random moments, one of them
while a checkpoint is being written (the checkpoint's temporary folder is on disk at that
instant, and stays there after the kill, which shows where the kill landed).

- ray: the Ray Train worker process is killed; Ray restarts the worker group from the newest
  complete checkpoint (cluster.max_failures is set above the number of kills).
- torchrun: the whole process group is killed; `dcgan train --resume auto` starts it again.
- zero2: as torchrun, on 2 ranks with ZeRO stage 2 (each rank holds half of the Adam state).

Both runs must end the same: each engine's weights, Adam state and counters, every rank's RNG
states, and the step and epoch counters, bit-identical, or for zero2 within --atol (gloo's
reductions on 2 ranks are deterministic, so the table says which of the two held). The table
gives each kill (at which step, in what phase) and the time the faults cost.

    python benchmarks/soak.py [--launchers ray,torchrun,zero2] [--steps 60] [--kills 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import print_table, settings_of, write_result  # noqa: E402
from cluster.ray_checkpointer import staged_folders  # noqa: E402
from trainer.checkpoint import list_checkpoints  # noqa: E402
from trainer.checkpoint_io import safe_load  # noqa: E402

EVERY = 10  # steps between checkpoints
# what each soak runs: (launcher, extra settings, extra arguments)
MODES = {"ray": ("ray", [], []), "torchrun": ("torchrun", [], []),
         "zero2": ("torchrun", ["precision.zero_stage=2"], ["--nproc", "2"])}


def train_args(shards: Path, run_dir: Path, steps: int, mode: str, kills: int) -> list[str]:
    launcher, settings, extra = MODES[mode]
    sets = ["model.ngf=8", "model.ndf=8", "optim.batch_size=32", "data.shuffle_buffer=256", "precision.dtype=fp32",
            "logging.progress=false", "logging.log_every=1", "logging.sample_every=1000", "metrics.enabled=false",
            f"optim.max_steps={steps}", f"checkpoint.every_steps={EVERY}", "checkpoint.keep_last=100",
            f"cluster.max_failures={kills + 1}", f"data.shards={shards}", f"logging.run_dir={run_dir}", *settings]
    args = [sys.executable, "-m", "dcgan", "train", "--config", str(ROOT / "configs" / "fashion-mnist-32.toml"),
            "--launcher", launcher, *extra]
    for item in sets:
        args += ["--set", item]
    return args


def last_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError):
        return 0  # not written yet, or caught mid-line


def train_worker(driver: psutil.Process) -> psutil.Process | None:
    """The Ray Train worker among the driver's descendants (its process title names the actor)."""
    for child in driver.children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


def being_written(launcher: str, run_dir: Path, step: int) -> bool:
    """Whether checkpoint `step` is being written now: the trainer assembles it in a temporary folder
    beside the final one; a Ray worker stages its part in the temp directory before Ray uploads it."""
    if launcher == "ray":
        return any((staged / f"step-{step:08d}").exists() for staged in staged_folders(str(run_dir)))
    return (run_dir / "checkpoints" / f".tmp-step-{step:08d}").exists()


def kill_plan(steps: int, kills: int, rng: random.Random) -> list[tuple[int, str]]:
    """(step, phase) per kill, in order: one while a checkpoint is written, the others after random
    steps more than a checkpoint interval away from it (two of those may fall in one interval: the
    restart then repeats the same steps, which the comparison must survive too)."""
    saving = rng.randrange(EVERY * 2, steps, EVERY)
    others = rng.sample([s for s in range(EVERY + 1, steps - 1) if abs(s - saving) > EVERY], kills - 1)
    plan = [(s, "training") for s in others] + [(saving, "writing a checkpoint")]
    return sorted(plan)


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise RuntimeError(f"training ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.002)


def run_with_kills(args: list[str], run_dir: Path, launcher: str, plan: list[tuple[int, str]]) -> list[dict]:
    """Train under `plan`'s kills; returns what each kill hit."""
    log = open(run_dir.with_suffix(".log"), "w")
    proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    hits = []
    try:
        for step, phase in plan:
            if phase == "training":
                wait_for(lambda s=step: last_step(run_dir) >= s, proc, f"step {step}")
            else:
                wait_for(lambda s=step: being_written(launcher, run_dir, s), proc,
                         f"the checkpoint of step {step} being written")
            killed_at = time.monotonic()
            if launcher == "ray":
                worker = None
                while worker is None:
                    worker = train_worker(psutil.Process(proc.pid))
                worker.send_signal(signal.SIGKILL)
            else:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            time.sleep(0.2)  # the kill has landed: what it left behind shows where
            landed = phase if phase == "training" else (
                "writing a checkpoint" if being_written(launcher, run_dir, step) else "just after a checkpoint")
            hits.append({"planned_step": step, "step_seen": last_step(run_dir), "phase": landed})
            if launcher == "torchrun":
                proc = subprocess.Popen([*args, "--resume", "auto"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            hits[-1]["kill_to_restart_s"] = time.monotonic() - killed_at
        if proc.wait(timeout=1200):
            raise RuntimeError(f"the faulty run failed: see {log.name}")
        if left := staged_folders(str(run_dir)):  # the run removes what its killed workers staged
            raise RuntimeError(f"the faulty run left its staged checkpoint parts: {', '.join(map(str, left))}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    return hits


def differences(a, b, path: str = "", atol: float = 0.0) -> list[str]:
    """Every place where two checkpoint objects differ (floating-point tensors by more than `atol`);
    a type it cannot compare is a difference."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return [f"{path}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"]
        if torch.equal(a, b):
            return []
        if atol and a.is_floating_point() and torch.allclose(a, b, rtol=0.0, atol=atol):
            return []
        return [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path} keys"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}/{k}", atol)]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path} length"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in differences(x, y, f"{path}[{i}]", atol)]
    if isinstance(a, (int, float, str, bool, bytes, type(None))):
        return [] if a == b else [path]
    if type(a) is type(b) and hasattr(a, "__dict__"):  # DeepSpeed's records: LossScaler, fragment_address
        return differences(vars(a), vars(b), f"{path}.__dict__", atol)
    return [f"{path}: cannot compare {type(a).__name__}"]


def compare(reference: Path, faulty: Path, atol: float = 0.0) -> list[str]:
    a, b = list_checkpoints(reference / "checkpoints")[-1], list_checkpoints(faulty / "checkpoints")[-1]
    if a.name != b.name:
        return [f"newest checkpoints {a.name} and {b.name}"]
    diffs = []
    parts = sorted(p.relative_to(a) for p in a.rglob("*.pt"))
    if parts != sorted(p.relative_to(b) for p in b.rglob("*.pt")):
        return [f"{a.name}: different files"]
    for path in parts:
        diffs += differences(safe_load(a / path), safe_load(b / path), str(path), atol)
    meta_a, meta_b = (json.loads((c / "trainer.json").read_text()) for c in (a, b))
    for key in ("step", "epoch", "step_in_epoch", "skipped_steps"):
        if meta_a.get(key) != meta_b.get(key):
            diffs.append(f"trainer.json {key}: {meta_a.get(key)} != {meta_b.get(key)}")
    # ds_config and ds_version are DeepSpeed's own record of its settings: the same; the rest must be too
    return [d for d in diffs if "ds_config" not in d and "ds_version" not in d]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launchers", default="ray,torchrun,zero2", help=f"of {', '.join(MODES)}")
    parser.add_argument("--atol", type=float, default=1e-6, help="zero2's tolerance on every float tensor")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="picks the kill points")
    parser.add_argument("--shards", type=Path, default=ROOT / "data" / "fashion-mnist-32")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak.json")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    rows, failed = [], False
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        for mode in args.launchers.split(","):
            launcher = MODES[mode][0]
            plan = kill_plan(args.steps, args.kills, rng)
            reference, faulty = Path(tmp) / f"{mode}-reference", Path(tmp) / f"{mode}-faulty"
            started = time.monotonic()
            subprocess.run(train_args(args.shards, reference, args.steps, mode, args.kills), cwd=ROOT, check=True,
                           capture_output=True)
            clean_s = time.monotonic() - started
            started = time.monotonic()
            hits = run_with_kills(train_args(args.shards, faulty, args.steps, mode, args.kills), faulty, launcher,
                                  plan)
            faulty_s = time.monotonic() - started
            diffs = compare(reference, faulty)
            close = diffs and mode == "zero2" and not compare(reference, faulty, args.atol)
            failed |= bool(diffs) and not close
            same = "yes" if not diffs else f"within {args.atol:g}" if close else "NO"
            rows.append({"launcher": mode, "kills": "; ".join(f"step {h['step_seen']} ({h['phase']})" for h in hits),
                         "clean_s": clean_s, "faulty_s": faulty_s, "identical": same,
                         "hits": hits, "differences": diffs[:20]})
            print(f"{mode}: {rows[-1]['kills']}; identical: {rows[-1]['identical']}", flush=True)
    print_table(f"soak: {args.steps} fp32 steps, one worker (zero2: two ranks), {args.kills} SIGKILLs from outside, "
                f"seed {args.seed}",
                [("launcher", "launcher", "<9"), ("kills at", "kills", "<80"), ("clean (s)", "clean_s", ">9.1f"),
                 ("with kills (s)", "faulty_s", ">14.1f"), ("bit-identical", "identical", ">13")], rows)
    settings = settings_of(args)
    write_result(args.out, "soak", settings=settings, rows=rows)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
