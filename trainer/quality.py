"""FID and KID of the generator while it trains: the reference side is computed (or read from the
shard set's cache) once, then each measurement generates `fid_samples` images from a fixed z."""

from __future__ import annotations

import time

import torch

from evaluation.fid import InceptionFeatures, SetStats, check_kid_size, compare, generated_stats, reference_stats
from trainer.config import Config
from trainer.models import sample_z


class QualityProbe:
    def __init__(self, cfg: Config, device: torch.device):
        self.cfg, self.device = cfg, device
        self.n = cfg.eval.fid_samples
        self.shards = cfg.eval.fid_reference or cfg.data.shards
        check_kid_size(self.n, self.n)
        # drawn on the CPU from the run's seed: the same z at every measurement, on any machine
        self.z = sample_z(self.n, cfg.model, torch.Generator().manual_seed(cfg.optim.seed))
        self._extractor: InceptionFeatures | None = None
        self._reference: SetStats | None = None

    def _prepare(self) -> None:
        # loaded on first use, so a run that never reaches fid_every pays nothing
        self._extractor = InceptionFeatures(device=self.device)
        self._reference, _, _ = reference_stats(self.shards, self.n, self._extractor, self.cfg.model.resolution,
                                                self.cfg.model.channels, log=lambda _: None)

    def measure(self, generator: torch.nn.Module) -> dict[str, float]:
        """fid, kid, kid_std and the seconds it took, for `fid_samples` samples of `generator`."""
        started = time.perf_counter()
        if self._extractor is None:
            self._prepare()
        generated = generated_stats(generator, self.z, self._extractor, seed=self.cfg.optim.seed, log=lambda _: None)
        scores = compare(self._reference, generated, kid_subset_size=self.n, seed=self.cfg.optim.seed)
        return {**scores, "fid_seconds": time.perf_counter() - started}
