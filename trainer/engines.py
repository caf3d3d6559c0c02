"""One DeepSpeed engine per network, each with a config of its own.

A shared config would leak between the nets (DeepSpeed#1975: a scheduler in it applies to
both), so G and D each get theirs. The optimiser is torch.optim.Adam ("torch_adam") with
adam_w_mode off: DeepSpeed's "Adam" otherwise silently means AdamW, and its FusedAdam
JIT-compiles for minutes and does not resume bit-exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.checkpoint_io import install_safe_loading
from trainer.config import Config
from trainer.precision import Precision


def engine_config(cfg: Config, world_size: int, precision: Precision) -> dict:
    micro = cfg.optim.rank_batch(world_size)
    return {
        "train_batch_size": cfg.optim.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "optimizer": {
            "type": "Adam",
            "params": {"lr": cfg.optim.lr, "betas": [cfg.optim.beta1, cfg.optim.beta2], "eps": 1e-8,
                       "weight_decay": 0.0, "torch_adam": True, "adam_w_mode": False},
        },
        "zero_optimization": {"stage": cfg.precision.zero_stage},
        # the paper clips nothing; DeepSpeed's default is 1.0, which would clip every fp32 step
        "gradient_clipping": 0.0,
        "steps_per_print": 2**31 - 1,
        # DeepSpeed's throughput timer synchronises the device at every forward and step() to time
        # them; the loop measures throughput itself, once per log window
        "timers": {"throughput": {"enabled": False}},
        **precision.deepspeed_section(),
    }


@dataclass
class GanEngines:
    generator: torch.nn.Module  # DeepSpeedEngine wrapping G
    discriminator: torch.nn.Module  # DeepSpeedEngine wrapping D

    def items(self) -> list[tuple[str, torch.nn.Module]]:
        return [("generator", self.generator), ("discriminator", self.discriminator)]


def build_engines(generator: torch.nn.Module, discriminator: torch.nn.Module, cfg: Config, world_size: int,
                  precision: Precision) -> GanEngines:
    import deepspeed

    engines = []
    for module in (generator, discriminator):
        engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(),
                                          config=engine_config(cfg, world_size, precision))
        install_safe_loading(engine)
        if world_size == 1 and cfg.precision.zero_stage == 0:
            # an all-reduce over one rank changes nothing, yet DeepSpeed would still flatten every
            # gradient, cast it to the communication dtype, and copy it back each step (0.6-0.8 ms of
            # host time at 32x32); ZeRO 1/2 keep theirs, which also moves gradients into partitions
            engine.enable_backward_allreduce = False
        if cfg.precision.zero_stage == 0:
            # channels_last weights keep every convolution and BatchNorm in NHWC, the layout cuDNN
            # and oneDNN run fastest and the fused blocks write. Only now: DeepSpeed's start-up
            # broadcast views each parameter as bytes, which needs NCHW strides, and ZeRO 1/2 make
            # the parameters views of flat buffers (there the channels_last input still makes D NHWC)
            module.to(memory_format=torch.channels_last)
        engines.append(engine)
    return GanEngines(*engines)
