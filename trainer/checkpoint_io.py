"""Loading checkpoint files without executing pickled code.

DeepSpeed's TorchCheckpointEngine loads with torch.load(weights_only=False), which runs any
code a tampered checkpoint carries. Every load here uses weights_only=True; the few DeepSpeed
record types its ZeRO optimiser states contain (enums, a named tuple, loss-scaler state) are
allowlisted by name, so nothing else can be constructed.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

_DEEPSPEED_RECORD_TYPES = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.fp16.loss_scaler.LossScaleConfig",
    "deepspeed.runtime.fp16.loss_scaler.LossScaleProfile",
)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, or written by an incompatible run."""


def _allowed_globals() -> list[Any]:
    found = []
    for dotted in _DEEPSPEED_RECORD_TYPES:
        module, _, name = dotted.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue  # another DeepSpeed version: that type cannot occur in its files either
    return found


def safe_load(path: str | Path, map_location: Any = "cpu") -> Any:
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file not found: {path}") from None
    except Exception as e:  # an unpickling refusal or a truncated file: never fall back to unsafe loading
        raise CheckpointError(f"cannot load {path} safely: {str(e).splitlines()[0]}") from None


def install_safe_loading(engine: Any) -> None:
    """Make a DeepSpeed engine read its checkpoints through `safe_load`."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            return safe_load(path, map_location)

    engine.checkpoint_engine = SafeTorchCheckpointEngine(engine._config)
