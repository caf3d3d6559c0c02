"""This device's dense matmul ceiling: what 100 % means for the training step's achieved TFLOP/s.

Square matmuls in bf16, in fp32 with TF32 off (full fp32, off the tensor cores) and, on a GPU,
in TF32 (PyTorch's default for fp32 convolutions and the trainer's for fp32 matmuls). Each is
timed after a warm-up long enough for the clocks to settle; a precision's ceiling is its best
size. On a CPU it runs too, at a small size, so that it can be tested anywhere.

    python benchmarks/matmul_ceiling.py [--size 8192 --size 16384] [--out benchmarks/results/matmul_ceiling.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import print_table, write_result  # noqa: E402

# name -> (dtype, TF32 allowed)
PRECISIONS: dict[str, tuple[torch.dtype, bool]] = {
    "bf16": (torch.bfloat16, False), "fp32": (torch.float32, False), "tf32": (torch.float32, True)}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_matmul_ms(n: int, dtype: torch.dtype, device: torch.device, warmup_s: float, rounds: int) -> float:
    """Median milliseconds of one n x n x n matmul over `rounds` timed batches of calls."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.matmul(a, b, out=out)
    _synchronize(device)
    # calls per timed batch: enough that launch gaps and timer resolution vanish, few enough to stay quick
    started, calls = time.perf_counter(), 0
    while calls < 3 or time.perf_counter() - started < warmup_s:
        torch.matmul(a, b, out=out)
        calls += 1
        if calls % 8 == 0:
            _synchronize(device)
    _synchronize(device)
    per_call_s = (time.perf_counter() - started) / calls
    batch = max(1, min(200, int(0.05 / max(per_call_s, 1e-9))))
    times: list[float] = []
    for _ in range(rounds):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(batch):
                torch.matmul(a, b, out=out)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / batch)
        else:
            t0 = time.perf_counter()
            for _ in range(batch):
                torch.matmul(a, b, out=out)
            times.append((time.perf_counter() - t0) * 1e3 / batch)
    return statistics.median(times)


def measure(sizes: list[int], precisions: list[str], device: torch.device, warmup_s: float,
            rounds: int) -> list[dict]:
    rows = []
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        for name in precisions:
            dtype, tf32 = PRECISIONS[name]
            torch.backends.cuda.matmul.allow_tf32 = tf32
            for n in sizes:
                ms = time_matmul_ms(n, dtype, device, warmup_s, rounds)
                rows.append({"precision": name, "size": n, "ms": ms, "tflops": 2 * n**3 / ms / 1e9})
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, action="append", help="n of n x n x n; default 8192 and 16384 "
                                                                  "(GPU), 512 (CPU)")
    parser.add_argument("--precisions", default=None, help="comma list of bf16, fp32, tf32 "
                                                           "(default: all three on a GPU, bf16,fp32 on a CPU)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds of warm-up per measurement "
                                                                   "(default 1 on a GPU, 0.1 on a CPU)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/"
                                                                 "matmul_ceiling-<cuda|cpu>.json)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    sizes = args.size or ([8192, 16384] if on_gpu else [512])
    # TF32 is a tensor-core format: on a CPU it would time plain fp32 a second time
    precisions = (args.precisions or ("bf16,fp32,tf32" if on_gpu else "bf16,fp32")).split(",")
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        parser.error(f"unknown precision(s) {', '.join(unknown)}; choose from {', '.join(PRECISIONS)}")
    warmup = args.warmup if args.warmup is not None else (1.0 if on_gpu else 0.1)
    device_name = torch.cuda.get_device_name(device) if on_gpu else "cpu"

    rows = measure(sizes, precisions, device, warmup, args.rounds)
    ceilings = {p: max(r["tflops"] for r in rows if r["precision"] == p) for p in precisions}
    print_table(f"dense matmul, {device_name}, median of {args.rounds} rounds",
                [("precision", "precision", "<9"), ("n", "size", ">6"), ("ms", "ms", ">9.3f"),
                 ("TFLOP/s", "tflops", ">8.2f")], rows)
    out = args.out or ROOT / "benchmarks" / "results" / f"matmul_ceiling-{device.type}.json"
    write_result(out, "matmul_ceiling", device=device_name, torch=torch.__version__, ceilings_tflops=ceilings,
                 settings={"sizes": sizes, "precisions": precisions, "warmup_s": warmup, "rounds": args.rounds},
                 rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
