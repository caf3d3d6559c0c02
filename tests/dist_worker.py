"""Run under torchrun by the tests: train with the real Trainer, then dump this rank's view of
G and D (parameters and buffers) so the test can compare ranks.

Also dumps, for each step at which BatchNorm statistics were averaged over the ranks, this rank's
own running statistics just before that averaging: each rank trains on its own shards, so these
differ between ranks, and the test checks that the checkpoint holds their mean.
"""

import sys
from pathlib import Path

import torch

from trainer import loop
from trainer.config import load_config
from trainer.loop import Trainer


def record_local_batchnorm_stats(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Wrap the loop's averaging so that each engine's local statistics are kept as "step/tag.buffer".

    Only the first averaging of a step is local: later ones in the same step (samples, then the
    checkpoint) see statistics already averaged.
    """
    local: dict[str, torch.Tensor] = {}
    average = loop.average_batchnorm_stats

    def recording(module: torch.nn.Module) -> None:
        tag = next(tag for tag, engine in trainer.engines.items() if engine.module is module)
        prefix = f"{trainer.state.step}/{tag}."
        if not any(key.startswith(prefix) for key in local):
            local.update({prefix + k: v.detach().clone() for k, v in module.state_dict().items()
                          if k.endswith(("running_mean", "running_var"))})
        average(module)

    loop.average_batchnorm_stats = recording
    return local


def main() -> None:
    out, config, *overrides = sys.argv[1:]
    resume = None
    if overrides and overrides[0].startswith("--resume="):
        resume = overrides.pop(0).removeprefix("--resume=")
    trainer = Trainer(load_config(config, overrides))
    local = record_local_batchnorm_stats(trainer)
    if resume:
        trainer.resume(resume)
    trainer.fit()
    state = {f"{tag}.{k}": v.detach().clone() for tag, e in trainer.engines.items()
             for k, v in e.module.state_dict().items()}
    torch.save(state, Path(out) / f"rank{trainer.ctx.rank}.pt")
    torch.save(local, Path(out) / f"local-bn-rank{trainer.ctx.rank}.pt")


if __name__ == "__main__":
    main()
