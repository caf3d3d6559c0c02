"""Between two log windows a training step never makes the host wait for the device."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, TINY

LOG_EVERY = 5
STEPS = 20
WINDOW_READS = 2  # the window's statistics, stacked into one read, and the non-finite-loss flags


@pytest.mark.parametrize("on_nonfinite", ["stop"])
def test_steps_between_windows_make_no_host_sync(fashion_shards, tmp_path, on_nonfinite):
    overrides = [*TINY, f"data.shards={fashion_shards}", f"logging.run_dir={tmp_path / 'run'}",
                 f"logging.log_every={LOG_EVERY}", "logging.sample_every=1000", "checkpoint.every_steps=1000",
                 f"optim.max_steps={STEPS}", "metrics.enabled=false", "precision.dtype=fp32",
                 f"checkpoint.on_nonfinite={on_nonfinite}"]
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
    assert set(between.values()) == {0}, (between, report["where"])
    assert set(at_window.values()) == {WINDOW_READS}, (at_window, report["where"])
    assert report["clipped"] == 0  # no gradient clipping, as in the paper (DeepSpeed's default clips at 1.0)
    assert report["allreduced"] == 0  # one rank, ZeRO 0: no gradient all-reduce
