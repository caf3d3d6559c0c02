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

from cluster.cli import main
from trainer.checkpoint import (
    COMPLETE_NAME,
    MODEL_STATES,
    PAUSE_IN_SAVE,
    list_checkpoints,
    load_module_weights,
    resolve_checkpoint,
)
from trainer.checkpoint_io import CheckpointError, safe_load

STEP = "step-00000030"  # the trained run's newest checkpoint, the one each case damages
CASE, RESULT = "@@case ", "@@result "


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
    """A ZeRO-1 checkpoint (Adam's state in files of its own) at step 0, then a copy with G's optimiser file
    poisoned and one with D's deleted."""
    from trainer.config import load_config
    from trainer.loop import Trainer

    Trainer(load_config(case["config"], case["overrides"])).save_checkpoint()
    source = Path(case["run"])
    for name, damage in (("poisoned", lambda p: poison(p, Path(case["marker"]))), ("missing", Path.unlink)):
        copy = source.with_name(f"{source.name}-{name}")
        shutil.copytree(source, copy)
        tag = "generator" if name == "poisoned" else "discriminator"
        damage(next((copy / "checkpoints" / "step-00000000" / tag).glob("*optim_states.pt")))


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


@pytest.fixture(scope="module")
def faults(fashion_shards, trained_run, tmp_path_factory):
    """Damaged copies of the trained run, and what every train / Ray case did with them."""
    root = tmp_path_factory.mktemp("faults")
    markers = root / "markers"
    markers.mkdir()
    runs: dict[str, Path] = {}

    def damaged(name: str, *relative: str, damage) -> Path:
        run = runs[name] = root / name
        shutil.copytree(trained_run, run)
        for rel in relative:
            damage(run / "checkpoints" / STEP / rel)
        return run

    for tag in ("generator", "discriminator"):
        damaged(f"poisoned-{tag}", f"{tag}/{MODEL_STATES}", damage=lambda p, t=tag: poison(p, markers / t))
    damaged("poisoned-rank", "rank-00000.pt", damage=lambda p: poison(p, markers / "rank"))
    damaged("json-invalid", "trainer.json", damage=lambda p: p.write_text(p.read_text()[:300]))
    damaged("json-types", "trainer.json",
            damage=lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "step": "30"})))
    damaged("json-list", "trainer.json", damage=lambda p: p.write_text("[30, 1]"))
    damaged("json-other-shape", "trainer.json", damage=lambda p: p.write_text(
        json.dumps((meta := json.loads(p.read_text())) | {"config": meta["config"] | {
            "model": meta["config"]["model"] | {"ngf": 16}}})))
    damaged("rank-not-a-state", "rank-00000.pt", damage=lambda p: torch.save([1, 2, 3], p))
    damaged("truncated-generator", f"generator/{MODEL_STATES}", damage=truncate)
    damaged("truncated-rank", "rank-00000.pt", damage=truncate)
    damaged("missing-generator", f"generator/{MODEL_STATES}", damage=Path.unlink)
    damaged("missing-rank", "rank-00000.pt", damage=Path.unlink)
    damaged("missing-json", "trainer.json", damage=Path.unlink)
    full = root / "disk-full"
    shutil.copytree(trained_run, full, ignore=shutil.ignore_patterns("checkpoints"))

    def train(run: Path, resume: str, *extra: str) -> list[str]:
        return [*tiny_train_args(fashion_shards, run, "optim.max_steps=31", "precision.dtype=fp32", *extra),
                "--resume", resume]

    def checkpoint(name: str) -> str:
        return str(runs[name] / "checkpoints" / STEP)

    config = str(ROOT / "configs" / "fashion-mnist-32.toml")
    tiny = ["model.ngf=8", "model.ndf=8", "optim.batch_size=32", "logging.progress=false",
            f"data.shards={fashion_shards}"]
    zero = root / "zero"
    cases = [
        # --resume auto takes the newest checkpoint; --resume PATH the one given
        {"name": "train-poisoned-generator", "argv": train(runs["poisoned-generator"], "auto")},
        {"name": "train-poisoned-discriminator", "argv": train(runs["poisoned-discriminator"],
                                                               checkpoint("poisoned-discriminator"))},
        {"name": "train-poisoned-rank", "argv": train(runs["poisoned-rank"], "auto")},
        {"name": "train-json-invalid", "argv": train(runs["json-invalid"], "auto")},
        {"name": "train-json-types", "argv": train(runs["json-types"], str(runs["json-types"]))},
        {"name": "train-json-list", "argv": train(runs["json-list"], checkpoint("json-list"))},
        {"name": "train-rank-not-a-state", "argv": train(runs["rank-not-a-state"], "auto")},
        # nets of another size than the checkpoint's: DeepSpeed's own refusal, as one line
        {"name": "train-other-shape", "argv": train(root / "other-shape", str(trained_run / "checkpoints" / STEP),
                                                    "model.ngf=16")},
        {"name": "train-truncated-generator", "argv": train(runs["truncated-generator"], "auto")},
        {"name": "train-truncated-rank", "argv": train(runs["truncated-rank"], checkpoint("truncated-rank"))},
        {"name": "train-missing-generator", "argv": train(runs["missing-generator"], "auto")},
        {"name": "train-missing-rank", "argv": train(runs["missing-rank"], checkpoint("missing-rank"))},
        {"name": "zero-setup", "kind": "zero", "config": config, "run": str(zero), "marker": str(markers / "zero"),
         "overrides": [*tiny, f"logging.run_dir={zero}", "precision.zero_stage=1", "precision.dtype=fp32"]},
        *({"name": f"train-zero-{name}", "argv": [
            *tiny_train_args(fashion_shards, zero.with_name(f"zero-{name}"), "precision.zero_stage=1",
                             "precision.dtype=fp32", "optim.max_steps=1"), "--resume", "auto"]}
          for name in ("poisoned", "missing")),
        *({"name": f"ray-{name}", "kind": "ray", "checkpoint": checkpoint(name), "config": config,
           "overrides": [*tiny, f"logging.run_dir={root / 'ray' / name}", "precision.dtype=fp32"]}
          for name in ("poisoned-generator", "poisoned-rank", "json-types")),
    ]
    # a run killed inside a save (started now, alongside the driver), then the same run again from the driver
    killed, go = root / "killed", root / "go"
    shutil.copytree(trained_run, killed)
    killed_argv = train(killed, "auto", "checkpoint.every_steps=1")
    cases += [{"name": "wait-for-the-kill", "kind": "wait", "go": str(go)},
              {"name": "train-after-the-kill", "argv": killed_argv}]
    victim = driver = None
    not_mounted = "not tried"
    try:
        not_mounted = _mount_small_tmpfs(full / "checkpoints", list_checkpoints(trained_run / "checkpoints"))
        if not_mounted is None:
            cases.insert(-2, {"name": "train-disk-full", "argv": train(full, "auto")})
        for case in cases:
            case.setdefault("kind", "cli")
        with open(root / "killed.log", "w") as log:
            victim = subprocess.Popen([sys.executable, "-m", "cluster.cli", *killed_argv], cwd=ROOT, stdout=log,
                                      stderr=subprocess.STDOUT, env=child_env({PAUSE_IN_SAVE: "31"}),
                                      start_new_session=True)
        driver = start_driver(cases, root)
        crash = kill_inside_the_save(victim, killed, root)
        go.touch()
        results = driver_results(driver, cases, root)
        yield {"root": root, "runs": runs, "markers": markers, "results": results, "zero": zero, "full": full,
               "not_mounted": not_mounted, "shards": fashion_shards, "killed": killed, "crash": crash}
    finally:
        go.touch()
        for process in (victim, driver):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        if not_mounted is None:
            subprocess.run(["umount", str(full / "checkpoints")], check=False)


