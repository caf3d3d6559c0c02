"""Checkpoint faults through every entry point that loads one: untrusted pickles, damaged or missing files, a
process killed inside a save, a full disk. Each is refused with one line naming the file (no traceback), no
pickled code runs, and the checkpoints before it stay usable.

Starting a rank costs ~8 s of imports, so the `dcgan train` cases and Ray's restore run in ONE extra interpreter
(this file run as a script: `drive`), each through the same function the console script or Ray's worker calls;
`dcgan sample` / `dcgan eval` start no rank and run in this process, as in test_bad_input.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, assert_same, child_env, engine_state, run_dcgan, tiny_train_args

from dcgan.cli import main
from trainer.checkpoint import (
    COMPLETE_NAME,
    MODEL_STATES,
    list_checkpoints,
    load_module_weights,
    resolve_checkpoint,
)
from trainer.checkpoint_io import CheckpointError, safe_load

STEP = "step-00000030"  # the trained run's newest checkpoint, the one each case damages
CASE, RESULT = "@@case ", "@@result "
# how each ZeRO-1 copy is damaged: the net whose optimiser file is poisoned, deleted or cut short
ZERO_DAMAGES = {"poisoned": "generator", "missing": "discriminator", "truncated": "discriminator"}


class Payload:
    """Unpickled, it runs a shell command that creates `marker`: what a tampered checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def poison(path: Path, marker: Path) -> None:
    """`path` keeps all it held, plus the payload: a real checkpoint file, tampered."""
    state = safe_load(path)
    state["extra"] = Payload(marker)
    torch.save(state, path)


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("dcgan: error: ")]
    assert len(lines) == 1 and "Traceback" not in output, output[-3000:]
    return lines[0]


# --- the extra interpreter -----------------------------------------------------------------------------------


def _zero_checkpoints(case: dict[str, Any]) -> None:
    """A ZeRO-1 checkpoint (Adam's state in files of its own) at step 0, then a copy per ZERO_DAMAGES with that
    net's optimiser file damaged so."""
    from trainer.config import load_config
    from trainer.loop import Trainer

    Trainer(load_config(case["config"], case["overrides"])).save_checkpoint()
    source = Path(case["run"])
    damages = {"poisoned": lambda p: poison(p, Path(case["marker"])), "missing": Path.unlink, "truncated": truncate}
    for name, tag in ZERO_DAMAGES.items():
        copy = source.with_name(f"{source.name}-{name}")
        shutil.copytree(source, copy)
        damages[name](next((copy / "checkpoints" / "step-00000000" / tag).glob("*optim_states.pt")))


def _ray_restore(case: dict[str, Any]) -> None:
    """What a restarted Ray worker does: the worker function, handed `checkpoint` as Ray's latest."""
    import ray.train

    from cluster.ray_worker import train_worker
    from trainer.config import load_config

    ray.train.get_checkpoint = lambda: ray.train.Checkpoint.from_directory(case["checkpoint"])
    # this interpreter's thread count stays: a later case compares bits with a run that used the default
    train_worker({"config": load_config(case["config"], case["overrides"]).to_dict(),
                  "threads": torch.get_num_threads(), "resume": None, "fault": None})


def _wait(case: dict[str, Any]) -> None:
    """Until the test has killed the other run and looked at what it left (it then creates `go`)."""
    deadline = time.monotonic() + 600
    while not Path(case["go"]).exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def drive(cases_file: str) -> None:
    """Run each case, its output framed by markers. Kinds: "cli": `main(argv)`; "ray": the Ray worker's restore;
    "zero": make the ZeRO-1 checkpoints; "wait": until the killed run has been looked at."""
    for case in json.loads(Path(cases_file).read_text()):
        print(f"\n{CASE}{case['name']}", flush=True)
        try:
            if case["kind"] == "cli":
                result = f"rc {main(case['argv'])}"
            else:
                {"ray": _ray_restore, "zero": _zero_checkpoints, "wait": _wait}[case["kind"]](case)
                result = "returned"
        except Exception as e:  # reported for the test to judge, which then shows the traceback
            traceback.print_exc()
            result = f"raised {type(e).__name__}: {e}"
        sys.stdout.flush()
        sys.stderr.flush()
        print(f"\n{RESULT}{case['name']} {json.dumps(result)}", flush=True)


def start_driver(cases: list[dict[str, Any]], folder: Path) -> subprocess.Popen:
    (folder / "cases.json").write_text(json.dumps(cases))
    with open(folder / "driver.log", "w") as log:
        return subprocess.Popen([sys.executable, __file__, str(folder / "cases.json")], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, env=child_env())


