"""The set-up's choice of torch build (install/torch_build.py, run by `make` before torch exists)."""

import contextlib
import functools
import http.server
import os
import subprocess
import sys
import threading

import pytest
import torch
from conftest import ROOT

from common.ports import free_port

SCRIPT = ROOT / "install" / "torch_build.py"
VERSION = torch.__version__.split("+")[0]


def choose(venv_python, cpu_index, path):
    out = subprocess.run([sys.executable, str(SCRIPT), str(venv_python), VERSION, cpu_index], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PATH": str(path)}, check=True)
    return out.stdout.strip(), out.stderr.strip()


@contextlib.contextmanager
def wheel_index(root):
    """A local HTTP index on loopback with a torch/ page, as the PyTorch CPU index has."""
    (root / "torch").mkdir(parents=True)
    (root / "torch" / "index.html").write_text("<a href='torch-x.whl'>torch</a>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def no_gpu_path(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    return empty  # no nvidia-smi on it


def test_cpu_machine_takes_the_cpu_index_when_it_answers(tmp_path, no_gpu_path):
    with wheel_index(tmp_path / "index") as index:
        args, reason = choose(tmp_path / "no-venv" / "python", index, no_gpu_path)
    assert args == f"--index-url {index}" and reason.startswith("no NVIDIA GPU: ")


def test_cpu_machine_falls_back_to_pips_index_when_the_cpu_index_is_unreachable(tmp_path, no_gpu_path):
    closed = f"http://127.0.0.1:{free_port()}"
    args, reason = choose(tmp_path / "no-venv" / "python", closed, no_gpu_path)
    assert args == "" and "cannot be reached" in reason


def test_gpu_machine_takes_pypis_cuda_build(tmp_path, no_gpu_path):
    # nvidia-smi's own output format: no GPU can be had on this machine, so its listing is written out
    smi = no_gpu_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-0f3c)'\n")
    smi.chmod(0o755)
    with wheel_index(tmp_path / "index") as index:
        args, reason = choose(tmp_path / "no-venv" / "python", index, no_gpu_path)
    assert args == "" and "NVIDIA H200" in reason and "CUDA build" in reason


def test_a_torch_of_the_pinned_version_in_the_venv_is_kept(tmp_path, no_gpu_path):
    args, reason = choose(sys.executable, f"http://127.0.0.1:{free_port()}", no_gpu_path)
    assert args == "keep" and "kept" in reason


@pytest.mark.parametrize("module, argv, extra", [
    ("sklearn", ["eval", "features", "--checkpoint", "runs/none"], "eval"),
    ("scipy", ["eval", "fid", "--checkpoint", "runs/none", "--shards", "data/none"], "eval"),
])
def test_a_command_whose_extra_is_missing_is_a_one_line_error(module, argv, extra):
    """`make run` installs only what training needs: the evaluation then names the extra it lacks."""
    code = (f"import sys; sys.modules[{module!r}] = None; from dcgan.cli import main; "
            f"sys.exit(main({argv!r}))")  # None in sys.modules: the import fails as if not installed
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [
        f"dcgan: error: this needs {module}, from the project's `{extra}` extra: run `make setup`, or "
        f"pip install -e '.[{extra}]'"]
