"""model.compile: the step under torch.compile (inductor on this CPU) trains like the eager step,
resumes as exactly, and its checkpoints are the eager ones."""

import json

import pytest
from conftest import assert_same, engine_state, model_state, run_dcgan, tiny_train_args

from trainer.checkpoint_io import safe_load
from trainer.config import ModelConfig
from trainer.models import build_models

pytestmark = pytest.mark.slow
FP32 = ("precision.dtype=fp32", "checkpoint.every_steps=10")
TINY_MODEL = ModelConfig(resolution=32, channels=1, ngf=8, ndf=8)  # conftest's TINY on the Fashion-MNIST preset


def losses(run):
    """Each log window's mean loss_d, then loss_g."""
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [r[k] for r in records for k in ("loss_d", "loss_g")]


def assert_drift_small(start, a, b, part=0.25):
    """Each weight tensor of runs `a` and `b` (state dicts) differs by a small part of how far
    training moved it from `start`."""
    for name, value in a.items():
        if value.is_floating_point() and "running" not in name:
            assert (b[name] - value).norm() < part * (value - start[name]).norm(), name


@pytest.fixture(scope="module")
def compiled_run(fashion_shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("compiled") / "r"
    cache = run.parent / "inductor-cache"
    res = run_dcgan(*tiny_train_args(fashion_shards, run, "optim.max_steps=30", "model.compile=true", *FP32),
                    env={"TORCHINDUCTOR_CACHE_DIR": str(cache)})
    assert res.returncode == 0, res.stderr[-3000:]
    # inductor really compiled the step (a silently eager run would leave no generated code): the
    # input conversion, G and D forward and backward, each Adam step, in train and eval mode
    assert len(list(cache.rglob("*.py"))) >= 8, sorted(p.name for p in cache.rglob("*"))
    return run


def test_compiled_step_matches_the_eager_step(compiled_run, trained_run):
    """The same 20 steps from the same seed. Inductor sums in another order, and a GAN under Adam
    amplifies rounding (a near-zero gradient's sign sets a whole lr-sized step), so the runs drift
    apart slowly: each tensor's distance between the runs stays a small part of how far training
    moved it (measured: at most 0.10, in G's projection). A compiled step that trained anything
    else (a stale weight, a lost BatchNorm update, a missed optimiser step) lands near 1."""
    init = dict(zip(("generator", "discriminator"), build_models(TINY_MODEL, seed=0), strict=True))
    for tag, module in init.items():
        assert_drift_small(module.state_dict(), model_state(trained_run / "checkpoints" / "step-00000020", tag),
                           model_state(compiled_run / "checkpoints" / "step-00000020", tag))
    eager_losses, compiled_losses = losses(trained_run), losses(compiled_run)
    assert len(eager_losses) == len(compiled_losses) == 12
    assert compiled_losses[:2] == pytest.approx(eager_losses[:2], abs=1e-4)  # steps 1-5
    assert compiled_losses == pytest.approx(eager_losses, abs=2e-2)


def test_compiled_fp32_resume_is_bit_identical(fashion_shards, compiled_run, tmp_path):
    run = tmp_path / "resumed"
    res = run_dcgan(*tiny_train_args(fashion_shards, run, "optim.max_steps=30", "model.compile=true", *FP32),
                    "--resume", str(compiled_run / "checkpoints" / "step-00000020"))
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = compiled_run / "checkpoints" / "step-00000030", run / "checkpoints" / "step-00000030"
    for tag in ("generator", "discriminator"):
        assert engine_state(a, tag)["optimizer"]["state"]
        assert_same(engine_state(a, tag), engine_state(b, tag))
    assert safe_load(a / "rank-00000.pt")["noise_rng"].equal(safe_load(b / "rank-00000.pt")["noise_rng"])


@pytest.mark.parametrize("written_by, resumed_with", [("compiled_run", ()), ("trained_run", ("model.compile=true",))],
                         ids=["compiled-resumes-eager", "eager-resumes-compiled"])
def test_checkpoints_move_between_compiled_and_eager_runs(fashion_shards, tmp_path, request, written_by,
                                                          resumed_with):
    """From the step-20 checkpoint of one kind of run, 10 steps of the other kind stay as close to
    the first run's own steps 20-30 as the compiled and eager steps stay to each other."""
    first = request.getfixturevalue(written_by) / "checkpoints"
    run = tmp_path / "other"
    res = run_dcgan(*tiny_train_args(fashion_shards, run, "optim.max_steps=30", *resumed_with, *FP32),
                    "--resume", str(first / "step-00000020"))
    assert res.returncode == 0, res.stderr[-3000:]
    for tag in ("generator", "discriminator"):
        assert_drift_small(model_state(first / "step-00000020", tag), model_state(first / "step-00000030", tag),
                           model_state(run / "checkpoints" / "step-00000030", tag))
