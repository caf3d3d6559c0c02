"""The training loop: build everything once, then step, log, sample and checkpoint."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from data_shards.loaders import open_loader
from data_shards.manifest import ShardSetError
from evaluation.images import generate, save_grid
from trainer.checkpoint import Checkpointer, CheckpointStore, TrainState
from trainer.config import CHECKPOINTS, Config, to_toml
from trainer.distributed import DistContext, average_batchnorm_stats, barrier, init_distributed
from trainer.engines import GanEngines, build_engines
from trainer.metrics import MetricsLog, StepMeter
from trainer.models import build_models, fused_kernels_unavailable, sample_z
from trainer.precision import Precision, choose_precision, probe_hardware
from trainer.rank_state import RankState
from trainer.step import GanStep, NonFiniteLoss
from trainer.sync_batchnorm import synchronise_batchnorm
from trainer.telemetry import NoMetrics, open_metrics

if TYPE_CHECKING:
    from trainer.quality import QualityProbe

StepHook = Callable[["Trainer"], None]


class Trainer:
    """Owns the engines, the loader and the run folder; `fit` runs the loop.

    `checkpointer` decides where checkpoints go (default: the run folder's checkpoints/, which
    every rank can write); `step_hooks` run after every step (what a caller wants to observe, e.g. a test's counters).
    """

    def __init__(self, cfg: Config, ctx: DistContext | None = None, checkpointer: CheckpointStore | None = None):
        self.cfg = cfg
        self.ctx = ctx or init_distributed()
        torch.set_float32_matmul_precision("high")
        self.run_dir = Path(cfg.logging.run_dir)
        # each rank resolves "auto" for its own device; the run's config records what it trains in
        choice = choose_precision(cfg.precision.dtype, probe_hardware(self.ctx.device))
        cfg.precision.dtype = choice.name
        self.precision = Precision(choice.name, self.ctx.device)
        if self.ctx.is_main:
            print(choice.reason, flush=True)
            if choice.warning:
                print(choice.warning, file=sys.stderr, flush=True)
            for sub in ("samples", CHECKPOINTS):
                (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.toml").write_text(to_toml(cfg))
        self.rank_batch = cfg.optim.rank_batch(self.ctx.world_size)
        self.loader = open_loader(
            cfg.data.loader, cfg.data.shards, rank=self.ctx.rank, world_size=self.ctx.world_size,
            batch_size=self.rank_batch, seed=cfg.optim.seed,
            channels=cfg.model.channels, resolution=cfg.model.resolution,
            num_workers=cfg.data.num_workers, shuffle_buffer=cfg.data.shuffle_buffer, device=self.ctx.device,
            device_memory_gib=cfg.data.device_memory_gib)
        if self.loader.steps_per_epoch(0) == 0:
            raise ShardSetError(f"{cfg.data.shards} holds {self.loader.manifest.total} samples: fewer than one "
                                f"batch of {self.rank_batch} per rank")
        self.engines: GanEngines = build_engines(*self._networks(), cfg, self.ctx.world_size, self.precision)
        # on the training device: z costs no host work and no copy
        self.noise = torch.Generator(self.ctx.device).manual_seed(cfg.optim.seed * 100_003 + 1 + self.ctx.rank)
        self.rank_state = RankState(self.noise, self.engines)
        self.fixed_z = sample_z(64, cfg.model, torch.Generator().manual_seed(cfg.optim.seed), self.ctx.device)
        self.checkpointer = checkpointer or Checkpointer(self.run_dir / CHECKPOINTS, self.ctx,
                                                         cfg.checkpoint.keep_last, cfg.to_dict())
        self.step_hooks: list[StepHook] = []
        self.metrics = NoMetrics()  # served while fit() runs
        self.state = TrainState()
        self.quality: QualityProbe | None = None
        if cfg.eval.fid_every and self.ctx.is_main:
            from trainer.quality import QualityProbe  # scipy and InceptionV3: the `eval` extra, only when asked for

            self.quality = QualityProbe(cfg, self.ctx.device)
        self.pending_quality: dict[str, float] = {}  # joins the next metrics.jsonl record
        self.step_fn = GanStep(self.engines, self.precision, cfg.model, self.ctx, self.noise,
                               cfg.checkpoint.on_nonfinite)
        if cfg.model.compile:
            from trainer.compiled import compile_step

            compile_step(self.step_fn, self.engines, self.ctx.device)
        # torch's global RNG: the step draws nothing from it, but it is checkpointed and start-up
        # draws from it a varying number of times; seeded last, it is a function of the seed alone
        torch.manual_seed(cfg.optim.seed * 100_003 + 2 + self.ctx.rank)

    def _networks(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """G and D from the seed, on the device, with the BatchNorm and fused blocks the config asks for."""
        cfg = self.cfg
        generator, discriminator = build_models(cfg.model, cfg.optim.seed)
        if reason := fused_kernels_unavailable(cfg.model, self.ctx.device, cfg.precision.zero_stage):
            generator.fused_kernels = False
            if self.ctx.is_main:
                print(f"note: model.fused_kernels: {reason}; G's blocks run in PyTorch", flush=True)
        nets = generator.to(self.ctx.device), discriminator.to(self.ctx.device)
        if cfg.model.sync_batchnorm and self.ctx.world_size > 1:
            nets = tuple(synchronise_batchnorm(net, self.ctx.device) for net in nets)
        return nets

    @property
    def total_steps(self) -> int:
        if self.cfg.optim.max_steps:
            return self.cfg.optim.max_steps
        return sum(self.loader.steps_per_epoch(e) for e in range(self.cfg.optim.epochs))

    def resume(self, path: str | Path) -> None:
        self.state, rank_state = self.checkpointer.load(path, self.engines)
        self.state.restarts += 1
        self.rank_state.load_state_dict(rank_state)

    def save_checkpoint(self) -> None:
        self.step_fn.raise_if_nonfinite()  # a bad step never reaches a checkpoint
        if self.checkpointer.last_saved_step != self.state.step:
            started = time.perf_counter()
            self._sync_batchnorm()
            self.checkpointer.save(self.state, self.engines, self.rank_state.state_dict())
            self.metrics.on_checkpoint(time.perf_counter() - started)

    def save_samples(self) -> None:
        self.step_fn.raise_if_nonfinite()
        self._sync_batchnorm()
        if self.ctx.is_main:
            images = generate(self.engines.generator.module, self.fixed_z)
            save_grid(images, self.run_dir / "samples" / f"step-{self.state.step:08d}.png", nrow=8)

    def measure_quality(self, log: MetricsLog) -> None:
        self._sync_batchnorm()
        if self.quality is not None:
            scores = self.quality.measure(self.engines.generator.module)
            self.pending_quality = scores
            self.metrics.on_quality(scores)
            log.message(f"step {self.state.step}: FID {scores['fid']:.2f}, KID {scores['kid']:.4f} "
                        f"({self.cfg.eval.fid_samples} samples, {scores['fid_seconds']:.0f} s)")

    def _sync_batchnorm(self) -> None:
        for _, engine in self.engines.items():
            average_batchnorm_stats(engine.module)

    def _count(self, stats: dict | None, waited: float, meter: StepMeter, log: MetricsLog) -> None:
        log.step()
        if stats is None:
            self.state.skipped_steps += 1
            self.metrics.on_skipped_step()
            log.message(f"step {self.state.step}: non-finite loss, step skipped")
        else:
            meter.add(stats, self.cfg.optim.batch_size, waited)

    def _log_window(self, meter: StepMeter, log: MetricsLog) -> None:
        self.step_fn.raise_if_nonfinite()  # the window's one read of the device, with the statistics
        state, summary = self.state, meter.summary()
        log.write({"step": state.step, "epoch": state.epoch, "time": time.time(), "precision": self.precision.name,
                   **summary, "skipped_samples": self.loader.skipped, **self.pending_quality})
        self.pending_quality = {}
        lrs = {tag[0]: float(engine.get_lr()[0]) for tag, engine in self.engines.items()}
        self.metrics.on_window(summary, state.step, state.epoch, state.restarts, self.loader.skipped, lrs,
                               self.rank_state.loss_scales())
        meter.reset()

    def _every(self, steps: int) -> bool:
        return bool(steps) and self.state.step % steps == 0

    def _after_step(self, stats: dict | None, waited: float, meter: StepMeter, log: MetricsLog) -> None:
        self._count(stats, waited, meter, log)
        if self._every(self.cfg.eval.fid_every):
            self.measure_quality(log)
        if self._every(self.cfg.logging.log_every) and meter.steps:
            self._log_window(meter, log)
        if self._every(self.cfg.logging.sample_every):
            self.save_samples()
        if self.checkpointer.due(self.state.step):
            self.save_checkpoint()
        for hook in self.step_hooks:
            hook(self)

    # --- the loop ----------------------------------------------------------------------------------
    def fit(self) -> TrainState:
        cfg, state, total = self.cfg, self.state, self.total_steps
        log = MetricsLog(self.run_dir / "metrics.jsonl", total, state.step, self.ctx.is_main, cfg.logging.progress)
        self.metrics = open_metrics(cfg.metrics, self.run_dir.name, self.ctx.rank, self.ctx.local_rank, self.run_dir)
        meter = StepMeter()
        try:
            if state.step == 0:
                self.save_samples()
            while state.step < total:
                ready = time.perf_counter()
                for images, _ in self.loader.batches(state.epoch, state.step_in_epoch):
                    started = time.perf_counter()
                    stats = self.step_fn(images, state.step + 1)
                    state.step += 1
                    state.step_in_epoch += 1
                    self.metrics.on_step(self.rank_batch, time.perf_counter() - started, started - ready)
                    self._after_step(stats, started - ready, meter, log)
                    if state.step >= total:
                        break
                    ready = time.perf_counter()
                else:
                    state.epoch += 1
                    state.step_in_epoch = 0
            self.save_samples()
            self.save_checkpoint()
        except NonFiniteLoss as e:
            last = self.checkpointer.last_saved_step
            where = f"step {last}" if last is not None else "none"
            raise NonFiniteLoss(f"{e}; stopped, last good checkpoint: {where}") from None
        finally:
            log.close()
            self.metrics.close()
            self.metrics = NoMetrics()
        barrier()
        return state