def driver_results(driver: subprocess.Popen, cases: list[dict[str, Any]], folder: Path
                   ) -> dict[str, tuple[str, str]]:
    """{case name: (its result, its output)}."""
    driver.wait(timeout=600)
    output = (folder / "driver.log").read_text()
    assert driver.returncode == 0, output[-4000:]
    results = {}
    for block in output.split(f"\n{CASE}")[1:]:
        name, _, rest = block.partition("\n")
        text, _, tail = rest.rpartition(f"\n{RESULT}{name} ")
        results[name] = (json.loads(tail.splitlines()[0]), text)
    assert [c["name"] for c in cases] == list(results), output[-4000:]
    return results


# --- the damaged checkpoints, and every case run once ---------------------------------------------------------


def _mount_small_tmpfs(folder: Path, keep: list[Path]) -> str | None:
    """A tmpfs at `folder` holding copies of `keep`, with room for half a checkpoint more; None, or why not."""
    folder.mkdir(parents=True)
    try:
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)], capture_output=True,
                             text=True)
    except OSError as e:
        return f"cannot run mount ({e})"
    if res.returncode != 0:
        return f"cannot mount a tmpfs here ({(res.stderr or res.stdout).strip()}); it needs root or CAP_SYS_ADMIN"
    for checkpoint in keep:
        shutil.copytree(checkpoint, folder / checkpoint.name)
    stat = os.statvfs(folder)
    used = (stat.f_blocks - stat.f_bfree) * stat.f_frsize
    room = used + sum(p.stat().st_size for p in keep[-1].rglob("*") if p.is_file()) // 2
    subprocess.run(["mount", "-o", f"remount,size={room}", str(folder)], check=True)
    return None


def _edit_json(change) -> Any:
    """A damage that rewrites trainer.json as `change(meta)` makes it."""
    return lambda p: p.write_text(json.dumps(change(json.loads(p.read_text()))))


def _wider_generator(meta: dict[str, Any]) -> dict[str, Any]:
    config = meta["config"]
    return meta | {"config": config | {"model": config["model"] | {"ngf": 16}}}


def _damaged_runs(trained_run: Path, root: Path, markers: Path) -> dict[str, Path]:
    """A copy of the trained run per fault, its newest checkpoint damaged so; by the fault's name."""
    damages = {
        "poisoned-generator": (f"generator/{MODEL_STATES}", lambda p: poison(p, markers / "generator")),
        "poisoned-discriminator": (f"discriminator/{MODEL_STATES}", lambda p: poison(p, markers / "discriminator")),
        "poisoned-rank": ("rank-00000.pt", lambda p: poison(p, markers / "rank")),
        "json-invalid": ("trainer.json", lambda p: p.write_text(p.read_text()[:300])),
        "json-types": ("trainer.json", _edit_json(lambda meta: {**meta, "step": "30"})),
        "json-list": ("trainer.json", lambda p: p.write_text("[30, 1]")),
        "json-other-shape": ("trainer.json", _edit_json(_wider_generator)),
        "rank-not-a-state": ("rank-00000.pt", lambda p: torch.save([1, 2, 3], p)),
        "truncated-generator": (f"generator/{MODEL_STATES}", truncate),
        "truncated-discriminator": (f"discriminator/{MODEL_STATES}", truncate),
        "truncated-rank": ("rank-00000.pt", truncate),
        "missing-generator": (f"generator/{MODEL_STATES}", Path.unlink),
        "missing-rank": ("rank-00000.pt", Path.unlink),
        "missing-json": ("trainer.json", Path.unlink),
    }
    runs = {}
    for name, (rel, damage) in damages.items():
        runs[name] = root / name
        shutil.copytree(trained_run, runs[name])
        damage(runs[name] / "checkpoints" / STEP / rel)
    return runs


def _train_argv(shards: Path, run: Path, resume: str, *extra: str) -> list[str]:
    """`dcgan train` one step past the trained run's newest checkpoint."""
    return [*tiny_train_args(shards, run, "optim.max_steps=31", "precision.dtype=fp32", *extra), "--resume", resume]


