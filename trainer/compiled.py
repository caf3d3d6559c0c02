"""The step under torch.compile (`model.compile = true`).

A DCGAN step is a few hundred small kernels: on a GPU the host's dispatch of them, not the
GPU, sets the pace. Compiling G and D lets inductor fuse each network's BatchNorm and
activations around the convolutions (forward and backward), and on CUDA replays each
network's kernels as one CUDA graph ("reduce-overhead"), which copies the step's inputs into
static buffers itself. Each engine's torch.optim.Adam step is compiled too: its per-parameter
foreach ops become a few fused kernels.

The networks are compiled in place (`nn.Module.compile`), so their state_dict keys are the
eager ones and checkpoints move freely between compiled and eager runs. DeepSpeed still owns
backward, the gradient all-reduce and the optimiser around these compiled pieces.
"""

from __future__ import annotations

import functools

import torch

from trainer.engines import GanEngines
from trainer.step import GanStep


def compile_mode(device: torch.device) -> str | None:
    # CUDA graphs need a CUDA device; on a CPU inductor's C++ kernels are the whole gain
    return "reduce-overhead" if device.type == "cuda" else None


def compile_step(step: GanStep, engines: GanEngines, device: torch.device) -> None:
    """Compile the batch's conversion, both networks and both optimiser steps in place; the
    compilation itself happens at the first step that runs them (tens of seconds on a CPU)."""
    mode = compile_mode(device)
    # uint8 NHWC -> the compute dtype, scaled to [-1, 1], channels_last: one fused kernel, where
    # eager casts and then scales (three passes over the batch). Not a CUDA graph: its input is
    # the loader's buffer, a new one each step
    step.to_input = torch.compile(step.to_input, dynamic=False)
    for _, engine in engines.items():
        # dynamic=False: a run's batch shape never changes, and static shapes let CUDA graphs replay
        engine.module.compile(mode=mode, dynamic=False)
        optimizer = engine.basic_optimizer  # under ZeRO 1/2 the Adam inside DeepSpeed's partitioning
        # Adam.step without torch.optim's profiler wrapper, which Dynamo can only ignore (with a
        # warning); the wrapper's step hooks are unused here
        unwrapped = functools.partial(type(optimizer).step.__wrapped__, optimizer)
        optimizer.step = torch.compile(unwrapped, dynamic=False)
