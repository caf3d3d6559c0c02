"""One GAN training step: D on real and fake, then G with the non-saturating loss."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from trainer.config import ModelConfig
from trainer.distributed import DistContext, all_ranks_agree
from trainer.engines import GanEngines
from trainer.models import sample_z
from trainer.precision import Precision


class NonFiniteLoss(FloatingPointError):
    pass


@contextlib.contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """No gradient reaches `module` while G learns through it: nothing leaks into D's buffers
    (DeepSpeed#399) and ZeRO-2 never sees D's partitions reduced twice in one step."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def grad_norm_before_step(engine: torch.nn.Module) -> torch.Tensor | None:
    """The global L2 norm of an engine's gradients (already averaged over ranks), unscaled.

    Stays on the device: the loop reads it once per log window. Under ZeRO-1/2 the gradients
    are partitioned away from the parameters and ZeRO's optimiser computes the norm in step().
    """
    if engine.zero_optimization_stage() > 0:
        return None
    norm = torch.nn.utils.get_total_norm([p.grad for p in engine.module.parameters() if p.grad is not None])
    scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
    return norm / scaler.get_scale() if scaler is not None else norm


def grad_norm_after_step(engine: torch.nn.Module, before: torch.Tensor | None) -> torch.Tensor:
    if before is not None:
        return before.detach()
    value = engine.get_global_grad_norm()
    if torch.is_tensor(value):
        return value.detach().float()  # no .item(): that would wait for the device every step
    return torch.as_tensor(float("nan") if value is None else float(value))


def bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


class GanStep:
    def __init__(self, engines: GanEngines, precision: Precision, model: ModelConfig, ctx: DistContext,
                 noise: torch.Generator, on_nonfinite: str):
        self.G, self.D = engines.generator, engines.discriminator
        self.precision, self.model, self.ctx = precision, model, ctx
        self.noise, self.on_nonfinite = noise, on_nonfinite

    def _finite(self, name: str, loss: torch.Tensor, step: int) -> bool:
        if all_ranks_agree(bool(torch.isfinite(loss)), self.ctx.device):
            return True
        if self.on_nonfinite == "stop":
            raise NonFiniteLoss(f"{name} is not finite at step {step}")
        return False

    def __call__(self, real: torch.Tensor, step: int) -> dict[str, torch.Tensor] | None:
        """Returns the step's statistics, or None if it was skipped for a non-finite loss."""
        z = sample_z(real.shape[0], self.model, self.noise, self.ctx.device)
        fake = self.G(z)

        d_real, d_fake = self.D(real), self.D(fake.detach())
        loss_d = bce(d_real, 1.0) + bce(d_fake, 0.0)
        if not self._finite("loss_d", loss_d, step):
            return None
        self.D.backward(loss_d)
        norm_d = grad_norm_before_step(self.D)
        self.D.step()

        with frozen(self.D.module), self.precision.autocast():
            d_fake_for_g = self.D.module(fake)  # the module, not the engine: its backward belongs to G
        loss_g = bce(d_fake_for_g, 1.0)  # non-saturating: maximise log D(G(z))
        if not self._finite("loss_g", loss_g, step):
            return None
        self.G.backward(loss_g)
        norm_g = grad_norm_before_step(self.G)
        self.G.step()

        return {
            "loss_d": loss_d.detach(), "loss_g": loss_g.detach(),
            "d_real": torch.sigmoid(d_real.detach().float()).mean(),
            "d_fake": torch.sigmoid(d_fake.detach().float()).mean(),
            "d_fake_after": torch.sigmoid(d_fake_for_g.detach().float()).mean(),
            "grad_norm_d": grad_norm_after_step(self.D, norm_d).to(loss_d.device),
            "grad_norm_g": grad_norm_after_step(self.G, norm_g).to(loss_d.device),
        }
