"""Run under torchrun by the tests: train with the real Trainer, then dump this rank's view of
G and D (parameters and buffers) so the test can compare ranks."""

import sys
from pathlib import Path

import torch

from trainer.config import load_config
from trainer.loop import Trainer


def main() -> None:
    out, config, *overrides = sys.argv[1:]
    resume = None
    if overrides and overrides[0].startswith("--resume="):
        resume = overrides.pop(0).removeprefix("--resume=")
    trainer = Trainer(load_config(config, overrides))
    if resume:
        trainer.resume(resume)
    trainer.fit()
    state = {f"{tag}.{k}": v.detach().clone() for tag, e in trainer.engines.items()
             for k, v in e.module.state_dict().items()}
    torch.save(state, Path(out) / f"rank{trainer.ctx.rank}.pt")


if __name__ == "__main__":
    main()
