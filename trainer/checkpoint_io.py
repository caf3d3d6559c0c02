"""Reading and writing checkpoint files: loading never executes pickled code, and writing reports a full disk.

DeepSpeed's TorchCheckpointEngine loads with torch.load(weights_only=False), which runs any
code a tampered checkpoint carries. Every load here uses weights_only=True; the few DeepSpeed
record types its ZeRO optimiser states contain (enums, a named tuple, loss-scaler state) are
allowlisted by name, so nothing else can be constructed.

torch.save to a path reports a failed write only as "file write failed"; through a Python file
object the OSError keeps its errno, so a full disk can be told from other failures.
"""

from __future__ import annotations

import importlib
import re
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
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_UNSAFE_GLOBAL = re.compile(r"unsupported global:?(?: GLOBAL)? ([\w.]+)", re.IGNORECASE)  # two wordings
_UNPICKLER_ERROR = re.compile(r"WeightsUnpickler error: ([^\n]*)")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, damaged, unsafe, or written by an incompatible run."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint that could not be written (a full disk, say); the earlier checkpoints are untouched."""


def _allowed_globals() -> list[Any]:
    found = []
    for dotted in _DEEPSPEED_RECORD_TYPES:
        module, _, name = dotted.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue  # another DeepSpeed version: that type cannot occur in its files either
    return found


def _size(path: Path) -> str:
    try:
        return f"{path.stat().st_size:,} bytes"
    except OSError:
        return "size unknown"


def _load_failure(path: Path, e: Exception) -> str:
    """One line on why `path` did not load: refused as unsafe, unreadable, or damaged."""
    text = _ANSI.sub("", str(e))
    if unsafe := _UNSAFE_GLOBAL.search(text):
        return (f"cannot load {path} safely: unpickling it would call {unsafe.group(1)}, which is not a type a "
                "checkpoint holds (a tampered or foreign file); refused without running it")
    if "Weights only load failed" in text:
        detail = _UNPICKLER_ERROR.search(text)
        return (f"cannot load {path} safely: the weights-only unpickler refused it "
                f"({detail.group(1).strip() if detail else 'not plain tensors and containers'})")
    if isinstance(e, (PermissionError, IsADirectoryError)):
        return f"cannot read {path}: {e.strerror}"
    detail = text.strip().splitlines()[0].split(". ")[0] if text.strip() else ""
    return (f"cannot load {path} ({_size(path)}): the file is damaged or cut short "
            f"({type(e).__name__}{': ' + detail if detail else ''})")


def safe_load(path: str | Path, map_location: Any = "cpu") -> Any:
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file not found: {path}") from None
    except Exception as e:  # an unpickling refusal or a damaged file: never fall back to unsafe loading
        raise CheckpointError(_load_failure(path, e)) from None


def save_file(obj: Any, path: str | Path, **save_kwargs: Any) -> None:
    """torch.save whose write failures raise OSError with their errno and `path` as the filename."""
    try:
        with open(path, "wb") as f:
            torch.save(obj, f, **save_kwargs)
    except OSError as e:
        e.filename = e.filename or str(path)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Path.write_text whose write failures name the file (a failed write() does not)."""
    try:
        Path(path).write_text(text)
    except OSError as e:
        e.filename = e.filename or str(path)
        raise


def install_safe_loading(engine: Any) -> None:
    """Make a DeepSpeed engine read its checkpoints through `safe_load` and write them through `save_file`."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            return safe_load(path, map_location)

        def save(self, state_dict: Any, path: str) -> None:
            save_file(state_dict, path, _use_new_zipfile_serialization=self.zipfile_serialization)

    engine.checkpoint_engine = SafeTorchCheckpointEngine(engine._config)
