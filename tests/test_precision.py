"""precision.dtype = "auto": the choice for each kind of machine, and what a run on this one records."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run_dcgan, tiny_train_args

from trainer.checkpoint import list_checkpoints
from trainer.precision import Hardware, choose_precision, measure_slowdown, probe_hardware

H200 = Hardware("cuda", "NVIDIA H200", cuda_bf16=True)
V100 = Hardware("cuda", "Tesla V100-SXM2-32GB", cuda_bf16=False)
SAPPHIRE_RAPIDS = Hardware("cpu", "Intel(R) Xeon(R) Platinum 8480+", cpu_native_bf16=True, cpu_isa="AMX")
EPYC_AVX2 = Hardware("cpu", "AMD EPYC 7B12", cpu_native_bf16=False, cpu_isa="AVX2")


def never_measured(dtype):
    raise AssertionError("only an explicit slow choice is measured")


@pytest.mark.parametrize("hw, expected, why", [
    (H200, "bf16", "supports bf16"),
    (V100, "fp16", "loss scaler per engine"),
    (SAPPHIRE_RAPIDS, "bf16", "native bf16, AMX"),
    (EPYC_AVX2, "fp32", "no native bf16 (AVX2)"),
])
def test_auto_picks_what_each_kind_of_machine_runs_fast(hw, expected, why):
    choice = choose_precision("auto", hw, slowdown=never_measured)
    assert choice.name == expected and not choice.warning
    assert choice.reason.startswith(f"precision: {expected} (auto: {hw.name}") and why in choice.reason
    assert "\n" not in choice.reason


def test_explicit_bf16_on_a_cpu_without_it_trains_but_warns_with_the_measured_cost():
    choice = choose_precision("bf16", EPYC_AVX2, slowdown=lambda dtype: 17.25)
    assert choice.name == "bf16" and choice.reason == "precision: bf16 (set in the config)"
    assert "17.2x slower than in fp32" in choice.warning and "auto would train in fp32" in choice.warning
    # where bf16 is native an explicit choice costs nothing to state
    assert not choose_precision("bf16", SAPPHIRE_RAPIDS, slowdown=never_measured).warning
    assert choose_precision("fp32", EPYC_AVX2, slowdown=never_measured).name == "fp32"
    assert "auto would train in fp16" in choose_precision("bf16", V100, slowdown=never_measured).warning


def test_this_machine_resolves_to_what_it_runs_fast():
    """The probe's answer agrees with a measurement: where auto picks bf16, bf16 really is fast."""
    hw = probe_hardware(torch.device("cpu"))
    choice = choose_precision("auto", hw, slowdown=never_measured)
    assert choice.name == ("bf16" if hw.cpu_native_bf16 else "fp32")
    if choice.name == "bf16":
        assert measure_slowdown(torch.bfloat16) < 2.0, "auto chose bf16 on a CPU that emulates it"


def test_a_cpu_whose_onednn_lacks_bf16_resolves_to_fp32_and_warns_with_a_real_measurement():
    """oneDNN capped at AVX2 (as on a CPU without AVX512) is what an AVX2-only machine looks like."""
    code = ("import torch; from trainer.precision import *; hw = probe_hardware(torch.device('cpu')); "
            "print(choose_precision('auto', hw).name); print(choose_precision('bf16', hw).warning)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}, check=True)
    auto, warning = out.stdout.strip().splitlines()
    assert auto == "fp32"
    slowdown = float(re.search(r"measured ([0-9.]+)x slower than in fp32", warning).group(1))
    assert slowdown > 2.0, warning  # emulated bf16: 6-20x on the CPUs measured


def test_a_run_states_and_records_the_resolved_dtype(fashion_shards, tmp_path):
    run = tmp_path / "run"
    args = tiny_train_args(fashion_shards, run, "optim.max_steps=5", "checkpoint.every_steps=5",
                           "precision.dtype=auto", "metrics.enabled=false")
    res = run_dcgan(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    expected = choose_precision("auto", probe_hardware(torch.device("cpu"))).name
    assert f"precision: {expected} (auto: " in res.stdout
    assert f'dtype = "{expected}"' in (run / "config.toml").read_text()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records and all(r["precision"] == expected for r in records)
    meta = json.loads((list_checkpoints(run / "checkpoints")[-1] / "trainer.json").read_text())
    assert meta["config"]["precision"]["dtype"] == expected
