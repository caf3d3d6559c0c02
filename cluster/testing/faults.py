"""Test-only fault injection: a worker process that dies at a chosen step, once per run.

Set DCGAN_FAIL_AT_STEP=N (and DCGAN_FAIL_RANK=R, default 0) in the environment of `dcgan
train`; rank R then calls os._exit at step N, as a crashed or OOM-killed worker would: no
exception, no cleanup. A marker file in the run folder keeps the restarted workers, which pass
step N again, from dying twice. DCGAN_FAIL_DELAY_S holds the dying rank that long first: Ray
registers a reported checkpoint when it next polls the workers (every 2 s), so tiny test steps
would otherwise crash before the previous checkpoint counts.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

FAIL_AT_STEP = "DCGAN_FAIL_AT_STEP"
FAIL_RANK = "DCGAN_FAIL_RANK"
FAIL_DELAY_S = "DCGAN_FAIL_DELAY_S"


@dataclass(frozen=True)
class InjectedFault:
    step: int
    rank: int
    delay_s: float = 0.0

    @classmethod
    def from_env(cls) -> InjectedFault | None:
        if not os.environ.get(FAIL_AT_STEP):
            return None
        return cls(int(os.environ[FAIL_AT_STEP]), int(os.environ.get(FAIL_RANK, "0")),
                   float(os.environ.get(FAIL_DELAY_S, "0")))

    def hook(self, run_dir: str | Path):
        marker = Path(run_dir) / f".injected-fault-step-{self.step}-rank-{self.rank}"

        def maybe_die(trainer) -> None:
            if trainer.state.step == self.step and trainer.ctx.rank == self.rank and not marker.exists():
                marker.touch()
                time.sleep(self.delay_s)
                print(f"injected fault: rank {self.rank} exits at step {self.step}", flush=True)
                os._exit(17)

        return maybe_die
