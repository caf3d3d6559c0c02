"""One GAN training step: D on real and fake, then G with the non-saturating loss."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data_shards.loaders import to_model_input
from trainer.config import ModelConfig
from trainer.distributed import DistContext, all_ranks_agree
from trainer.engines import GanEngines
from trainer.models import sample_z
from trainer.precision import Precision
from trainer.rank_state import loss_scale_on_device


class NonFiniteLoss(FloatingPointError):
    pass


class _Skipped(Exception):
    """A non-finite loss under checkpoint.on_nonfinite = "skip": the step is dropped."""


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
    scale = loss_scale_on_device(engine)
    return norm / scale if scale is not None else norm


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


class NonFiniteWatch:
    """The first step at which each loss was not finite, kept on the device.

    Recording costs two device ops per step and no host read; `raise_if_any` reads it (one sync
    and, on several ranks, one all-reduce) where the loop needs the answer: once per log window
    and before every checkpoint and sample grid, so a bad step stops the run within a window and
    never reaches a checkpoint.
    """

    NAMES = ("loss_d", "loss_g")

    def __init__(self, device: torch.device):
        self.first_bad = torch.zeros(len(self.NAMES), dtype=torch.int64, device=device)  # 0: none yet

    def record(self, name: str, loss: torch.Tensor, step: int) -> None:
        slot = self.first_bad[self.NAMES.index(name)]
        slot.copy_(torch.where((slot == 0) & ~torch.isfinite(loss.detach()), step, slot))

    def raise_if_any(self) -> None:
        none = torch.iinfo(torch.int64).max
        first = torch.where(self.first_bad == 0, none, self.first_bad)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)  # a bad step on any rank stops every rank
        bad = [(step, name) for step, name in zip(first.tolist(), self.NAMES, strict=True) if step != none]
        if bad:
            step, name = min(bad)
            raise NonFiniteLoss(f"{name} is not finite at step {step}")


class GanStep:
    def __init__(self, engines: GanEngines, precision: Precision, model: ModelConfig, ctx: DistContext,
                 noise: torch.Generator, on_nonfinite: str):
        self.G, self.D = engines.generator, engines.discriminator
        self.precision, self.model, self.ctx = precision, model, ctx
        self.noise, self.on_nonfinite = noise, on_nonfinite
        self.watch = NonFiniteWatch(ctx.device)
        # D reads real images in the compute dtype (autocast would cast them to it anyway)
        self.input_dtype = precision.dtype or torch.float32
        self.to_input = to_model_input  # compiled into one kernel under model.compile (trainer/compiled.py)

    def raise_if_nonfinite(self) -> None:
        """Stop (NonFiniteLoss) if a loss was not finite since the run started; a host sync.
        Under "skip" nothing is recorded (a bad step is dropped at once), so there is nothing to read."""
        if self.on_nonfinite == "stop":
            self.watch.raise_if_any()

    def _finite(self, name: str, loss: torch.Tensor, step: int) -> bool:
        if self.on_nonfinite == "stop":
            self.watch.record(name, loss, step)  # read at the next window, checkpoint or sample grid
            return True
        # "skip" must decide now whether to step the optimiser: one host sync (and all-reduce) per loss
        return all_ranks_agree(bool(torch.isfinite(loss)), self.ctx.device)

    def _update(self, engine: torch.nn.Module, name: str, loss: torch.Tensor, step: int) -> torch.Tensor:
        """Finite check, backward, optimiser step; returns the gradient norm (unscaled, on the device)."""
        if not self._finite(name, loss, step):
            raise _Skipped
        engine.backward(loss)
        norm = grad_norm_before_step(engine)
        engine.step()
        return grad_norm_after_step(engine, norm).to(loss.device)

    def __call__(self, images: torch.Tensor, step: int) -> dict[str, torch.Tensor] | None:
        """One step on a loader's batch (uint8 N x H x W x C on the device). Returns the step's
        statistics, or None if it was skipped for a non-finite loss."""
        real = self.to_input(images, self.input_dtype)
        fake = self.G(sample_z(real.shape[0], self.model, self.noise, self.ctx.device))
        try:
            d_real, d_fake = self.D(real), self.D(fake.detach())
            loss_d = bce(d_real, 1.0) + bce(d_fake, 0.0)
            norm_d = self._update(self.D, "loss_d", loss_d, step)

            with frozen(self.D.module), self.precision.autocast():
                d_fake_for_g = self.D.module(fake)  # the module, not the engine: its backward belongs to G
            loss_g = bce(d_fake_for_g, 1.0)  # non-saturating: maximise log D(G(z))
            norm_g = self._update(self.G, "loss_g", loss_g, step)
        except _Skipped:
            return None
        return {
            "loss_d": loss_d.detach(), "loss_g": loss_g.detach(),
            "d_real": torch.sigmoid(d_real.detach().float()).mean(),
            "d_fake": torch.sigmoid(d_fake.detach().float()).mean(),
            "d_fake_after": torch.sigmoid(d_fake_for_g.detach().float()).mean(),
            "grad_norm_d": norm_d, "grad_norm_g": norm_g,
        }