def _train_cases(shards: Path, trained_run: Path, root: Path, runs: dict[str, Path]) -> list[dict[str, Any]]:
    """`dcgan train` on each damaged run: --resume auto takes the newest checkpoint; --resume PATH the one given."""
    def train(name: str, resume: str = "auto") -> dict[str, Any]:
        return {"name": f"train-{name}", "argv": _train_argv(shards, runs[name], resume)}

    def checkpoint(name: str) -> str:
        return str(runs[name] / "checkpoints" / STEP)

    auto = ("poisoned-generator", "poisoned-rank", "json-invalid", "rank-not-a-state", "truncated-generator",
            "truncated-discriminator", "missing-generator")
    return [
        *(train(name) for name in auto),
        train("poisoned-discriminator", checkpoint("poisoned-discriminator")),
        train("json-types", str(runs["json-types"])),
        train("json-list", checkpoint("json-list")),
        train("truncated-rank", checkpoint("truncated-rank")),
        train("missing-rank", checkpoint("missing-rank")),
        {"name": "train-auto-missing-rank", "argv": _train_argv(shards, runs["missing-rank"], "auto")},
        # nets of another size than the checkpoint's: DeepSpeed's own refusal, as one line
        {"name": "train-other-shape", "argv": _train_argv(shards, root / "other-shape",
                                                          str(trained_run / "checkpoints" / STEP), "model.ngf=16")},
    ]


def _zero_and_ray_cases(shards: Path, root: Path, markers: Path, runs: dict[str, Path]) -> list[dict[str, Any]]:
    """ZeRO-1 checkpoints made, damaged and resumed; Ray's restore of damaged checkpoints."""
    config = str(ROOT / "configs" / "fashion-mnist-32.toml")
    tiny = ["model.ngf=8", "model.ndf=8", "optim.batch_size=32", "logging.progress=false", f"data.shards={shards}"]
    zero = root / "zero"
    return [
        {"name": "zero-setup", "kind": "zero", "config": config, "run": str(zero), "marker": str(markers / "zero"),
         "overrides": [*tiny, f"logging.run_dir={zero}", "precision.zero_stage=1", "precision.dtype=fp32"]},
        *({"name": f"train-zero-{name}", "argv": [
            *tiny_train_args(shards, zero.with_name(f"zero-{name}"), "precision.zero_stage=1",
                             "precision.dtype=fp32", "optim.max_steps=1"), "--resume", "auto"]}
          for name in ZERO_DAMAGES),
        *({"name": f"ray-{name}", "kind": "ray", "checkpoint": str(runs[name] / "checkpoints" / STEP),
           "config": config, "overrides": [*tiny, f"logging.run_dir={root / 'ray' / name}", "precision.dtype=fp32"]}
          for name in ("poisoned-generator", "poisoned-rank", "json-types")),
    ]


def _start_paused_run(argv: list[str], root: Path) -> subprocess.Popen:
    """`dcgan train` that stops inside its save of step 31, after that checkpoint's first file (the wrapper
    creates `paused`, naming the file), in a process group of its own for the kill."""
    with open(root / "killed.log", "w") as log:
        return subprocess.Popen([sys.executable, str(ROOT / "tests" / "pause_in_save.py"), "31",
                                 str(root / "paused"), *argv], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env=child_env(), start_new_session=True)


@pytest.fixture(scope="module")
def faults(fashion_shards, trained_run, tmp_path_factory):
    """Damaged copies of the trained run, and what every train / Ray case did with them."""
    root = tmp_path_factory.mktemp("faults")
    markers = root / "markers"
    markers.mkdir()
    runs = _damaged_runs(trained_run, root, markers)
    cases = [*_train_cases(fashion_shards, trained_run, root, runs),
             *_zero_and_ray_cases(fashion_shards, root, markers, runs)]
    # a run killed inside a save (started now, alongside the driver), then the same run again from the driver
    killed, go, full = root / "killed", root / "go", root / "disk-full"
    shutil.copytree(trained_run, killed)
    killed_argv = _train_argv(fashion_shards, killed, "auto", "checkpoint.every_steps=1")
    cases += [{"name": "wait-for-the-kill", "kind": "wait", "go": str(go)},
              {"name": "train-after-the-kill", "argv": killed_argv}]
    shutil.copytree(trained_run, full, ignore=shutil.ignore_patterns("checkpoints"))
    victim = driver = None
    not_mounted = "not tried"
    try:
        not_mounted = _mount_small_tmpfs(full / "checkpoints", list_checkpoints(trained_run / "checkpoints"))
        if not_mounted is None:
            cases.insert(-2, {"name": "train-disk-full", "argv": _train_argv(fashion_shards, full, "auto")})
        for case in cases:
            case.setdefault("kind", "cli")
        victim = _start_paused_run(killed_argv, root)
        driver = start_driver(cases, root)
        crash = kill_inside_the_save(victim, killed, root)
        go.touch()
        results = driver_results(driver, cases, root)
        yield {"root": root, "runs": runs, "markers": markers, "results": results, "zero": root / "zero",
               "full": full, "not_mounted": not_mounted, "shards": fashion_shards, "killed": killed, "crash": crash}
    finally:
        go.touch()
        for process in (victim, driver):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        if not_mounted is None:
            subprocess.run(["umount", str(full / "checkpoints")], check=False)


