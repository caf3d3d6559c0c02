"""Which build of torch `make` installs into the venv, decided before the venv has torch.

Prints the extra pip arguments for `pip install torch==VERSION`, or `keep`, and the reason on
stderr. Runs with the system Python and its standard library only.

- a torch of the pinned version already in the venv: keep it (a CUDA build someone installed
  stays; pip would otherwise replace it with whatever the index resolves);
- an NVIDIA GPU (`nvidia-smi -L` lists one): PyPI's build, which is the CUDA one on Linux;
- no GPU: the PyTorch project's CPU index (~190 MB instead of several GB of NVIDIA libraries),
  or, where that index cannot be reached (an offline mirror, a proxy), pip's configured index.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.request


def installed_version(venv_python: str) -> str:
    try:
        out = subprocess.run([venv_python, "-W", "ignore", "-c", "import torch; print(torch.__version__)"],
                             capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip().split("+")[0] if out.returncode == 0 else ""


def nvidia_gpu() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    gpus = [line for line in out.stdout.splitlines() if line.startswith("GPU ")]
    return gpus[0] if out.returncode == 0 and gpus else ""


def reachable(index: str, timeout_s: float = 20) -> bool:
    try:
        with urllib.request.urlopen(f"{index.rstrip('/')}/torch/", timeout=timeout_s) as response:
            return response.status == 200
    except OSError:  # URLError, refused, unknown host, timeout
        return False


def choose(venv_python: str, version: str, cpu_index: str) -> tuple[str, str]:
    """(pip arguments or "keep", the reason)."""
    if installed_version(venv_python) == version:
        return "keep", f"torch {version} is installed already: kept"
    if gpu := nvidia_gpu():
        return "", f"an NVIDIA GPU is present ({gpu}): torch {version}'s CUDA build from PyPI (several GB)"
    if reachable(cpu_index):
        return f"--index-url {cpu_index}", f"no NVIDIA GPU: torch {version}'s CPU build from {cpu_index}"
    return "", f"no NVIDIA GPU, and {cpu_index} cannot be reached: torch {version} from pip's configured index"


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: torch_build.py VENV_PYTHON VERSION CPU_INDEX", file=sys.stderr)
        return 2
    args, reason = choose(*argv)
    print(reason, file=sys.stderr)
    print(args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
