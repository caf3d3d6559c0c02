"""Training-mode BatchNorm + ReLU around the conv-transpose GEMM, in Triton.

Forward: `bn_finalize_kernel` merges the GEMM epilogue's per-tile statistics into each channel's
mean and 1/std, updates the running statistics and precomputes scale = gamma/std and
shift = beta - mean*scale, so `bn_relu_apply_kernel` is one fused multiply-add and max per element.
Backward, the standard BN gradient through the ReLU mask:
    dz = dout * (scale*y + shift > 0)
    dbeta = sum(dz), dgamma = sum(dz * xhat), xhat = (y - mean) / std
    dy = scale * (dz - dbeta/M - xhat * dgamma/M)
`bn_relu_grad_reduce_kernel` computes the two sums (per-program partials, summed by the caller:
deterministic), `bn_relu_grad_apply_kernel` the elementwise dy the backward GEMMs read.
The activations are channels-last (NHWC): the GEMMs then store and load whole channel rows, and
these kernels see an (N*H*W) x C matrix: the elementwise ones read it flat (channel = offset mod C),
the reduction walks row blocks x channel blocks, full tiles whatever the image size.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def bn_finalize_kernel(
    psum_ptr, pm2_ptr, gamma_ptr, beta_ptr, running_mean_ptr, running_var_ptr,
    mean_ptr, rstd_ptr, scale_ptr, shift_ptr,
    C, PHASES, M_TILES, ROWS_PER_PHASE, TILE_ROWS, momentum, eps,
    UPDATE_RUNNING: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Merge the GEMM tiles' (sum, M2) into each channel's mean and variance: chunks of BLOCK_P tiles
    at once (a 2-d load, coalesced along channels), each chunk folded into the running result with
    Chan's pairwise formula, so thousands of tiles cost tens of iterations."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    parts = PHASES * M_TILES
    count = 0.0
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for p0 in range(0, parts, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_ok = p < parts
        tile = p % M_TILES
        tile_count = tl.where(p_ok, tl.minimum(ROWS_PER_PHASE - tile * TILE_ROWS, TILE_ROWS), 0).to(tl.float32)
        ok = p_ok[:, None] & c_ok[None, :]
        offs = p[:, None] * C + c[None, :]
        tile_sum = tl.load(psum_ptr + offs, mask=ok, other=0.0)
        tile_m2 = tl.load(pm2_ptr + offs, mask=ok, other=0.0)
        chunk_count = tl.sum(tile_count, axis=0)
        chunk_mean = tl.sum(tile_sum, axis=0) / chunk_count
        tile_mean = tile_sum / tl.maximum(tile_count, 1.0)[:, None]
        spread = tl.where(ok, tile_mean - chunk_mean[None, :], 0.0)
        chunk_m2 = tl.sum(tile_m2 + tile_count[:, None] * spread * spread, axis=0)
        merged = count + chunk_count
        delta = chunk_mean - mean
        mean += delta * (chunk_count / merged)
        m2 += chunk_m2 + delta * delta * (count * chunk_count / merged)
        count = merged
    var = m2 / count
    rstd = 1.0 / tl.sqrt(var + eps)
    gamma = tl.load(gamma_ptr + c, mask=c_ok, other=1.0).to(tl.float32)
    beta = tl.load(beta_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    scale = gamma * rstd
    tl.store(mean_ptr + c, mean, mask=c_ok)
    tl.store(rstd_ptr + c, rstd, mask=c_ok)
    tl.store(scale_ptr + c, scale, mask=c_ok)
    tl.store(shift_ptr + c, beta - mean * scale, mask=c_ok)
    if UPDATE_RUNNING:
        # running_var takes the unbiased variance, as nn.BatchNorm2d does
        unbiased = m2 / tl.maximum(count - 1.0, 1.0)
        rm = tl.load(running_mean_ptr + c, mask=c_ok, other=0.0)
        rv = tl.load(running_var_ptr + c, mask=c_ok, other=1.0)
        tl.store(running_mean_ptr + c, (1.0 - momentum) * rm + momentum * mean, mask=c_ok)
        tl.store(running_var_ptr + c, (1.0 - momentum) * rv + momentum * unbiased, mask=c_ok)


@triton.jit
def bn_relu_apply_kernel(y_ptr, out_ptr, scale_ptr, shift_ptr, C, TOTAL, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < TOTAL
    c = offs % C
    scale = tl.load(scale_ptr + c, mask=ok, other=0.0)
    shift = tl.load(shift_ptr + c, mask=ok, other=0.0)
    y = tl.load(y_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    out = tl.maximum(y * scale + shift, 0.0)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def bn_relu_grad_reduce_kernel(y_ptr, dout_ptr, mean_ptr, rstd_ptr, scale_ptr, shift_ptr, dbeta_ptr, dgamma_ptr,
                               ROWS, C, ROWS_PER_PROGRAM, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-channel partial sums of dz and dz*xhat over rows (pixels) [j*ROWS_PER_PROGRAM, ...), written to
    [j, c] of the (programs along rows) x C partial buffers."""
    j = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0)[None, :]
    rstd = tl.load(rstd_ptr + c, mask=c_ok, other=0.0)[None, :]
    scale = tl.load(scale_ptr + c, mask=c_ok, other=0.0)[None, :]
    shift = tl.load(shift_ptr + c, mask=c_ok, other=0.0)[None, :]
    sum_dz = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    sum_dz_xhat = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    r_end = tl.minimum((j + 1) * ROWS_PER_PROGRAM, ROWS)
    for r0 in range(j * ROWS_PER_PROGRAM, r_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        ok = (r < r_end)[:, None] & c_ok[None, :]
        offs = r.to(tl.int64)[:, None] * C + c[None, :]
        y = tl.load(y_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(dout_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        dz = tl.where(ok & (y * scale + shift > 0.0), g, 0.0)
        sum_dz += dz
        sum_dz_xhat += dz * (y - mean) * rstd
    tl.store(dbeta_ptr + j * C + c, tl.sum(sum_dz, axis=0), mask=c_ok)
    tl.store(dgamma_ptr + j * C + c, tl.sum(sum_dz_xhat, axis=0), mask=c_ok)


@triton.jit
def bn_relu_grad_apply_kernel(y_ptr, dout_ptr, dy_ptr, mean_ptr, rstd_ptr, scale_ptr, shift_ptr, dbeta_ptr,
                              dgamma_ptr, C, TOTAL, inv_count, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < TOTAL
    c = offs % C
    mean = tl.load(mean_ptr + c, mask=ok, other=0.0)
    rstd = tl.load(rstd_ptr + c, mask=ok, other=0.0)
    scale = tl.load(scale_ptr + c, mask=ok, other=0.0)
    shift = tl.load(shift_ptr + c, mask=ok, other=0.0)
    dbeta_mean = tl.load(dbeta_ptr + c, mask=ok, other=0.0) * inv_count
    dgamma_mean = tl.load(dgamma_ptr + c, mask=ok, other=0.0) * inv_count
    y = tl.load(y_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(dout_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    dz = tl.where(y * scale + shift > 0.0, g, 0.0)
    dy = scale * (dz - dbeta_mean - (y - mean) * rstd * dgamma_mean)
    tl.store(dy_ptr + offs, dy.to(dy_ptr.dtype.element_ty), mask=ok)
