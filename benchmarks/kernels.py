"""Microbenchmarks of the generator's conv-transpose + BatchNorm + ReLU blocks.

For each block of the 64x64 generator (the paper's widths, ngf=128, and pytorch/examples' ngf=64)
and each batch size, side by side in one run: the PyTorch modules in eager mode (cuDNN on a GPU),
the same modules under torch.compile, and the fused Triton kernels; the training forward alone
and forward + backward. Each time is turned into achieved TFLOP/s (the conv-transpose's
multiply-adds) and GB/s (the block's compulsory traffic: input, weight, output; backward adds the
output gradient, the saved activation and both gradients) and set against this device's own
ceilings, measured first (a large matmul, a large copy).

On a CPU, Triton runs only in its interpreter, which says nothing about speed: the fused arm is
skipped there and the default grid shrinks to what 2 cores measure in minutes.

    python benchmarks/kernels.py [--batch 128 --batch 512] [--ngf 64 --ngf 128] [--dtype bf16]
                                 [--no-compile] [--out benchmarks/results/kernels.json]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import print_table, write_result  # noqa: E402
from common.atomic import write_atomically  # noqa: E402
from kernels.shapes import BlockShape, generator_blocks  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def time_ms(fn: Callable[[], object], device: torch.device, min_seconds: float = 0.5) -> float:
    """Median milliseconds per call after warm-up."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    fn()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - started < min_seconds and len(times) < 20):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def ceilings(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """This device's measured matmul TFLOP/s (in `dtype`) and copy GB/s: what 100 % means below."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    matmul_ms = time_ms(lambda: a @ b, device)
    elements = (1 << 28) if device.type == "cuda" else (1 << 25)
    src = torch.empty(elements, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device)
    return {"matmul_tflops": 2 * n**3 / matmul_ms / 1e9, "copy_gbps": 2 * src.numel() * 4 / copy_ms / 1e6}


def block_traffic(shape: BlockShape, batch: int, itemsize: int, backward: bool) -> int:
    x = batch * shape.c_in * shape.size_in ** 2
    w = shape.c_in * shape.c_out * shape.ksize ** 2
    out = batch * shape.c_out * shape.size_out ** 2
    forward = x + w + out
    # backward: read dout, the saved activation, x and W; write dx and dW
    return itemsize * (forward + (2 * out + x + w + x + w if backward else 0))


def make_arms(shape: BlockShape, device: torch.device, use_compile: bool, fused: bool
              ) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    from kernels.dispatch import conv_transpose_bn_relu

    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(shape.c_in, shape.c_out, shape.ksize, shape.stride, shape.padding, bias=False)
    bn = nn.BatchNorm2d(shape.c_out)
    conv, bn = conv.to(device), bn.to(device)
    arms: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    eager_conv, eager_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    arms["eager"] = lambda x: torch.relu(eager_bn(eager_conv(x)))
    if use_compile:
        c_conv, c_bn = copy.deepcopy(conv), copy.deepcopy(bn)
        arms["compile"] = torch.compile(lambda x: torch.relu(c_bn(c_conv(x))), dynamic=False)
    if fused:
        arms["fused"] = lambda x: conv_transpose_bn_relu(x, conv, bn)
    return arms


def measure(shape: BlockShape, batch: int, dtype: torch.dtype, device: torch.device, use_compile: bool,
            fused: bool, peak: dict[str, float]) -> list[dict]:
    x = torch.randn(batch, shape.c_in, shape.size_in, shape.size_in, device=device)
    rows = []
    for method, block in make_arms(shape, device, use_compile, fused).items():
        xg = x.clone().requires_grad_()
        grad = None

        def forward(block=block) -> torch.Tensor:
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                return block(x)

        def forward_backward(block=block, xg=xg) -> None:
            nonlocal grad
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                out = block(xg)
            if grad is None:
                grad = torch.randn_like(out)
            out.backward(grad)

        for direction, fn, flops in (("fwd", forward, shape.flops(batch)),
                                     ("fwd+bwd", forward_backward, 3 * shape.flops(batch))):
            ms = time_ms(fn, device)
            traffic = block_traffic(shape, batch, dtype.itemsize, direction == "fwd+bwd")
            tflops, gbps = flops / ms / 1e9, traffic / ms / 1e6
            rows.append({"block": shape.name, "batch": batch, "direction": direction, "method": method, "ms": ms,
                         "tflops": tflops, "pct_peak_flops": 100 * tflops / peak["matmul_tflops"], "gbps": gbps,
                         "pct_peak_bw": 100 * gbps / peak["copy_gbps"], "gflop": flops / 1e9,
                         "mbytes": traffic / 1e6})
    return rows


