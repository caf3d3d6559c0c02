"""BatchNorm folded into a conv-transpose for inference: the fused block's eval-mode weights, in plain PyTorch."""

from __future__ import annotations

import torch


def fold_batchnorm(weight: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, running_mean: torch.Tensor,
                   running_var: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference BN folded into the conv-transpose: per output channel, W' = W * s and b = beta - mean * s.

    A conv-transpose weight is (C_in, C_out, kH, kW), so the output channel is dimension 1.
    """
    scale = gamma / torch.sqrt(running_var + eps)
    return weight * scale.view(1, -1, 1, 1), beta - running_mean * scale
