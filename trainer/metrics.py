"""What the loop reports: a window of step statistics, a JSONL log, a progress bar."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm


class StepMeter:
    """Accumulates per-step values on their device and reads them only when a window closes,
    so a log every N steps costs one host sync, not one per value per step."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.images = 0
        self.data_wait = 0.0
        self.started = time.perf_counter()

    def add(self, values: dict[str, torch.Tensor], images: int, data_wait: float) -> None:
        for k, v in values.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.steps += 1
        self.images += images
        self.data_wait += data_wait

    def summary(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        # one read of the device for all the window's values, not one per value
        means = (torch.stack(list(self.sums.values())) / max(self.steps, 1)).tolist() if self.sums else []
        out = dict(zip(self.sums, means, strict=True))
        out.update(img_per_s=self.images / elapsed, data_wait_s=self.data_wait,
                   step_time_s=elapsed / max(self.steps, 1))
        return out


LINE_EVERY_S = 10.0  # progress lines, when not on a terminal: at most one per this many seconds


class MetricsLog:
    """metrics.jsonl (one JSON object per line) and progress; a no-op off rank 0.

    Progress is a bar on a terminal and one line per log record otherwise (a launcher's
    captured output, a log file), where a bar's carriage returns would be noise.
    """

    def __init__(self, path: Path, total_steps: int, start_step: int, enabled: bool, progress: bool):
        self.enabled = enabled
        self.total_steps = total_steps
        self._file = open(path, "a") if enabled else None
        self._lines = enabled and progress and not sys.stderr.isatty()
        self._last_line = 0.0
        self._bar = tqdm(total=total_steps, initial=start_step, disable=not (enabled and progress) or self._lines,
                         unit="step", dynamic_ncols=True, smoothing=0.1)

    def step(self) -> None:
        self._bar.update(1)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._lines and time.monotonic() - self._last_line >= LINE_EVERY_S:
            self._last_line = time.monotonic()
            print(f"step {record['step']}/{self.total_steps} epoch {record['epoch']}: "
                  f"{record['img_per_s']:.0f} img/s, loss_d {record['loss_d']:.3f}, loss_g {record['loss_g']:.3f}",
                  flush=True)
        self._bar.set_postfix(img_s=f"{record['img_per_s']:.0f}", loss_d=f"{record['loss_d']:.3f}",
                              loss_g=f"{record['loss_g']:.3f}", refresh=False)

    def message(self, text: str) -> None:
        if self.enabled:
            self._bar.write(text)

    def close(self) -> None:
        self._bar.close()
        if self._file:
            self._file.close()
