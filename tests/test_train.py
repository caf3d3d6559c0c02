"""End-to-end training through the CLI: outputs, resume equality, bad input."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    ROOT,
    assert_same,
    assert_same_checkpoint,
    child_env,
    engine_state,
    model_state,
    run_dcgan,
    tiny_train_args,
    zero_optimizer_states,
)
from PIL import Image

from trainer.checkpoint import list_checkpoints, read_meta
from trainer.checkpoint_io import CheckpointError, safe_load


def test_run_leaves_samples_checkpoints_metrics(trained_run):
    run = trained_run
    assert (run / "config.toml").is_file()
    samples = sorted((run / "samples").glob("*.png"))
    assert [p.name for p in samples] == [f"step-{s:08d}.png" for s in (0, 10, 20, 30)]
    first, last = (np.asarray(Image.open(p), dtype=np.float32) for p in (samples[0], samples[-1]))
    assert first.shape == last.shape == (8 * 34 + 2, 8 * 34 + 2)  # 8x8 grid of 32x32 tiles, 2 px apart
    # G starts near zero output (N(0, 0.02) weights into Tanh): grey tiles that training moves
    assert np.abs(first - last).mean() > 0.5
    # keep_last = 2 pruned step 10; nothing half-written is left
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-00000020", "step-00000030"]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    for r in records:
        for key in ("loss_d", "loss_g", "d_real", "d_fake", "img_per_s", "data_wait_s"):
            assert np.isfinite(r[key]), (key, r)
        assert 0 <= r["d_real"] <= 1 and r["img_per_s"] > 0
    meta = json.loads((run / "checkpoints" / "step-00000030" / "trainer.json").read_text())
    assert meta["step"] == 30 and meta["config"]["optim"]["max_steps"] == 30


def test_sample_command(trained_run, tmp_path):
    out = tmp_path / "grid.png"
    res = run_dcgan("sample", "--checkpoint", str(trained_run), "--n", "16", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert Image.open(out).size == (4 * 34 + 2, 4 * 34 + 2)


def test_resume_is_bit_identical_fp32(fashion_shards, trained_run, tmp_path):
    # 2,048 images / 32 = 64 steps per epoch: stop at 20 (mid-epoch), resume to 30; the trained run's settings
    first = tmp_path / "a"
    extra = ("checkpoint.every_steps=10", "checkpoint.keep_last=2", "precision.dtype=fp32")
    res = run_dcgan(*tiny_train_args(fashion_shards, first, "optim.max_steps=20", *extra))
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_dcgan(*tiny_train_args(fashion_shards, first, "optim.max_steps=30", *extra), "--resume", str(first))
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = trained_run / "checkpoints" / "step-00000030", first / "checkpoints" / "step-00000030"
    assert_part_of_the_comparison(a, steps=30)
    # every file, every leaf: weights, Adam state, DeepSpeed's counters, the noise and torch RNGs, the loss
    # scalers, and trainer.json's step, epoch and step_in_epoch (restarts: 0 and 1)
    assert_same_checkpoint(a, b)


def assert_part_of_the_comparison(checkpoint: Path, steps: int) -> None:
    """What a resume must restore is there to compare (a comparison of empty states would prove nothing)."""
    for tag in ("generator", "discriminator"):
        state = engine_state(checkpoint, tag)
        assert state["global_steps"] == steps
        # Adam's moments and step: in the engine's file, or under ZeRO 1/2 in one file per rank's partition
        partitions = zero_optimizer_states(checkpoint, tag).values()
        assert (state["optimizer"] or {}).get("state") or partitions and all(
            p["optimizer_state_dict"]["base_optimizer_state"]["state"] for p in partitions)
    for rank_file in checkpoint.glob("rank-*.pt"):
        assert {"noise_rng", "torch_rng", "grad_scalers"} <= safe_load(rank_file).keys()
    meta = read_meta(checkpoint)
    assert meta["step"] == steps and {"epoch", "step_in_epoch", "skipped_steps"} <= meta.keys()


def whole_and_resumed(shards, tmp_path, steps, dtype):
    """The last checkpoints of a run of `steps` and of one stopped at steps / 2 and resumed."""
    extra = (f"checkpoint.every_steps={steps // 2}", f"precision.dtype={dtype}")
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_dcgan(*tiny_train_args(shards, whole, f"optim.max_steps={steps}", *extra)).returncode == 0
    assert run_dcgan(*tiny_train_args(shards, split, f"optim.max_steps={steps // 2}", *extra)).returncode == 0
    res = run_dcgan(*tiny_train_args(shards, split, f"optim.max_steps={steps}", *extra), "--resume", str(split))
    assert res.returncode == 0, res.stderr[-3000:]
    last = f"step-{steps:08d}"
    return whole / "checkpoints" / last, split / "checkpoints" / last


# Measured on CPU (autocast bf16, 16 steps, stopped at 8): the resumed engines equal the uninterrupted ones bit
# for bit, in every weight, BatchNorm statistic, Adam moment and step, and every counter. bf16 costs accuracy,
# not determinism; a tolerance would only hide a resume that restores the state slightly wrong.
BF16_RESUME_ATOL = 0.0


def test_resume_bf16_within_tolerance(fashion_shards, tmp_path):
    whole, resumed = whole_and_resumed(fashion_shards, tmp_path, 16, "bf16")
    assert_part_of_the_comparison(whole, steps=16)
    assert_same_checkpoint(whole, resumed, exact=BF16_RESUME_ATOL == 0, atol=BF16_RESUME_ATOL)


def test_unknown_key_and_missing_shards_are_one_line_errors(tmp_path):
    res = run_dcgan("train", "--set", "optim.learnig_rate=1")
    assert res.returncode == 2 and "unknown config key 'optim.learnig_rate'" in res.stderr
    assert "Traceback" not in res.stderr
    res = run_dcgan("train", "--set", f"data.shards={tmp_path / 'none'}", "--set", "logging.progress=false",
                    "--set", f"logging.run_dir={tmp_path / 'run'}")
    assert res.returncode == 2 and "does not exist; create it with `dcgan data convert`" in res.stderr
    assert "Traceback" not in res.stderr


def test_an_earlier_run_is_never_overwritten(fashion_shards, trained_run, tmp_path):
    run = tmp_path / "again"
    shutil.copytree(trained_run, run)
    res = run_dcgan(*tiny_train_args(fashion_shards, run, "optim.max_steps=30", "precision.dtype=fp32"))
    assert res.returncode == 2 and "already holds checkpoints of an earlier run" in res.stderr
    # --resume auto continues it; a finished run has nothing left to do
    res = run_dcgan(*tiny_train_args(fashion_shards, run, "optim.max_steps=30", "precision.dtype=fp32"),
                    "--resume", "auto")
    assert res.returncode == 0 and "done: 30 steps" in res.stdout
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-00000020", "step-00000030"]


def test_bad_resume_path(fashion_shards, tmp_path):
    res = run_dcgan(*tiny_train_args(fashion_shards, tmp_path / "r", "optim.max_steps=2"),
                    "--resume", str(tmp_path / "missing"))
    assert res.returncode == 2 and "resume path" in res.stderr and "does not exist" in res.stderr
    (tmp_path / "empty").mkdir()
    res = run_dcgan(*tiny_train_args(fashion_shards, tmp_path / "r", "optim.max_steps=2"),
                    "--resume", str(tmp_path / "empty"))
    assert res.returncode == 2 and "no complete checkpoint" in res.stderr


def poison_generator(checkpoint):
    path = next((checkpoint / "generator").glob("mp_rank_*_model_states.pt"))
    state = safe_load(path)
    for v in state["module"].values():
        if v.is_floating_point():
            v.fill_(float("nan"))
    torch.save(state, path)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(fashion_shards, trained_run, tmp_path):
    run = tmp_path / "nan"
    shutil.copytree(trained_run, run)
    poison_generator(run / "checkpoints" / "step-00000030")
    good = sorted(p.name for p in (run / "checkpoints").iterdir())
    res = run_dcgan(*tiny_train_args(fashion_shards, run, "optim.max_steps=40", "checkpoint.every_steps=10",
                                     "precision.dtype=fp32"), "--resume", str(run / "checkpoints" / "step-00000030"))
    assert res.returncode == 2
    assert "loss_d is not finite at step 31" in res.stderr and "last good checkpoint: step 30" in res.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == good


def test_nonfinite_loss_stops_the_run_within_one_log_window(fashion_shards, trained_run, tmp_path):
    """No checkpoint or sample grid comes before the step-35 window here: the window's own read of
    the device flag must stop the run, not the final checkpoint 165 steps later."""
    run = tmp_path / "nan-window"
    shutil.copytree(trained_run, run)
    poison_generator(run / "checkpoints" / "step-00000030")
    res = run_dcgan(*tiny_train_args(fashion_shards, run, "optim.max_steps=200", "checkpoint.every_steps=1000",
                                     "logging.sample_every=1000", "precision.dtype=fp32"),
                    "--resume", str(run / "checkpoints" / "step-00000030"))
    assert res.returncode == 2 and "loss_d is not finite at step 31" in res.stderr, res.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 30  # the step-35 window stopped the run before writing its record
    assert not list((run / "samples").glob("step-0000003[1-9].png"))


def test_nonfinite_loss_skip_policy(fashion_shards, trained_run, tmp_path):
    run = tmp_path / "skip"
    shutil.copytree(trained_run, run)
    poison_generator(run / "checkpoints" / "step-00000030")
    res = run_dcgan(*tiny_train_args(fashion_shards, run, "optim.max_steps=33", "checkpoint.on_nonfinite=skip",
                                     "precision.dtype=fp32"), "--resume", str(run))
    assert res.returncode == 0, res.stderr[-2000:]
    meta = json.loads((run / "checkpoints" / "step-00000033" / "trainer.json").read_text())
    assert meta["skipped_steps"] == 3


def test_checkpoint_loading_never_runs_pickled_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))

    (tmp_path / "victim").mkdir()
    torch.save({"module": Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="cannot load .* safely"):
        safe_load(tmp_path / "evil.pt")
    assert (tmp_path / "victim").is_dir()


def test_assert_same_compares_every_leaf_and_refuses_what_it_cannot():
    state = {"module": {"w": torch.ones(3), "count": torch.tensor(3)}, "global_steps": 12, "lr": 2e-4,
             "stage": "adam", "scaler": None, "shape": (2, 2), "raw": b"x", "flag": False}
    assert_same(state, {**state, "module": {"w": torch.ones(3) + 1e-4, "count": torch.tensor(3)}}, False, 1e-3)
    changed = [("['module']['w']", {"w": torch.ones(3) + 1e-2, "count": torch.tensor(3)}),
               ("['module']['count']", {"w": torch.ones(3), "count": torch.tensor(4)}),  # integers: never "close"
               ("['module']", {"w": torch.ones(3)})]
    for where, module in changed:
        with pytest.raises(AssertionError, match=re.escape(where)):
            assert_same(state, {**state, "module": module}, False, 1e-3)
    for key, value in [("global_steps", 13), ("lr", 3e-4), ("stage", "sgd"), ("scaler", 1.0), ("shape", (2, 3)),
                       ("raw", b"y"), ("flag", 0)]:
        with pytest.raises(AssertionError, match=re.escape(f"['{key}']")):
            assert_same(state, {**state, key: value}, False, 1e-3 if key != "lr" else 0)
    with pytest.raises(AssertionError, match=r"\['opaque'\]: assert_same cannot compare a builtins.object"):
        assert_same({"opaque": object()}, {"opaque": object()})


def test_assert_same_checkpoint_fails_on_any_leaf_it_should_compare(trained_run, tmp_path):
    source = trained_run / "checkpoints" / "step-00000030"

    def copy_changed(name: str, change) -> Path:
        copy = shutil.copytree(source, tmp_path / name)
        change(copy)
        return copy

    def rewrite(rel: str, edit):
        def change(copy: Path) -> None:
            state = safe_load(copy / rel)
            edit(state)
            torch.save(state, copy / rel)
        return change

    def meta_edit(edit):
        return lambda c: (c / "trainer.json").write_text(json.dumps(edit(json.loads((c / "trainer.json").read_text()))))

    # the run folder's name and the resumes may differ; nothing else
    moved = copy_changed("moved", meta_edit(lambda m: {**m, "restarts": 1, "config": {**m["config"], "logging": {
        **m["config"]["logging"], "run_dir": "elsewhere"}}}))
    assert_same_checkpoint(source, moved)
    adam = "generator/mp_rank_00_model_states.pt"
    changes = {
        "['torch_rng']": rewrite("rank-00000.pt", lambda s: s["torch_rng"].__setitem__(0, s["torch_rng"][0] ^ 1)),
        "['exp_avg']": rewrite(adam, lambda s: s["optimizer"]["state"][0]["exp_avg"].add_(1.0)),
        "['step_in_epoch']": meta_edit(lambda m: {**m, "restarts": 1, "step_in_epoch": m["step_in_epoch"] + 1}),
        "different files": lambda c: (c / "discriminator" / "extra").write_bytes(b""),
        "complete differs": lambda c: (c / "complete").write_text("x"),
    }
    for i, (where, change) in enumerate(changes.items()):
        with pytest.raises(AssertionError, match=re.escape(where)):
            assert_same_checkpoint(source, copy_changed(str(i), change))


def two_rank_training(run: Path, dumps: Path, *overrides: str, resume: Path | None = None) -> None:
    """tests/dist_worker.py on 2 ranks under torchrun: 12 steps of the real Trainer, checkpoints every 6."""
    dumps.mkdir()
    settings = [f"logging.run_dir={run}", "optim.max_steps=12", "checkpoint.every_steps=6", "model.ngf=8",
                "model.ndf=8", "optim.batch_size=32", "logging.progress=false", *overrides]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "dist_worker.py"), str(dumps), str(ROOT / "configs" / "fashion-mnist-32.toml"),
           *([f"--resume={resume}"] if resume else []), *settings]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=child_env())
    assert res.returncode == 0, res.stderr[-4000:]


def assert_checkpoint_holds_mean_of_ranks_statistics(checkpoint: Path, dumps: Path, step: int) -> None:
    """Each rank normalised its own shards, so its running statistics before the averaging are its own;
    the checkpoint must hold their mean, not rank 0's copy (nor rank 1's)."""
    local = [torch.load(dumps / f"local-bn-rank{r}.pt", weights_only=True) for r in (0, 1)]
    names = [k.removeprefix(f"{step}/") for k in local[0] if k.startswith(f"{step}/")]
    saved = {f"{tag}.{k}" for tag in ("generator", "discriminator") for k in model_state(checkpoint, tag)
             if k.endswith(("running_mean", "running_var"))}
    assert saved and set(names) == saved
    for name in names:
        tag, _, buffer = name.partition(".")
        r0, r1 = local[0][f"{step}/{name}"], local[1][f"{step}/{name}"]
        assert not torch.equal(r0, r1), f"{name}: the ranks' own statistics agree; the test would prove nothing"
        # gloo's two-rank sum, then / 2, in fp32: exactly what this computes
        assert torch.equal(model_state(checkpoint, tag)[buffer], (r0 + r1) / 2), name


# Measured on CPU (gloo, fp32 ZeRO 0 and bf16 ZeRO 2, 12 steps resumed at 6): bit for bit in both rank files, every
# weight, BatchNorm statistic, Adam moment and step, ZeRO partition and counter; gloo's 2-rank reductions are
# deterministic, so a tolerance would only hide a resume that restores the state slightly wrong.
TWO_RANK_RESUME_ATOL = 0.0


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage, dtype", [(0, "fp32"), (2, "bf16")])
def test_two_ranks_keep_identical_parameters(fashion_shards, tmp_path, zero_stage, dtype):
    run, dumps = tmp_path / "run", tmp_path / "dumps"
    settings = (f"data.shards={fashion_shards}", f"precision.zero_stage={zero_stage}", f"precision.dtype={dtype}")
    two_rank_training(run, dumps, *settings)
    r0, r1 = (torch.load(dumps / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0.keys() == r1.keys()
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key  # parameters and (averaged) BN statistics
    assert any("running_mean" in k for k in r0)
    assert (run / "checkpoints" / "step-00000012").is_dir() and (run / "samples" / "step-00000012.png").is_file()
    for step in (6, 12):
        assert_checkpoint_holds_mean_of_ranks_statistics(run / "checkpoints" / f"step-{step:08d}", dumps, step)

    # resume the 2-rank run from step 6 into another folder: step 12's checkpoint again, within TWO_RANK_RESUME_ATOL
    again = tmp_path / "again"
    two_rank_training(again, tmp_path / "again-dumps", *settings, resume=run / "checkpoints" / "step-00000006")
    a, b = run / "checkpoints" / "step-00000012", again / "checkpoints" / "step-00000012"
    assert_part_of_the_comparison(a, steps=12)
    assert sorted(p.name for p in a.glob("rank-*.pt")) == ["rank-00000.pt", "rank-00001.pt"]
    for tag in ("generator", "discriminator"):
        # ZeRO 1/2: Adam's state and the fp32 master weights live in one file per rank's partition
        partitions = zero_optimizer_states(a, tag)
        if zero_stage:
            assert len(partitions) == 2
            assert all(p["optimizer_state_dict"]["base_optimizer_state"]["state"] for p in partitions.values())
        else:
            assert not partitions and engine_state(a, tag)["optimizer"]["state"]
    # both rank files, every engine and ZeRO partition file, trainer.json's counters
    assert_same_checkpoint(a, b, exact=TWO_RANK_RESUME_ATOL == 0, atol=TWO_RANK_RESUME_ATOL)


@pytest.mark.slow
def test_sync_batchnorm_gives_every_rank_the_global_batch_s_statistics(fashion_shards, tmp_path):
    """Per-rank BatchNorm leaves each rank its own running statistics (the test above); synchronised,
    the ranks normalised with the same global statistics, so theirs agree before any averaging."""
    run, dumps = tmp_path / "run", tmp_path / "dumps"
    two_rank_training(run, dumps, f"data.shards={fashion_shards}", "precision.dtype=fp32", "model.sync_batchnorm=true")
    local = [torch.load(dumps / f"local-bn-rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert local[0].keys() == local[1].keys() and any("running_var" in k for k in local[0])
    for key in local[0]:
        torch.testing.assert_close(local[0][key], local[1][key], rtol=1e-6, atol=1e-7, msg=key)
    assert json.loads((run / "checkpoints" / "step-00000012" / "trainer.json").read_text())["config"]["model"][
        "sync_batchnorm"] is True


@pytest.mark.slow
def test_cli_nproc_launches_two_ranks(fashion_shards, tmp_path):
    run = tmp_path / "r"
    res = run_dcgan(*tiny_train_args(fashion_shards, run, "optim.max_steps=4"), "--nproc", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    meta = json.loads((run / "checkpoints" / "step-00000004" / "trainer.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 4


def test_fp16_keeps_a_loss_scaler_per_engine_and_resumes_it(fashion_shards, tmp_path):
    # fp16 is CUDA's precision; on CPU the same DeepSpeed torch_autocast + GradScaler path runs
    whole, resumed = whole_and_resumed(fashion_shards, tmp_path, 12, "fp16")
    a = safe_load(whole / "rank-00000.pt")["grad_scalers"]
    b = safe_load(resumed / "rank-00000.pt")["grad_scalers"]
    assert set(a) == {"generator", "discriminator"} and a == b
    for tag in ("generator", "discriminator"):
        assert_same(model_state(whole, tag), model_state(resumed, tag), exact=False, atol=1e-3)


def test_a_build_lock_left_by_a_killed_process_is_cleared_and_a_fresh_one_kept(tmp_path, monkeypatch):
    from trainer.distributed import clear_stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale, fresh = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "deepspeed_other" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir()
        lock.touch()
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    assert clear_stale_build_locks() == [stale]
    assert not stale.exists() and fresh.exists()
