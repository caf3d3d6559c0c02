"""FID/KID measured while training (eval.fid_every), logged with the other metrics."""

from __future__ import annotations

import json
import math

from conftest import run_dcgan, tiny_train_args


def test_fid_during_training_joins_the_metrics_records(fashion_shards, tmp_path):
    run = tmp_path / "fid"
    res = run_dcgan(*tiny_train_args(fashion_shards, run, "optim.max_steps=10", "eval.fid_every=5",
                                     "eval.fid_samples=8", "precision.dtype=fp32"))
    assert res.returncode == 0, res.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10]
    for r in records:
        assert math.isfinite(r["fid"]) and r["fid"] > 0 and math.isfinite(r["kid"]), r
    # the reference side is computed once and cached beside the shards
    assert list((fashion_shards / ".fid-cache").glob("ref-*.npz"))
    assert "step 10: FID" in res.stdout + res.stderr


def test_fid_settings_are_checked(tmp_path):
    res = run_dcgan("train", "--set", "eval.fid_samples=1")
    assert res.returncode == 2 and "eval.fid_samples" in res.stderr and len(res.stderr.strip().splitlines()) == 1
