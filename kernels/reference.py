"""The generator block in plain PyTorch: what the fused kernels must reproduce, and the fallback."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def conv_transpose_bn_relu_reference(x: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor,
                                     beta: torch.Tensor, running_mean: torch.Tensor | None,
                                     running_var: torch.Tensor | None, *, stride: int, padding: int,
                                     training: bool, momentum: float | None, eps: float) -> torch.Tensor:
    """ReLU(BatchNorm(conv_transpose2d(x, weight))), as nn.ConvTranspose2d -> nn.BatchNorm2d -> nn.ReLU."""
    y = F.conv_transpose2d(x, weight, stride=stride, padding=padding)
    y = F.batch_norm(y, running_mean, running_var, gamma, beta, training, momentum or 0.0, eps)
    return F.relu(y)


def fold_batchnorm(weight: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, running_mean: torch.Tensor,
                   running_var: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference BN folded into the conv-transpose: per output channel, W' = W * s and b = beta - mean * s.

    A conv-transpose weight is (C_in, C_out, kH, kW), so the output channel is dimension 1.
    """
    scale = gamma / torch.sqrt(running_var + eps)
    return weight * scale.view(1, -1, 1, 1), beta - running_mean * scale
