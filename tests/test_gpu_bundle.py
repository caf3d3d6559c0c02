"""The GPU check's preparation and its summary, without a GPU.

`make gpu-bundle` must carry everything the check imports that a bare CUDA image lacks: built here
for this Python, the bundle is unpacked and imported by an interpreter that sees only it, the project
and what such an image has (torch and its own dependencies, numpy, scipy, pillow, ...), never this
venv's other packages. The summary must make one table of whatever results a run left behind.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT

MAX_BUNDLE_BYTES = 60 << 20
# what the GPU image brings: CUDA torch with its own dependencies, and the few extras it was built with
IMAGE_DISTRIBUTIONS = ("torch", "triton", "numpy", "typing-extensions", "sympy", "mpmath", "networkx", "jinja2",
                       "markupsafe", "filelock", "fsspec", "setuptools", "psutil", "packaging", "tqdm", "msgpack",
                       "py-cpuinfo", "ninja", "einops", "nvidia-ml-py", "pillow", "scipy")


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data))


def run_summary(*args: str) -> str:
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_summary.py"), *args], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_summary_of_hand_made_results(tmp_path):
    (tmp_path / "parts.jsonl").write_text(
        '{"part": "matmul", "status": "ok", "rc": 0, "seconds": 12, "limit_s": 180, "note": ""}\n'
        '{"part": "train-b512", "status": "timeout", "rc": 124, "seconds": 420, "limit_s": 420, "note": "x"}\n'
        "not json\n")
    (tmp_path / "machine.txt").write_text("gpu: NVIDIA H200, 570.00, 143771 MiB\ntorch: 2.11.0 CUDA 12.8\n")
    write_json(tmp_path / "matmul_ceiling.json", {"ceilings_tflops": {"bf16": 800.0, "fp32": 50.0, "tf32": 400.0},
                                                  "rows": [{"precision": "bf16", "size": 8192, "tflops": 800.0}]})
    # the new rows (some keys missing), and a file from before them
    write_json(tmp_path / "train_throughput-b128.json", {"settings": {"batch": 128}, "rows": [
        {"method": "fused", "precision": "bf16", "batch": 128, "img_per_s": 90000.0, "ms_per_step": 1.42,
         "tflops": 200.0, "vs_plain": 1.5},
        {"method": "eager", "precision": "fp32", "batch": 128, "img_per_s": 30000.0, "ms_per_step": 4.3,
         "flops_per_step": 43e9},
        {"method": "compiled", "precision": "bf16"}]})
    write_json(tmp_path / "train_throughput-old.json", {"settings": {"batch": 128},
                                                        "img_per_s_median": {"dcgan-scale bf16": 50000.0}})
    blocks = [("b1", 1.0, 0.5), ("b2", 3.0, 1.5)]
    write_json(tmp_path / "kernels.json", {"rows": [
        {"ngf": 64, "block": b, "batch": 128, "direction": "fwd", "method": m, "ms": ms}
        for b, eager, fused in blocks for m, ms in (("eager", eager), ("fused", fused))]})
    (tmp_path / "kernels-compile.json").write_text("{ cut short")
    write_json(tmp_path / "loader_throughput.json", {"rows": [
        {"method": "webdataset loader", "encoding": "raw", "img_per_s": 20000.0, "vs_lmdb": 10.0},
        {"method": "device loader"}]})

    out = run_summary(str(tmp_path))
    for expected in ("NVIDIA H200", "timeout", "800 TFLOP/s", "90000 img/s", "50000 img/s", "20000 img/s",
                     "25.0 % of the bf16 ceiling; 1.50x plain PyTorch",
                     "10 TFLOP/s = 20.0 % of the fp32 ceiling, 2.5 % of tf32", "2.00x",
                     "kernels-compile.json: unreadable", "parts.jsonl line 3: not JSON"):
        assert expected in out, expected
    assert re.search(r"compiled \| bf16 \| batch 128 +- ", out)  # a row without numbers still shows
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["matmul_ceiling"]["tflops"]["bf16"] == 800.0
    assert {s["method"] for s in summary["train"]} == {"fused", "eager", "compiled", "dcgan-scale bf16"}
    assert summary["kernels"][0]["vs_eager"] == pytest.approx(2.0)

    assert run_summary("--step-rate", str(tmp_path)).strip() == "90000.0"


def test_summary_of_an_empty_folder(tmp_path):
    assert "nothing to summarise" in run_summary(str(tmp_path))
    assert json.loads((tmp_path / "summary.json").read_text())["train"] == []
    assert run_summary("--step-rate", str(tmp_path)) == ""


def pip(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout)


def image_site(folder: Path) -> Path:
    """Links to what the GPU image has, taken from this venv: the packages of IMAGE_DISTRIBUTIONS only."""
    folder.mkdir()
    for name in IMAGE_DISTRIBUTIONS:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional extra of the image (nvidia-ml-py) that this venv does without
        site = Path(dist.locate_file(""))
        for top in {f.parts[0] for f in dist.files or []} - {"..", "__pycache__"}:
            if (site / top).exists() and not (folder / top).exists():
                (folder / top).symlink_to(site / top)
    return folder


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_bundle_is_small_and_enough_without_this_venv(tmp_path):
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    probe = pip("download", "--no-deps", "--only-binary=:all:", "--dest", str(tmp_path / "probe"), "hjson==3.1.0",
                timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"pip cannot reach a package index: {probe.stderr.strip().splitlines()[-1:]}")

    bundle = tmp_path / "bundle"
    res = subprocess.run(["make", "--no-print-directory", "gpu-bundle", f"GPU_PYTHON_VERSION={python}",
                          f"GPU_BUNDLE_DIR={bundle}", f"GPU_BUNDLE_PIP={sys.executable} -m pip"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    wheels = sorted(bundle.glob("*.whl"))
    names = {w.name.split("-")[0].lower() for w in wheels}
    assert {"deepspeed", "webdataset", "braceexpand", "hjson", "pydantic", "pydantic_core", "pyyaml",
            "annotated_types", "typing_inspection", "lmdb", "prometheus_client", "pytest"} <= names
    assert not {n for n in names if n.startswith(("ray", "nvidia_dali"))}
    assert sum(w.stat().st_size for w in wheels) < MAX_BUNDLE_BYTES
    assert next(bundle.glob("deepspeed-*-py3-none-any.whl"))  # no ops compiled in: they build on the GPU machine

    # as benchmarks/gpu_check.sh installs it there: no index, no dependencies
    site = tmp_path / "site"
    res = pip("install", "--quiet", "--no-index", "--no-deps", "--no-compile", "--target", str(site),
              *map(str, wheels))
    assert res.returncode == 0, res.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "TRITON_INTERPRET"))}
    env.update(PYTHONPATH=os.pathsep.join(map(str, (site, image_site(tmp_path / "image"), ROOT))),
               PYTHONDONTWRITEBYTECODE="1", DS_ACCELERATOR="cpu", MPLBACKEND="Agg",
               MPLCONFIGDIR=str(tmp_path / "matplotlib"))
    check_imports_from_the_bundle_alone(site, env, tmp_path)
    check_writes_only_under_out_dir(bundle, env, tmp_path)

    out = tmp_path / "matmul_ceiling.json"
    res = subprocess.run([sys.executable, "-S", str(ROOT / "benchmarks" / "matmul_ceiling.py"), "--size", "64",
                          "--warmup", "0", "--rounds", "2", "--out", str(out)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ceilings = json.loads(out.read_text())["ceilings_tflops"]
    assert set(ceilings) == {"bf16", "fp32"} and all(v > 0 for v in ceilings.values())


def check_imports_from_the_bundle_alone(site: Path, env: dict[str, str], tmp_path: Path) -> None:
    """What the check imports comes from the bundle (or the image), and its kernel-tests part collects."""
    # -S: no site-packages, so this venv's own copies (Ray, DALI, the bundle's packages) stay out of reach
    code = textwrap.dedent(f"""
        import importlib.util, sys
        assert importlib.util.find_spec("ray") is None and importlib.util.find_spec("nvidia") is None
        import deepspeed, webdataset, pydantic, lmdb, yaml, hjson, prometheus_client, pytest
        for module in (deepspeed, webdataset, pydantic, lmdb, yaml, hjson, prometheus_client, pytest):
            assert module.__file__.startswith({str(site)!r}), module.__file__
        import trainer.engines, trainer.step, data_shards.loader
        import benchmarks.train_throughput, benchmarks.kernels, benchmarks.loader_throughput, benchmarks.gpu_summary
        import matplotlib.pyplot
        import skimage.data
        assert skimage.data.astronaut().shape == (512, 512, 3)  # the sample LSUN's photos are in the wheel
        print("imports ok")
    """)
    res = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=180)
    assert res.returncode == 0 and "imports ok" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]

    # the check's kernel-tests part: pytest from the bundle collects the kernel tests, conftest and all
    res = subprocess.run([sys.executable, "-S", "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          str(ROOT / "tests" / "test_kernels.py")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0 and " tests collected" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]


def check_writes_only_under_out_dir(bundle: Path, env: dict[str, str], tmp_path: Path) -> None:
    """benchmarks/gpu_check.sh with no measuring part: it records the machine, installs the bundle
    for its python, writes the summary, and leaves the checkout and the home folder as they were."""
    python = tmp_path / "image-python"  # the image's python3: no site-packages beyond PYTHONPATH
    python.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    python.chmod(0o755)
    home, out = tmp_path / "home", tmp_path / "gpu-check"
    home.mkdir()
    before = untracked_files()
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)], cwd=tmp_path,
                         env={**env, "PYTHON": str(python), "GPU_BUNDLE_DIR": str(bundle), "GPU_CHECK_PARTS": "none",
                              "HOME": str(home)},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    parts = [json.loads(line) for line in (out / "parts.jsonl").read_text().splitlines()]
    assert [(p["part"], p["status"]) for p in parts[:2]] == [("machine", "ok"), ("bundle", "ok")], parts
    assert "torch:" in (out / "machine.txt").read_text() and (out / "summary.txt").exists()
    assert untracked_files() - before == set()  # no bytecode, caches or results in the checkout
    assert not any(home.iterdir())


def untracked_files() -> set[str]:
    listed = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    ignored = subprocess.run(["git", "ls-files", "--others", "--ignored", "--exclude-standard", "-z"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    return {p for p in (listed + ignored).split("\0") if p and not p.startswith(".venv/")}
