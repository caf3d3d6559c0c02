"""Pick the fused Triton block or the PyTorch one for a ConvTranspose2d -> BatchNorm2d -> ReLU block."""

from __future__ import annotations

import functools

import torch
from torch import nn


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def fused_available(device: torch.device) -> str | None:
    """None where the fused kernels can run on `device`, else the reason they cannot."""
    if not triton_importable():
        return "Triton is not installed"
    from kernels.launch import compiling, interpreting  # triton only when asked for

    if device.type == "cuda" or (device.type == "cpu" and interpreting()) or compiling():
        return None
    return f"no CUDA device (Triton runs on CUDA; on {device.type} only through TRITON_INTERPRET=1)"


def block_unsupported(x: torch.Tensor, conv: nn.ConvTranspose2d, bn: nn.BatchNorm2d) -> str | None:
    """Why this block must run in PyTorch (None: the fused kernels handle it)."""
    if reason := fused_available(x.device):
        return reason
    if conv.bias is not None or conv.groups != 1 or conv.dilation != (1, 1) or conv.output_padding != (0, 0):
        return "conv-transpose with bias, groups, dilation or output padding"
    if conv.stride[0] != conv.stride[1] or conv.padding[0] != conv.padding[1]:
        return "non-square stride or padding"
    if not bn.affine or (bn.training and bn.track_running_stats and bn.momentum is None):
        return "BatchNorm without affine parameters or with a cumulative moving average"
    if bn.running_mean is not None and bn.running_mean.dtype != torch.float32:
        return "BatchNorm statistics not in fp32"
    from kernels.fused_block import unsupported_reason

    return unsupported_reason(x, conv.weight, conv.stride[0], conv.padding[0])


def conv_transpose_bn_relu(x: torch.Tensor, conv: nn.ConvTranspose2d, bn: nn.BatchNorm2d, fused: bool = True
                           ) -> torch.Tensor:
    """ReLU(bn(conv(x))) with the modules' own parameters and buffers, fused where possible.

    Train mode updates bn's running statistics (and num_batches_tracked) as the modules do; eval mode
    uses them. Whatever the kernels do not cover runs through the modules themselves.
    """
    if not fused or block_unsupported(x, conv, bn) is not None:
        return torch.relu(bn(conv(x)))
    # eval-mode gradients (rare: e.g. optimising z against a target) go through PyTorch's autograd
    if not bn.training and bn.track_running_stats and torch.is_grad_enabled() and (
            x.requires_grad or conv.weight.requires_grad):
        return torch.relu(bn(conv(x)))

    from kernels.fused_block import conv_transpose_bn_relu_inference, conv_transpose_bn_relu_train

    stride, padding = conv.stride[0], conv.padding[0]
    if not bn.training and bn.track_running_stats:
        return conv_transpose_bn_relu_inference(x, conv.weight, bn.weight, bn.bias, bn.running_mean,
                                                bn.running_var, stride=stride, padding=padding, eps=bn.eps)
    update = bn.training and bn.track_running_stats
    if update:
        bn.num_batches_tracked.add_(1)
    return conv_transpose_bn_relu_train(
        x, conv.weight, bn.weight, bn.bias, bn.running_mean if update else None,
        bn.running_var if update else None, stride=stride, padding=padding,
        momentum=0.0 if bn.momentum is None else float(bn.momentum), eps=bn.eps)