def kill_inside_the_save(victim: subprocess.Popen, run: Path, root: Path) -> dict[str, Any]:
    """SIGKILL to `victim`'s process group once its save of step 31 has written its first file and no other;
    then what the run folder holds, and what each way of finding a checkpoint takes from it."""
    tmp, paused = run / "checkpoints" / ".tmp-step-00000031", root / "paused"
    deadline = time.monotonic() + 300
    while not paused.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    was_paused = paused.exists()
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert was_paused, (root / "killed.log").read_text()[-3000:]
    shutil.copytree(tmp, root / "killed-state")
    try:
        resolve_checkpoint(tmp)
        tmp_refusal = "taken"
    except CheckpointError as e:
        tmp_refusal = str(e)
    return {
        "first_file": paused.read_text().strip(),
        "tmp": sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()),
        "folders": sorted(p.name for p in (run / "checkpoints").iterdir()),
        "listed": [p.name for p in list_checkpoints(run / "checkpoints")],
        "resolved": {str(p): resolve_checkpoint(p).name for p in (run, run / "checkpoints")},
        "tmp_refusal": tmp_refusal,
        "sample_rc": main(["sample", "--checkpoint", str(run), "--n", "4", "--out", str(root / "after-kill.png")]),
        "sample_weights": load_module_weights(run, "generator")[1],
    }


def refused(faults, case: str, *named: Path) -> str:
    """The case's one error line, which names each of `named`."""
    result, output = faults["results"][case]
    assert result == "rc 2", (result, output[-3000:])
    line = one_error_line(output)
    for path in named:
        assert str(path) in line, line
    return line


def test_the_payload_runs_its_code_when_loaded_unsafely(tmp_path, trained_run):
    """Else every 'no marker' below would prove nothing."""
    path = tmp_path / "model_states.pt"
    shutil.copy(trained_run / "checkpoints" / STEP / "generator" / MODEL_STATES, path)
    poison(path, tmp_path / "ran")
    torch.load(path, weights_only=False)
    assert (tmp_path / "ran").exists()


@pytest.mark.parametrize("case, rel", [
    ("train-poisoned-generator", f"generator/{MODEL_STATES}"),
    ("train-poisoned-discriminator", f"discriminator/{MODEL_STATES}"),
    ("train-poisoned-rank", "rank-00000.pt"),
])
def test_train_resume_refuses_a_poisoned_file(faults, case, rel):
    name = case.removeprefix("train-")
    line = refused(faults, case, faults["runs"][name] / "checkpoints" / STEP / rel)
    assert "safely" in line and "would call posix.system" in line
    # the checkpoint to fall back on is named
    assert str(faults["runs"][name] / "checkpoints" / "step-00000020") in line
    assert not list(faults["markers"].iterdir())


def test_a_poisoned_zero_optimiser_file_is_refused_and_a_missing_one_named(faults):
    result, output = faults["results"]["zero-setup"]
    assert result == "returned", output[-3000:]
    step0 = "checkpoints/step-00000000"
    line = refused(faults, "train-zero-poisoned", faults["zero"].with_name("zero-poisoned") / step0 / "generator")
    assert "optim_states.pt safely" in line and "posix.system" in line
    line = refused(faults, "train-zero-missing", faults["zero"].with_name("zero-missing") / step0 / "discriminator")
    assert "checkpoint file not found" in line and "optim_states.pt" in line
    assert not list(faults["markers"].iterdir())


def test_a_truncated_zero_optimiser_file_is_refused_naming_it(faults):
    folder = faults["zero"].with_name("zero-truncated") / "checkpoints" / "step-00000000" / "discriminator"
    (path,) = folder.glob("*optim_states.pt")
    assert "damaged or cut short" in refused(faults, "train-zero-truncated", path)


