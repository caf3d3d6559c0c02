"""Compile every kernel launch of the generator's blocks for a CUDA GPU, without one.

    python -m kernels.compile_check [--arch 90] [--batch 128] [--dtype bf16]

Runs each block's forward (training and inference) and backward under `compile_for`: every launch
is compiled to a cubin for sm_<arch> with the block sizes the GPU would use, which checks what
Triton's CPU interpreter does not (tl.dot shapes and dtypes, register and shared-memory limits).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

# sm_90 (H100/H200) has 227 KiB of shared memory per block
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}


def check(arch: int, batch: int, dtype: torch.dtype, ngf_values: tuple[int, ...] = (64, 128)) -> list[dict]:
    from kernels.dispatch import conv_transpose_bn_relu
    from kernels.launch import compile_for
    from kernels.shapes import generator_blocks

    rows = []
    for ngf in ngf_values:
        for shape in generator_blocks(ngf):
            conv = nn.ConvTranspose2d(shape.c_in, shape.c_out, shape.ksize, shape.stride, shape.padding, bias=False,
                                      device="meta")
            bn = nn.BatchNorm2d(shape.c_out, device="meta")
            # meta tensors: shapes, strides and dtypes only; nothing is allocated or run
            x = torch.empty(batch, shape.c_in, shape.size_in, shape.size_in, dtype=dtype, device="meta",
                            requires_grad=True)
            with compile_for(arch) as log:
                out = conv_transpose_bn_relu(x, conv, bn)  # a bf16 x runs the GEMMs in bf16
                out.backward(torch.empty_like(out))
                conv.eval()
                bn.eval()
                with torch.no_grad():
                    conv_transpose_bn_relu(x.detach(), conv, bn)
            for entry in log.kernels:
                rows.append({"ngf": ngf, "block": shape.name, **entry})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--ngf", type=int, action="append", help="generator widths (default: 64 and 128)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: unset TRITON_INTERPRET: the interpreter replaces the compiler", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    rows = check(args.arch, args.batch, dtype, tuple(args.ngf or (64, 128)))
    limit = SHARED_LIMIT.get(args.arch, 99 * 1024)
    failures = 0
    for row in rows:
        over = row["shared_bytes"] > limit or not row["has_cubin"]
        failures += over
        blocks = "x".join(str(row["constexprs"][k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")
                          if k in row["constexprs"]) or str(row["constexprs"].get("BLOCK", ""))
        print(f"ngf={row['ngf']:<4} {row['block']:<22} {row['kernel']:<28} blocks {blocks:<12} "
              f"warps {row['num_warps']} shared {row['shared_bytes']:>6} B{'  OVER LIMIT' if over else ''}")
    print(f"{len(rows)} launches compiled for sm_{args.arch} ({args.dtype}, batch {args.batch}); {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