def add_speedups(rows: list[dict]) -> None:
    eager = {(r["block"], r["batch"], r["direction"]): r["ms"] for r in rows if r["method"] == "eager"}
    for r in rows:
        r["vs_eager"] = eager[(r["block"], r["batch"], r["direction"])] / r["ms"]


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    methods = [m for m in ("eager", "compile", "fused") if any(r["method"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(batches), figsize=(7 * len(batches), 4.5), squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=True):
        subset = [r for r in rows if r["batch"] == batch]
        labels = list(dict.fromkeys(r["block"] for r in subset))
        series = [(m, d) for m in methods for d in ("fwd", "fwd+bwd")]
        width = 0.8 / max(1, len(series))
        for i, (method, direction) in enumerate(series):
            values = [next((r["tflops"] for r in subset if r["block"] == b and r["method"] == method
                            and r["direction"] == direction), 0.0) for b in labels]
            ax.bar([j + i * width for j in range(len(labels))], values, width, label=f"{method} {direction}")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, rotation=20, fontsize=8)
        ax.set_ylabel("achieved TFLOP/s (conv-transpose FLOPs)")
        ax.set_title(f"batch {batch}")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dcgan bench kernels",
                                     description="conv-transpose + BN + ReLU block: eager vs compile vs fused")
    parser.add_argument("--batch", type=int, action="append", help="default: 128 and 512 (GPU), 32 (CPU)")
    parser.add_argument("--ngf", type=int, action="append", help="default: 64 and 128 (GPU), 64 (CPU)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: bf16 (GPU), fp32 (CPU: PyTorch's bf16 "
                                                                "conv-transpose backward is a slow path there)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile arm (~20 s per shape)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/"
                                                                 "kernels-<cuda|cpu>.json, and a .png beside it)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    batches = args.batch or ([128, 512] if on_gpu else [32])
    ngfs = args.ngf or ([64, 128] if on_gpu else [64])
    args.dtype = args.dtype or ("bf16" if on_gpu else "fp32")
    dtype = DTYPES[args.dtype]
    notes = []
    if not on_gpu:
        notes.append("CPU: the fused Triton arm needs a GPU (the interpreter measures nothing about speed); "
                     "eager and torch.compile only" + ("" if args.batch or args.ngf else ", batch 32, ngf 64"))
    if on_gpu:
        torch.backends.cudnn.benchmark = True
    peak = ceilings(device, dtype)
    device_name = torch.cuda.get_device_name() if on_gpu else "cpu"
    print(f"{device_name}: matmul {peak['matmul_tflops']:.1f} TFLOP/s ({args.dtype}), "
          f"copy {peak['copy_gbps']:.0f} GB/s")
    for note in notes:
        print(f"note: {note}")

    rows: list[dict] = []
    for ngf in ngfs:
        for shape in generator_blocks(ngf):
            for batch in batches:
                for row in measure(shape, batch, dtype, device, not args.no_compile, on_gpu, peak):
                    rows.append({"ngf": ngf, **row})
    add_speedups(rows)
    print_table(f"conv-transpose + BN + ReLU, {args.dtype}, {device_name}", [
        ("ngf", "ngf", ">4"), ("block", "block", "<22"), ("batch", "batch", ">5"), ("pass", "direction", "<7"),
        ("method", "method", "<7"), ("ms", "ms", ">9.3f"), ("TFLOP/s", "tflops", ">8.2f"),
        ("%peak", "pct_peak_flops", ">6.1f"), ("GB/s", "gbps", ">8.1f"), ("%bw", "pct_peak_bw", ">5.1f"),
        ("vs eager", "vs_eager", ">8.2f")], rows)
    out = args.out or ROOT / "benchmarks" / "results" / f"kernels-{device.type}.json"
    write_result(out, "kernels", device=device_name, dtype=args.dtype, ceilings=peak, notes=notes,
                 torch=torch.__version__, rows=rows)
    plot(rows, out.with_suffix(".png"), f"conv-transpose + BN + ReLU blocks, {args.dtype}, {device_name} "
                                        f"(matmul ceiling {peak['matmul_tflops']:.1f} TFLOP/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