@pytest.mark.parametrize("case, expected", [
    ("json-invalid", "unreadable"),
    ("json-types", "step must be a non-negative integer, not '30'"),
    ("json-list", "holds a JSON list, not an object"),
])
def test_train_resume_refuses_a_bad_trainer_json(faults, case, expected):
    line = refused(faults, f"train-{case}", faults["runs"][case] / "checkpoints" / STEP / "trainer.json")
    assert expected in line


@pytest.mark.parametrize("case, rel, expected", [
    ("truncated-generator", f"generator/{MODEL_STATES}", "damaged or cut short"),  # --resume auto
    ("truncated-discriminator", f"discriminator/{MODEL_STATES}", "damaged or cut short"),  # --resume auto
    ("truncated-rank", "rank-00000.pt", "damaged or cut short"),
    ("missing-generator", f"generator/{MODEL_STATES}", "checkpoint file not found"),  # --resume auto
    ("missing-rank", "rank-00000.pt", "checkpoint file not found"),
])
def test_train_resume_refuses_a_truncated_or_missing_file(faults, case, rel, expected):
    checkpoints = faults["runs"][case] / "checkpoints"
    line = refused(faults, f"train-{case}", checkpoints / STEP / rel)
    assert expected in line and line.endswith(f"; to continue from the checkpoint before it: --resume "
                                              f"{checkpoints / 'step-00000020'}")


def test_train_resume_refuses_a_rank_file_that_holds_no_rank_state(faults):
    path = faults["runs"]["rank-not-a-state"] / "checkpoints" / STEP / "rank-00000.pt"
    assert "holds a list, not a rank's state" in refused(faults, "train-rank-not-a-state", path)


def test_train_resume_into_nets_of_another_size_is_one_line(faults, trained_run):
    line = refused(faults, "train-other-shape", trained_run / "checkpoints" / STEP / "generator")
    assert "DeepSpeed cannot load it (RuntimeError: Error(s) in loading state_dict" in line and "size mismatch" in line


def test_a_checkpoint_marked_complete_that_lacks_a_file_is_refused_not_passed_over(faults):
    """Marked complete, it was whole when written: a file gone since is damage to report, not an unfinished save
    to pass over (those have no mark, and are), so --resume auto does not silently go back to an older one."""
    checkpoints = faults["runs"]["missing-rank"] / "checkpoints"
    assert list_checkpoints(checkpoints)[-1].name == STEP
    line = refused(faults, "train-auto-missing-rank", checkpoints / STEP / "rank-00000.pt")
    assert "checkpoint file not found" in line and f"--resume {checkpoints / 'step-00000020'}" in line
    for path in (checkpoints.parent, checkpoints):  # --resume RUN, dcgan sample --checkpoint RUN
        with pytest.raises(CheckpointError, match=re.escape(str(checkpoints / STEP / "rank-00000.pt"))):
            resolve_checkpoint(path)


@pytest.mark.parametrize("case", ["ray-poisoned-generator", "ray-poisoned-rank", "ray-json-types"])
def test_ray_restore_refuses_a_damaged_checkpoint(faults, case):
    name = case.removeprefix("ray-")
    rel = {"poisoned-generator": f"generator/{MODEL_STATES}", "poisoned-rank": "rank-00000.pt",
           "json-types": "trainer.json"}[name]
    result, output = faults["results"][case]
    assert result.startswith("raised CheckpointError: "), (result, output[-3000:])
    assert str(faults["runs"][name] / "checkpoints" / STEP / rel) in result and "\n" not in result
    assert not list(faults["markers"].iterdir())


def test_sample_refuses_a_poisoned_checkpoint_in_a_fresh_process(faults):
    run = faults["runs"]["poisoned-generator"]
    res = run_dcgan("sample", "--checkpoint", str(run), "--out", str(faults["root"] / "never.png"))
    assert res.returncode == 2
    line = one_error_line(res.stderr)
    assert str(run / "checkpoints" / STEP / "generator" / MODEL_STATES) in line and "posix.system" in line
    assert not (faults["root"] / "never.png").exists() and not list(faults["markers"].iterdir())


