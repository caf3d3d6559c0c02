"""End-to-end training through the CLI: outputs, resume equality, bad input."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, assert_same, engine_state, model_state, run_dcgan, tiny_train_args
from PIL import Image

from trainer.checkpoint import list_checkpoints
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
    # 2,048 images / 32 = 64 steps per epoch: stop at 20 (mid-epoch), resume to 30
    first = tmp_path / "a"
    extra = ("checkpoint.every_steps=10", "precision.dtype=fp32")
    res = run_dcgan(*tiny_train_args(fashion_shards, first, "optim.max_steps=20", *extra))
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_dcgan(*tiny_train_args(fashion_shards, first, "optim.max_steps=30", *extra), "--resume", str(first))
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = trained_run / "checkpoints" / "step-00000030", first / "checkpoints" / "step-00000030"
    for tag in ("generator", "discriminator"):
        assert engine_state(a, tag)["optimizer"]["state"]  # Adam moments are part of the comparison
        assert_same(engine_state(a, tag), engine_state(b, tag))
    # the latent-noise stream continues exactly where the uninterrupted run is
    assert torch.equal(safe_load(a / "rank-00000.pt")["noise_rng"], safe_load(b / "rank-00000.pt")["noise_rng"])


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


def test_resume_bf16_within_tolerance(fashion_shards, tmp_path):
    whole, resumed = whole_and_resumed(fashion_shards, tmp_path, 16, "bf16")
    for tag in ("generator", "discriminator"):
        assert_same(model_state(whole, tag), model_state(resumed, tag), exact=False, atol=1e-3)


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


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage, dtype", [(0, "fp32"), (2, "bf16")])
def test_two_ranks_keep_identical_parameters(fashion_shards, tmp_path, zero_stage, dtype):
    run, dumps = tmp_path / "run", tmp_path / "dumps"
    dumps.mkdir()
    overrides = [f"data.shards={fashion_shards}", f"logging.run_dir={run}", "optim.max_steps=12",
                 "checkpoint.every_steps=6", f"precision.zero_stage={zero_stage}", f"precision.dtype={dtype}",
                 "model.ngf=8", "model.ndf=8", "optim.batch_size=32", "logging.progress=false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "dist_worker.py"), str(dumps), str(ROOT / "configs" / "fashion-mnist-32.toml"),
           *overrides]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    r0, r1 = (torch.load(dumps / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0.keys() == r1.keys()
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key  # parameters and (averaged) BN statistics
    init = torch.load(dumps / "rank0.pt", weights_only=True)
    assert any("running_mean" in k for k in init)
    assert (run / "checkpoints" / "step-00000012").is_dir() and (run / "samples" / "step-00000012.png").is_file()

    # resume the 2-rank run from step 6 and reach step 12's parameters again
    again = tmp_path / "again"
    again.mkdir()
    cmd[cmd.index(str(dumps))] = str(again)
    cmd.insert(cmd.index(str(ROOT / "configs" / "fashion-mnist-32.toml")) + 1,
               f"--resume={run / 'checkpoints' / 'step-00000006'}")
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    resumed = torch.load(again / "rank0.pt", weights_only=True)
    for key in r0:
        assert torch.allclose(r0[key].float(), resumed[key].float(), atol=1e-3, rtol=0), key


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
