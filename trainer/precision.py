"""Mixed precision: which autocast dtype the nets run in, and the DeepSpeed section for it.

`precision.dtype = "auto"` picks what the machine at hand runs fast: bf16 on CUDA devices that
support it, fp16 on older CUDA devices, bf16 on CPUs whose oneDNN has native bf16 (AVX512-BF16
or AMX), fp32 on every other CPU, where oneDNN emulates bf16 at ~10-20x the cost of fp32.

bf16 and fp16 both use DeepSpeed's `torch_autocast` section: parameters and optimiser state
stay fp32 (so do BatchNorm buffers, which DeepSpeed's "bf16" section would leave behind as
fp32 while casting the weights, a dtype mismatch), and for fp16 DeepSpeed keeps one
GradScaler per engine, so G's and D's loss scales never interfere.

fp16 is meant for CUDA. On CPU it runs through torch's CPU autocast (DeepSpeed's own "fp16"
section refuses CPU), which is how the tests exercise the loss-scaler path without a GPU;
it is slow there unless the CPU has native fp16 arithmetic.
"""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Hardware:
    """What the precision choice depends on: probed once per run, built by hand in tests."""

    device_type: str  # "cuda" | "cpu"
    name: str  # the GPU's name or the CPU's model
    cuda_bf16: bool = False
    cpu_native_bf16: bool = False
    cpu_isa: str = ""  # the CPU's best vector ISA as far as bf16 is concerned, e.g. "AVX512-BF16", "AVX2"


@dataclass(frozen=True)
class PrecisionChoice:
    name: str  # fp32 | bf16 | fp16
    reason: str  # one line: what was chosen and why
    warning: str = ""  # set when an explicit choice is slow on this machine


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _cpu_flag(name: str) -> bool:
    probe = getattr(torch.cpu, name, None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def probe_hardware(device: torch.device) -> Hardware:
    if device.type == "cuda":
        return Hardware("cuda", torch.cuda.get_device_name(device),
                        cuda_bf16=torch.cuda.is_bf16_supported(including_emulation=False))
    amx, avx512_bf16 = _cpu_flag("_is_amx_tile_supported"), _cpu_flag("_is_avx512_bf16_supported")
    # oneDNN's own check honours ONEDNN_MAX_CPU_ISA, so a capped oneDNN counts as what it is capped to;
    # it also says yes on plain AVX512 CPUs, which only emulate bf16, hence the instruction check
    onednn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    native = onednn_bf16 and (amx or avx512_bf16)
    isa = "AMX" if native and amx else "AVX512-BF16" if native else torch.backends.cpu.get_cpu_capability()
    return Hardware("cpu", cpu_model_name(), cpu_native_bf16=native, cpu_isa=isa)


def measure_slowdown(dtype: torch.dtype, repeats: int = 3) -> float:
    """Time of a DCGAN-sized strided convolution in `dtype` over its time in fp32, on this CPU."""
    x, w = torch.randn(16, 64, 16, 16), torch.randn(128, 64, 4, 4)

    def best(d: torch.dtype) -> float:
        xd, wd = x.to(d), w.to(d)
        F.conv2d(xd, wd, stride=2, padding=1)  # oneDNN picks and caches its kernel on the first call
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            F.conv2d(xd, wd, stride=2, padding=1)
            times.append(time.perf_counter() - started)
        return min(times)

    return best(dtype) / best(torch.float32)


def choose_precision(requested: str, hw: Hardware,
                     slowdown: Callable[[torch.dtype], float] = measure_slowdown) -> PrecisionChoice:
    """The dtype a run trains in: `requested` unless it is "auto", with the reason in one line."""
    if requested != "auto":
        auto, warning = choose_precision("auto", hw).name, ""
        slow_on_cpu = requested == "fp16" or requested == "bf16" and not hw.cpu_native_bf16
        if hw.device_type == "cpu" and slow_on_cpu:
            what = "native bf16" if requested == "bf16" else "a fast fp16 path (fp16 is meant for CUDA)"
            warning = (f"warning: precision.dtype = {requested} on a CPU without {what} ({hw.name}, {hw.cpu_isa}): "
                       f"a convolution measured {slowdown(_DTYPES[requested]):.1f}x slower than in fp32 here; "
                       f"precision.dtype = auto would train in {auto}")
        elif requested == "bf16" and hw.device_type == "cuda" and not hw.cuda_bf16:
            warning = f"warning: {hw.name} has no native bf16; precision.dtype = auto would train in {auto}"
        return PrecisionChoice(requested, f"precision: {requested} (set in the config)", warning)
    if hw.device_type == "cuda":
        if hw.cuda_bf16:
            return PrecisionChoice("bf16", f"precision: bf16 (auto: {hw.name} supports bf16)")
        return PrecisionChoice("fp16", f"precision: fp16 (auto: {hw.name} has no bf16; "
                                       "fp16 with a loss scaler per engine)")
    if hw.cpu_native_bf16:
        return PrecisionChoice("bf16", f"precision: bf16 (auto: {hw.name} has native bf16, {hw.cpu_isa})")
    return PrecisionChoice("fp32", f"precision: fp32 (auto: {hw.name} has no native bf16 ({hw.cpu_isa}), "
                                   "where bf16 is emulated at ~10-20x the cost of fp32)")


class Precision:
    def __init__(self, name: str, device: torch.device):
        if name not in ("fp32", *_DTYPES):
            raise ValueError(f"resolve precision.dtype = {name!r} with choose_precision first")
        self.name, self.device = name, device
        self.dtype = _DTYPES.get(name)

    def deepspeed_section(self) -> dict:
        if self.dtype is None:
            return {}
        return {"torch_autocast": {"enabled": True, "dtype": str(self.dtype).removeprefix("torch.")}}

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """For the modules we call outside an engine (D inside G's step)."""
        if self.dtype is None:
            yield
        else:
            with torch.autocast(self.device.type, dtype=self.dtype):
                yield