@pytest.mark.parametrize("command, case, rel", [
    (["sample"], "poisoned-generator", f"generator/{MODEL_STATES}"),
    (["sample", "interpolate"], "poisoned-generator", f"generator/{MODEL_STATES}"),
    (["eval", "fid"], "poisoned-generator", f"generator/{MODEL_STATES}"),
    (["eval", "features"], "poisoned-discriminator", f"discriminator/{MODEL_STATES}"),
    (["sample"], "truncated-generator", f"generator/{MODEL_STATES}"),
    (["sample"], "missing-generator", f"generator/{MODEL_STATES}"),
    (["sample"], "json-invalid", "trainer.json"),
    (["sample"], "json-types", "trainer.json"),
    (["eval", "features"], "json-list", "trainer.json"),
    (["sample"], "json-other-shape", "generator"),
])
def test_sample_and_eval_refuse_a_damaged_checkpoint(faults, capsys, command, case, rel):
    run = faults["runs"][case]
    extra = ["--shards", str(faults["shards"])] if command == ["eval", "fid"] else []
    out = faults["root"] / "never.png"
    assert main([*command, "--checkpoint", str(run), *extra, "--out", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(run / "checkpoints" / STEP / rel) in line
    assert not out.exists() and not list(faults["markers"].iterdir())


def test_sample_names_a_missing_trainer_json_of_the_checkpoint_given(faults, capsys):
    checkpoint = faults["runs"]["missing-json"] / "checkpoints" / STEP
    assert main(["sample", "--checkpoint", str(checkpoint), "--out", str(faults["root"] / "never.png")]) == 2
    assert str(checkpoint / "trainer.json") in one_error_line(capsys.readouterr().err)


def test_disk_full_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(faults):
    if faults["not_mounted"]:
        pytest.skip(faults["not_mounted"])
    checkpoints = faults["full"] / "checkpoints"  # the tmpfs, still mounted
    line = refused(faults, "train-disk-full", checkpoints / ".tmp-step-00000031")
    assert "no space left on device for checkpoint step-00000031" in line
    newest = checkpoints / STEP
    needed = int(re.search(r"needs about ([\d,]+) bytes", line).group(1).replace(",", ""))
    assert needed == sum(p.stat().st_size for p in newest.rglob("*") if p.is_file())
    free = int(re.search(r"([\d,]+) bytes free there", line).group(1).replace(",", ""))
    assert 0 < free < needed
    # nothing half-written is left, under the final name or the temp one; the previous checkpoint loads
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000020", STEP]
    assert resolve_checkpoint(faults["full"]) == newest
    for path in newest.rglob("*.pt"):
        safe_load(path)


def test_a_run_killed_inside_a_save_leaves_no_checkpoint_and_the_next_resumes(faults):
    crash, run = faults["crash"], faults["killed"]
    # killed half way: the save had written the generator's part and nothing else
    first = f"generator/{MODEL_STATES}"
    assert crash["first_file"] == str(run / "checkpoints" / ".tmp-step-00000031" / first)
    assert crash["tmp"] == [first]
    assert crash["folders"] == [".tmp-step-00000031", "step-00000020", STEP]
    assert crash["listed"] == ["step-00000020", STEP]
    assert set(crash["resolved"].values()) == {STEP}  # --resume auto, --resume RUN, --resume RUN/checkpoints
    newest = run / "checkpoints" / STEP
    assert "never finished" in crash["tmp_refusal"] and str(newest) in crash["tmp_refusal"]
    assert crash["sample_rc"] == 0  # dcgan sample --checkpoint RUN
    assert_same(crash["sample_weights"], load_module_weights(newest, "generator")[1])

    result, output = faults["results"]["train-after-the-kill"]
    assert result == "rc 0" and "done: 31 steps" in output, output[-3000:]
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-00000020", STEP, "step-00000031"]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    resumed = run / "checkpoints" / "step-00000031"
    assert json.loads((resumed / "trainer.json").read_text())["restarts"] == 1
    # resumed from step 30, it reached exactly the state the killed run had begun to write
    assert_same(engine_state(resumed, "generator"), safe_load(faults["root"] / "killed-state" / first))


if __name__ == "__main__":
    drive(sys.argv[1])


def test_a_copy_to_storage_cut_short_is_never_taken_for_a_checkpoint(trained_run, tmp_path):
    """Ray uploads a checkpoint file by file; a head that dies mid-copy leaves every name in place but no
    `complete` mark (written once every rank's upload is done): the folder is not a checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(trained_run / "checkpoints", run / "checkpoints")
    newest = list_checkpoints(run / "checkpoints")[-1]
    cut = shutil.copytree(newest, run / "checkpoints" / "step-00000040")
    (cut / "trainer.json").write_text("")  # caught mid-write, as the head's death left it
    (cut / COMPLETE_NAME).unlink()
    assert list_checkpoints(run / "checkpoints")[-1] == newest
    assert resolve_checkpoint(run) == newest
