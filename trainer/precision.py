"""Mixed precision: which autocast dtype the nets run in, and the DeepSpeed section for it.

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
from collections.abc import Iterator

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, name: str, device: torch.device):
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
