"""What a rank keeps outside its engines and checkpoints itself: the noise generator, torch's global
(and CUDA) RNG, and each engine's fp16 loss scaler.

This is the one place that knows where DeepSpeed keeps a ZeRO-0 engine's loss scaler under torch
autocast: a torch GradScaler in a private attribute, with no public accessor and no part in
DeepSpeed's own checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch

from trainer.engines import GanEngines


def loss_scaler(engine: Any) -> torch.amp.GradScaler | None:
    """The engine's fp16 GradScaler, or None (fp32, bf16, or ZeRO's own fp16 optimiser)."""
    return getattr(engine, "torch_autocast_z0_gradscaler", None)


def loss_scale_on_device(engine: Any) -> torch.Tensor | None:
    """The fp16 loss scale as a tensor on the device (None without a scaler): GradScaler.get_scale()
    would read it to the host, a device sync per step."""
    scaler = loss_scaler(engine)
    return scaler._get_scale_async() if scaler is not None else None


class RankState:
    def __init__(self, noise: torch.Generator, engines: GanEngines):
        self.noise, self.engines = noise, engines

    def state_dict(self) -> dict[str, Any]:
        scalers = {tag: scaler.state_dict() for tag, engine in self.engines.items()
                   if (scaler := loss_scaler(engine)) is not None}
        state = {"noise_rng": self.noise.get_state(), "torch_rng": torch.get_rng_state(), "grad_scalers": scalers}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.noise.set_state(state["noise_rng"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda_rng"])
        for tag, engine in self.engines.items():
            if tag in state["grad_scalers"]:
                loss_scaler(engine).load_state_dict(state["grad_scalers"][tag])

    def loss_scales(self) -> dict[str, float]:
        """Each net's ("g", "d") current loss scale, 1 without fp16; reads the device (log windows only)."""
        return {tag[0]: float(scaler.get_scale()) if (scaler := loss_scaler(engine)) is not None else 1.0
                for tag, engine in self.engines.items()}
