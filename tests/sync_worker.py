"""Run in a fresh process by tests/test_host_sync.py: train with the real Trainer while counting
every call that makes the host wait for the device, and print the count after each step as JSON.

Counted: Tensor.item / __bool__ / __float__ / __int__ / tolist / cpu, and the accelerator's
synchronize (DeepSpeed's and torch's). On a CPU none of these waits, but each would on a GPU,
so counting them here shows what a step would cost there. Not counted: torch.optim's reads of
its own step counters and the DataLoader's seed, tensors that live on the host and wait for nothing.
"""

import collections
import json
import sys
import traceback

import torch

from trainer.config import load_config
from trainer.loop import Trainer

CALLS: collections.Counter = collections.Counter()
WHERE: dict[str, str] = {}


def _counting(owner: object, name: str) -> None:
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        caller = sys._getframe(1).f_code.co_filename
        if "/torch/optim/" not in caller and "/torch/utils/data/" not in caller:
            CALLS[name] += 1
            WHERE.setdefault(name, "".join(traceback.format_stack(limit=6)[:-1]))
        return original(*args, **kwargs)

    setattr(owner, name, counted)


def main() -> None:
    config, *overrides = sys.argv[1:]
    for name in ("item", "__bool__", "__float__", "__int__", "tolist", "cpu"):
        _counting(torch.Tensor, name)
    trainer = Trainer(load_config(config, overrides))
    from deepspeed.accelerator import get_accelerator

    _counting(get_accelerator(), "synchronize")
    import deepspeed.runtime.engine as ds_engine

    clipped = []  # the paper clips no gradients; DeepSpeed would, by default
    clip = ds_engine.clip_grad_norm_
    ds_engine.clip_grad_norm_ = lambda *a, **k: clipped.append(1) or clip(*a, **k)
    reduced = []  # one rank has nothing to all-reduce; DeepSpeed would flatten and copy every gradient anyway
    reduce = ds_engine.DeepSpeedEngine.allreduce_gradients
    ds_engine.DeepSpeedEngine.allreduce_gradients = lambda *a, **k: reduced.append(1) or reduce(*a, **k)
    _counting(torch.cpu, "synchronize")
    _counting(torch.cuda, "synchronize")
    per_step: list[int] = []
    trainer.step_hooks.append(lambda t: per_step.append(sum(CALLS.values())))
    trainer.fit()
    print(json.dumps({"cumulative": per_step, "calls": dict(CALLS), "where": WHERE, "clipped": len(clipped),
                      "allreduced": len(reduced)}))


if __name__ == "__main__":
    main()
