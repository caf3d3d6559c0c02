"""How the Triton kernels are launched: block sizes, and an ahead-of-time compile mode.

Block sizes come from a small rule rather than triton.autotune: autotuning re-runs every kernel
for each configuration on first use, which in the CPU interpreter costs minutes. On a GPU the rule
gives tensor-core tiles (128x128 where the layer is wide enough); under the interpreter, whose cost
grows with the number of programs and not with tile size, it gives a few large tiles.

`compile_for(target)` turns every launch into a compile for that GPU (e.g. sm_90) and records the
result instead of running: the constraints the interpreter does not enforce (tl.dot shapes and
dtypes, shared memory) are checked on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import triton


def interpreting() -> bool:
    """Triton's interpreter runs kernels on CPU tensors (TRITON_INTERPRET=1, set before kernels load)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class Gemm:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def _fit(size: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(max(size, 1))))


def gemm_blocks(m: int, n: int, k: int) -> Gemm:
    """Tiles for an M x N GEMM with reduction length k (per tap)."""
    if interpreting():
        return Gemm(_fit(m, 16, 1024), _fit(n, 16, 512), _fit(k, 16, 512), 1, 1)
    block_m = 128 if m >= 4096 else 64
    block_n = _fit(n, 16, 128)
    block_k = _fit(k, 16, 64)
    warps = 8 if block_m * block_n >= 128 * 128 else 4
    return Gemm(block_m, block_n, block_k, warps, 3)


def elementwise_block(total: int) -> int:
    return _fit(total, 16, 1 << 16) if interpreting() else 1024


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 GEMMs follow PyTorch's own setting for convolutions (TF32 unless switched off)."""
    if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return "ieee"
    return "tf32"


@dataclass
class CompileLog:
    target: Any
    kernels: list[dict] = field(default_factory=list)


_compile_log: CompileLog | None = None


def compiling() -> bool:
    """Inside `compile_for`: launches compile for a GPU and run nothing, whatever the tensors' device."""
    return _compile_log is not None


@contextlib.contextmanager
def compile_for(arch: int = 90, warp_size: int = 32) -> Iterator[CompileLog]:
    """Compile every launch inside for CUDA sm_<arch> instead of running it (outputs stay unwritten)."""
    global _compile_log
    from triton.backends.compiler import GPUTarget

    previous, _compile_log = _compile_log, CompileLog(GPUTarget("cuda", arch, warp_size))
    try:
        yield _compile_log
    finally:
        _compile_log = previous


def launch(kernel: triton.JITFunction, grid: tuple[int, ...], args: list[Any], constexprs: dict[str, Any],
           num_warps: int = 4, num_stages: int = 3) -> None:
    if _compile_log is None:
        kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
        return
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    from triton.compiler import ASTSource

    # specialise the arguments exactly as a launch would: 16-byte aligned pointers and multiples of
    # 16 marked divisible (what lets loads vectorise and pipeline), integers equal to 1 made constants
    signature, constants, attrs = {}, dict(constexprs), {}
    for index, (name, value) in enumerate(zip(kernel.arg_names, args, strict=False)):
        kind, spec = native_specialize_impl(BaseBackend, value, False, True, True)
        signature[name] = kind
        if kind == "constexpr":
            constants[name] = value
        elif isinstance(spec, str):
            attrs[(index,)] = BaseBackend.parse_attr(spec)
    signature.update({name: "constexpr" for name in constexprs})
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    compiled = triton.compile(source, target=_compile_log.target,
                              options={"num_warps": num_warps, "num_stages": num_stages})
    _compile_log.kernels.append({"kernel": kernel.fn.__name__, "grid": grid, "constexprs": dict(constexprs),
                                 "shared_bytes": compiled.metadata.shared, "num_warps": num_warps,
                                 "num_stages": num_stages, "has_cubin": bool(compiled.asm.get("cubin"))})
