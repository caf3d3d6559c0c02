"""BatchNorm over the global batch (`model.sync_batchnorm = true`).

Each rank normalises with its own batch's statistics by default: with the LSUN preset's global
batch of 128 on 8 GPUs, BatchNorm sees 16 images, not the paper's 128. Synchronised BatchNorm
sums each channel's count, sum and sum of squares over the ranks before normalising, so every
rank normalises with the statistics of the whole global batch, and the running statistics are
the same on every rank.

On CUDA this is torch's SyncBatchNorm (NCCL). torch's has no CPU path, so on gloo each
BatchNorm2d becomes a GlobalBatchNorm2d: the same parameters, buffers and state_dict keys (so
checkpoints move between the two settings), whose statistics go through one autograd-aware
all-reduce of 2C + 1 numbers per layer; its backward all-reduces the statistics' gradients, as
SyncBatchNorm's does, so each rank's gradient is that of the global batch's loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training-mode statistics are those of every rank's batch together."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        channels = x.shape[1]
        xf = x.float()  # sums in fp32 whatever the compute dtype: E[x^2] - E[x]^2 needs the precision
        local = torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)),
                           xf.new_full((1,), x.numel() / channels)])
        total = dist_nn.all_reduce(local)  # SUM, and its backward sums the gradients over the ranks
        count = total[-1]
        mean = total[:channels] / count
        var = (total[channels:2 * channels] / count - mean * mean).clamp_min(0)
        self._track(mean.detach(), var.detach() * count.detach() / (count.detach() - 1))
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.affine:
            scale, shift = scale * self.weight, shift * self.weight + self.bias
        return (xf * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(x.dtype)

    @torch.no_grad()
    def _track(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        if not self.track_running_stats:
            return
        self.num_batches_tracked += 1
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean, momentum)
        self.running_var.lerp_(unbiased_var, momentum)


def synchronise_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` with every BatchNorm2d normalising over the global batch (in place where possible).

    CUDA: torch's SyncBatchNorm (a new module tree with the same parameters and buffers). Elsewhere:
    each BatchNorm2d's class becomes GlobalBatchNorm2d, which keeps its tensors and keys as they are.
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = GlobalBatchNorm2d
    return module
