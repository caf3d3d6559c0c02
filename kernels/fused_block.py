"""y = ReLU(BatchNorm(conv_transpose2d(x, W))) as Triton kernels, forward and backward.

Training forward, three launches instead of PyTorch's conv + BN (stats, normalise) + ReLU passes:
  1. implicit-GEMM conv-transpose whose epilogue writes per-tile channel statistics,
  2. a per-channel finalize (mean, 1/std, running statistics, scale/shift),
  3. one normalise + ReLU pass.
Backward: the BN + ReLU gradient in two passes (channel sums, then the elementwise dy), then the
input and weight gradients as GEMMs. Inference (no grad, eval mode): BN folded into W and a bias,
one GEMM launch with a bias + ReLU epilogue.

Under autocast the GEMMs run in the autocast dtype with fp32 accumulation and fp32 statistics;
parameters, their gradients and the running statistics stay fp32, as with the PyTorch modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from kernels.bn_relu import (
    bn_finalize_kernel,
    bn_relu_apply_kernel,
    bn_relu_grad_apply_kernel,
    bn_relu_grad_reduce_kernel,
)
from kernels.convt_gemm import convt_input_grad_kernel, convt_phase_fwd_kernel, convt_weight_grad_kernel
from kernels.launch import dot_precision, elementwise_block, gemm_blocks, interpreting, launch
from kernels.reference import fold_batchnorm

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# the blocks' activations and gradients: channels-last, so GEMM tiles are contiguous along channels
NHWC = torch.channels_last
_INT32_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class Geometry:
    """A conv-transpose's shapes and its stride-phase decomposition."""

    n: int
    c_in: int
    h: int
    w: int
    c_out: int
    ksize: int
    stride: int
    padding: int

    @property
    def h_out(self) -> int:
        return (self.h - 1) * self.stride - 2 * self.padding + self.ksize

    @property
    def w_out(self) -> int:
        return (self.w - 1) * self.stride - 2 * self.padding + self.ksize

    @property
    def phase_stride(self) -> int:
        # from a 1x1 input every output pixel has exactly one tap: stride = kernel gives that
        # directly (one tap per phase) instead of masking out all but one of k*k taps
        if self.h == 1 and self.w == 1 and self.padding == 0:
            return self.ksize
        return self.stride

    @property
    def rows_per_phase(self) -> int:
        s = self.phase_stride
        return self.n * (self.h_out // s) * (self.w_out // s)


def unsupported_reason(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> str | None:
    """Why the fused kernels cannot run this block (None: they can)."""
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        return "needs 4-d input and a square kernel"
    geometry = _geometry(x, weight, stride, padding)
    s = geometry.phase_stride
    if geometry.ksize % s or geometry.h_out % s or geometry.w_out % s:
        return f"kernel {geometry.ksize}, stride {stride}, padding {padding} has no even stride-phase split"
    if x.dtype not in _SUPPORTED_DTYPES:
        return f"dtype {x.dtype}"
    if max(x.numel(), geometry.n * geometry.c_out * geometry.h_out * geometry.w_out) > _INT32_LIMIT:
        return "tensor too large for 32-bit offsets"
    return None


def _geometry(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> Geometry:
    return Geometry(x.shape[0], x.shape[1], x.shape[2], x.shape[3], weight.shape[1], weight.shape[2],
                    stride, padding)


def _conv_forward(x: torch.Tensor, w: torch.Tensor, g: Geometry, out_dtype: torch.dtype,
                  bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """The phase GEMM: (y, tile sums, tile M2, m_tiles, block_m); with `bias`, y = ReLU(conv + bias)."""
    s = g.phase_stride
    y = torch.empty(g.n, g.c_out, g.h_out, g.w_out, device=x.device, dtype=out_dtype, memory_format=NHWC)
    blocks = gemm_blocks(g.rows_per_phase, g.c_out, g.c_in)
    m_tiles = triton.cdiv(g.rows_per_phase, blocks.block_m)
    if bias is None:
        psum = torch.empty(s * s * m_tiles, g.c_out, device=x.device, dtype=torch.float32)
        pm2 = torch.empty_like(psum)
    else:
        psum = pm2 = bias
    grid = (m_tiles, triton.cdiv(g.c_out, blocks.block_n), s * s)
    launch(convt_phase_fwd_kernel, grid,
           [x, w, y, bias if bias is not None else psum, psum, pm2,
            g.n, g.c_in, g.h, g.w, g.c_out, g.h_out // s, g.w_out // s,
            *x.stride(), *w.stride(), *y.stride()],
           dict(STRIDE=s, PAD=g.padding, TAPS=g.ksize // s, BIAS_RELU=bias is not None,
                UPCAST=interpreting(), DOT_PRECISION=dot_precision(x.dtype), BLOCK_M=blocks.block_m,
                BLOCK_N=blocks.block_n, BLOCK_K=blocks.block_k),
           blocks.num_warps, blocks.num_stages)
    return y, psum, pm2, m_tiles, blocks.block_m


def _elementwise_grid(total: int) -> tuple[tuple[int], int]:
    block = elementwise_block(total)
    return (triton.cdiv(total, block),), block


def _gemm_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W (C_in, C_out, k, k) stored as (k, k, C_in, C_out): both GEMMs then read channel-contiguous tiles.
    The cast to the compute dtype copies W anyway, so the new layout costs nothing extra."""
    k = weight.shape[2]
    stored = torch.empty(k, k, weight.shape[0], weight.shape[1], device=weight.device, dtype=dtype)
    stored.copy_(weight.permute(2, 3, 0, 1))
    return stored.permute(2, 3, 0, 1)  # logical (C_in, C_out, k, k) again, addressed through strides


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _sm_count() -> int:
    # without a GPU (compile checks) assume an H100/H200's 132
    return torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 132


def _weight_grad_splits(programs: int, rows: int, block_k: int) -> int:
    """Split the weight gradient's long reduction (N*H*W) until the grid fills the GPU twice over."""
    if interpreting():
        return 1
    splits = triton.cdiv(2 * _sm_count(), programs)
    return max(1, min(splits, rows // (4 * block_k)))


class ConvTransposeBNReLU(torch.autograd.Function):
    """Training-mode block; parameters and buffers are the nn.ConvTranspose2d / nn.BatchNorm2d ones."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                running_mean: torch.Tensor | None, running_var: torch.Tensor | None, stride: int, padding: int,
                momentum: float, eps: float) -> torch.Tensor:
        dtype = _compute_dtype(x)
        xc, wc = x.to(dtype), _gemm_weight(weight, dtype)
        g = _geometry(xc, wc, stride, padding)
        y, psum, pm2, m_tiles, block_m = _conv_forward(xc, wc, g, dtype)

        mean = torch.empty(g.c_out, device=x.device, dtype=torch.float32)
        rstd, scale, shift = torch.empty_like(mean), torch.empty_like(mean), torch.empty_like(mean)
        update = running_mean is not None and running_var is not None
        s = g.phase_stride
        block_c = min(triton.next_power_of_2(g.c_out), 512 if interpreting() else 32)
        block_p = min(triton.next_power_of_2(s * s * m_tiles), 4096 if interpreting() else 64)
        launch(bn_finalize_kernel, (triton.cdiv(g.c_out, block_c),),
               [psum, pm2, gamma, beta, running_mean if update else mean, running_var if update else mean,
                mean, rstd, scale, shift, g.c_out, s * s, m_tiles, g.rows_per_phase, block_m,
                float(momentum), float(eps)],
               dict(UPDATE_RUNNING=update, BLOCK_P=block_p, BLOCK_C=block_c), 4, 1)

        out = torch.empty_like(y)
        grid, block = _elementwise_grid(y.numel())
        launch(bn_relu_apply_kernel, grid, [y, out, scale, shift, g.c_out, y.numel()],
               dict(BLOCK=block), 4, 1)
        ctx.save_for_backward(xc, wc, y, mean, rstd, scale, shift)
        ctx.geometry, ctx.input_dtype = g, x.dtype
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        xc, wc, y, mean, rstd, scale, shift = ctx.saved_tensors
        g: Geometry = ctx.geometry
        dout = dout.contiguous(memory_format=NHWC)
        rows = g.n * g.h_out * g.w_out

        # BN + ReLU: channel sums, in per-program partials summed here (deterministic)
        block_c = min(triton.next_power_of_2(g.c_out), 512 if interpreting() else 64)
        block_r = (1 << 16 if interpreting() else 4096) // block_c
        c_blocks = triton.cdiv(g.c_out, block_c)
        # enough row programs for ~4 per SM, never more than there are row blocks
        row_programs = 1 if interpreting() else min(triton.cdiv(rows, block_r), triton.cdiv(4 * _sm_count(), c_blocks))
        rows_per_program = triton.cdiv(triton.cdiv(rows, row_programs), block_r) * block_r
        row_programs = triton.cdiv(rows, rows_per_program)
        dbeta_parts = torch.empty(row_programs, g.c_out, device=y.device, dtype=torch.float32)
        dgamma_parts = torch.empty_like(dbeta_parts)
        launch(bn_relu_grad_reduce_kernel, (row_programs, c_blocks),
               [y, dout, mean, rstd, scale, shift, dbeta_parts, dgamma_parts, rows, g.c_out, rows_per_program],
               dict(BLOCK_R=block_r, BLOCK_C=block_c), 4, 1)
        dbeta, dgamma = dbeta_parts.sum(0), dgamma_parts.sum(0)

        dy = torch.empty_like(y)
        grid, block = _elementwise_grid(y.numel())
        launch(bn_relu_grad_apply_kernel, grid,
               [y, dout, dy, mean, rstd, scale, shift, dbeta, dgamma, g.c_out, y.numel(), 1.0 / rows],
               dict(BLOCK=block), 4, 1)

        common = dict(STRIDE=g.stride, PAD=g.padding, KSIZE=g.ksize, UPCAST=interpreting(),
                      DOT_PRECISION=dot_precision(dy.dtype))
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty(g.n, g.c_in, g.h, g.w, device=y.device, dtype=ctx.input_dtype, memory_format=NHWC)
            blocks = gemm_blocks(g.n * g.h * g.w, g.c_in, g.c_out)
            launch(convt_input_grad_kernel,
                   (triton.cdiv(g.n * g.h * g.w, blocks.block_m), triton.cdiv(g.c_in, blocks.block_n)),
                   [dy, wc, dx, g.n, g.c_in, g.h, g.w, g.c_out, g.h_out, g.w_out,
                    *dy.stride(), *wc.stride(), *dx.stride()],
                   dict(common, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_K=blocks.block_k),
                   blocks.num_warps, blocks.num_stages)
        dw = None
        if ctx.needs_input_grad[1]:
            in_rows = g.n * g.h * g.w
            blocks = gemm_blocks(g.c_in, g.c_out, in_rows)
            programs = triton.cdiv(g.c_in, blocks.block_m) * triton.cdiv(g.c_out, blocks.block_n) * g.ksize ** 2
            splits = _weight_grad_splits(programs, in_rows, blocks.block_k)
            rows_per_split = triton.cdiv(triton.cdiv(in_rows, splits), blocks.block_k) * blocks.block_k
            splits = triton.cdiv(in_rows, rows_per_split)
            parts = torch.empty(splits, g.c_in, g.c_out, g.ksize, g.ksize, device=y.device, dtype=torch.float32)
            launch(convt_weight_grad_kernel,
                   (triton.cdiv(g.c_in, blocks.block_m), triton.cdiv(g.c_out, blocks.block_n),
                    g.ksize * g.ksize * splits),
                   [xc, dy, parts, g.n, g.c_in, g.h, g.w, g.c_out, g.h_out, g.w_out, rows_per_split,
                    *xc.stride(), *dy.stride()],
                   dict(common, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_K=blocks.block_k),
                   blocks.num_warps, blocks.num_stages)
            dw = parts[0] if splits == 1 else parts.sum(0)
        return dx, dw, dgamma, dbeta, None, None, None, None, None, None


def conv_transpose_bn_relu_train(x: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                                 running_mean: torch.Tensor | None, running_var: torch.Tensor | None, *,
                                 stride: int, padding: int, momentum: float, eps: float) -> torch.Tensor:
    return ConvTransposeBNReLU.apply(x, weight, gamma, beta, running_mean, running_var, stride, padding,
                                     momentum, eps)


@torch.no_grad()
def conv_transpose_bn_relu_inference(x: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor,
                                     beta: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, *,
                                     stride: int, padding: int, eps: float) -> torch.Tensor:
    """Eval-mode block: BatchNorm's running statistics folded into W and a bias, one GEMM launch."""
    dtype = _compute_dtype(x)
    folded, bias = fold_batchnorm(weight.float(), gamma.float(), beta.float(), running_mean, running_var, eps)
    xc, wc = x.to(dtype), _gemm_weight(folded, dtype)
    g = _geometry(xc, wc, stride, padding)
    return _conv_forward(xc, wc, g, dtype, bias=bias.contiguous())[0]