def kill_inside_the_save(victim: subprocess.Popen, run: Path, root: Path) -> dict[str, Any]:
    """SIGKILL to `victim`'s process group once its save of step 31 has written every part but not renamed the
    folder; then what the run folder holds, and what each way of finding a checkpoint takes from it."""
    tmp = run / "checkpoints" / ".tmp-step-00000031"
    deadline = time.monotonic() + 300
    while not (tmp / "paused").exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    paused = (tmp / "paused").exists()
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert paused, (root / "killed.log").read_text()[-3000:]
    shutil.copytree(tmp, root / "killed-state")
    try:
        resolve_checkpoint(tmp)
        tmp_refusal = "taken"
    except CheckpointError as e:
        tmp_refusal = str(e)
    return {
        "tmp": sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*")),
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


@pytest.mark.parametrize("case, expected", [
    ("json-invalid", "unreadable"),
    ("json-types", "step must be a non-negative integer, not '30'"),
    ("json-list", "holds a JSON list, not an object"),
])
def test_train_resume_refuses_a_bad_trainer_json(faults, case, expected):
    line = refused(faults, f"train-{case}", faults["runs"][case] / "checkpoints" / STEP / "trainer.json")
    assert expected in line


@pytest.mark.parametrize("case, rel, expected", [
    ("truncated-generator", f"generator/{MODEL_STATES}", "damaged or cut short"),
    ("truncated-rank", "rank-00000.pt", "damaged or cut short"),
    ("missing-generator", f"generator/{MODEL_STATES}", "checkpoint file not found"),
    ("missing-rank", "rank-00000.pt", "checkpoint file not found"),
])
def test_train_resume_refuses_a_truncated_or_missing_file(faults, case, rel, expected):
    assert expected in refused(faults, f"train-{case}", faults["runs"][case] / "checkpoints" / STEP / rel)


def test_train_resume_refuses_a_rank_file_that_holds_no_rank_state(faults):
    path = faults["runs"]["rank-not-a-state"] / "checkpoints" / STEP / "rank-00000.pt"
    assert "holds a list, not a rank's state" in refused(faults, "train-rank-not-a-state", path)


def test_train_resume_into_nets_of_another_size_is_one_line(faults, trained_run):
    line = refused(faults, "train-other-shape", trained_run / "checkpoints" / STEP / "generator")
    assert "DeepSpeed cannot load it (RuntimeError: Error(s) in loading state_dict" in line and "size mismatch" in line


def test_a_run_folder_whose_newest_checkpoint_lacks_a_rank_file_continues_from_the_one_before(faults):
    """A copy to storage cut short lacks files; the newest complete checkpoint is taken, as before."""
    run = faults["runs"]["missing-rank"]
    assert resolve_checkpoint(run) == run / "checkpoints" / "step-00000020"


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
    # every part was written, only the rename was missing: the most complete a half-saved checkpoint gets
    assert {"trainer.json", "rank-00000.pt", f"generator/{MODEL_STATES}", f"discriminator/{MODEL_STATES}",
            "paused"} <= set(crash["tmp"])
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
    # resumed from step 30, it reached exactly the state the killed run had written
    for tag in ("generator", "discriminator"):
        assert_same(engine_state(resumed, tag), engine_state(faults["root"] / "killed-state", tag))


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
