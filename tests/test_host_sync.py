"""Between two log windows a training step never makes the host wait for the device."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, TINY

LOG_EVERY = 5
STEPS = 20
WINDOW_READS = 2  # the window's statistics, stacked into one read, and the non-finite-loss flags


# (precision, ZeRO stage, on_nonfinite, host reads per step between windows, at a window)
CASES = [
    ("fp32", 0, "stop", 0, WINDOW_READS),
    ("bf16", 0, "stop", 0, WINDOW_READS),
    # DeepSpeed's ZeRO 1/2 optimiser checks each engine's gradient norm for inf/nan on the host
    # (`is_invalid_grad_norm`): one read per engine per step, README states the cost
    ("fp32", 1, "stop", 2, WINDOW_READS + 2),
    # "skip" decides before each optimiser step: one read per loss; no flags to read at a window
    ("fp32", 0, "skip", 2, 3),
]


@pytest.mark.parametrize("dtype, zero, on_nonfinite, between_reads, window_reads", CASES,
                         ids=[f"{c[0]}-zero{c[1]}-{c[2]}" for c in CASES])
def test_host_reads_per_step_are_the_stated_ones(fashion_shards, tmp_path, dtype, zero, on_nonfinite,
                                                 between_reads, window_reads):
    """0 reads between windows where a sync-free way exists (one rank, ZeRO 0, "stop"); elsewhere
    exactly the stated number, so a new per-step sync fails this test."""
    overrides = [*TINY, f"data.shards={fashion_shards}", f"logging.run_dir={tmp_path / 'run'}",
                 f"logging.log_every={LOG_EVERY}", "logging.sample_every=1000", "checkpoint.every_steps=1000",
                 f"optim.max_steps={STEPS}", "metrics.enabled=false", f"precision.dtype={dtype}",
                 f"precision.zero_stage={zero}", f"checkpoint.on_nonfinite={on_nonfinite}"]
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "sync_worker.py"),
                          str(ROOT / "configs" / "fashion-mnist-32.toml"), *overrides],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    cumulative = report["cumulative"]
    per_step = {step: cumulative[step - 1] - cumulative[step - 2] for step in range(2, STEPS)}
    # step 1 carries the step-0 sample grid and the last step the final grid and checkpoint: both read
    # the device by design
    between = {step: n for step, n in per_step.items() if step % LOG_EVERY}
    at_window = {step: n for step, n in per_step.items() if not step % LOG_EVERY}
    assert set(between.values()) == {between_reads}, (between, report["where"])
    assert set(at_window.values()) == {window_reads}, (at_window, report["where"])
    assert report["clipped"] == 0  # no gradient clipping, as in the paper (DeepSpeed's default clips at 1.0)
    if zero == 0:
        assert report["allreduced"] == 0  # one rank, ZeRO 0: no gradient all-reduce
