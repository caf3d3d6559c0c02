"""Transposed convolution as implicit GEMM in Triton: forward (with BatchNorm statistics or a folded
bias + ReLU in the epilogue), and the two backward GEMMs (input and weight gradients).

Forward, decomposed by stride phase (as FlagGems does): an output pixel (oy, ox) only receives
kernel taps ky = (oy + pad) mod stride + t * stride, so the outputs of one phase (oy mod s, ox mod s)
form a dense GEMM with M = N * (H_out / s) * (W_out / s) rows, C_out columns and
K = C_in * (k / s)^2, with no multiply wasted on the zeros a naive "dilate then convolve" adds.
A projection from a 1x1 input (z -> 4x4) is the same GEMM with stride = kernel size.

Tensors are addressed through strides, so NCHW and channels-last both work.
The GEMMs accumulate in fp32 whatever the input dtype. `UPCAST` converts the operand tiles to fp32
before tl.dot: Triton's CPU interpreter computes bf16 tl.dot wrongly otherwise.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _pixels(rows, H, W):
    """GEMM row indices -> (image, y, x) of a batch of H x W images."""
    p = rows % (H * W)
    return rows // (H * W), p // W, p % W


@triton.jit
def convt_phase_fwd_kernel(
    x_ptr, w_ptr, y_ptr, bias_ptr, psum_ptr, pm2_ptr,
    N, C_IN, H, W, C_OUT, HQ, WQ,
    sxn, sxc, sxh, sxw,
    swi, swo, swh, sww,
    syn, syc, syh, syw,
    STRIDE: tl.constexpr, PAD: tl.constexpr, TAPS: tl.constexpr,
    BIAS_RELU: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M rows x BLOCK_N channels) tile of one stride phase.

    Training (BIAS_RELU false): stores the conv output and, per channel, the tile's sum and its sum of
    squared deviations from the tile mean, at psum/pm2[(phase * m_tiles + m_tile) * C_OUT + c];
    the finalize kernel merges them (Chan et al.), deterministic, without atomics and without the
    cancellation of E[x^2] - E[x]^2. Inference (BIAS_RELU true): stores ReLU(acc + bias).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    phase = tl.program_id(2)
    py = phase // STRIDE
    px = phase % STRIDE
    # taps of this phase: ky = (py + PAD) % STRIDE + t * STRIDE reads input row qy + (py + PAD) // STRIDE - t
    ry = (py + PAD) % STRIDE
    rx = (px + PAD) % STRIDE
    dy0 = (py + PAD) // STRIDE
    dx0 = (px + PAD) // STRIDE

    rows_per_phase = N * HQ * WQ
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < rows_per_phase
    n, qy, qx = _pixels(rows, HQ, WQ)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C_OUT
    ks = tl.arange(0, BLOCK_K)

    # one flat loop over (tap, channel block), so Triton's pipeliner overlaps the loads of the next
    # tiles with the current tl.dot (nested tap loops would leave it one stage deep)
    k_blocks = tl.cdiv(C_IN, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in range(0, TAPS * TAPS * k_blocks):
        tap = it // k_blocks
        c0 = (it % k_blocks) * BLOCK_K
        ty = tap // TAPS
        tx = tap % TAPS
        iy = qy + dy0 - ty
        ix = qx + dx0 - tx
        a_ok = row_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        k_ok = (c0 + ks) < C_IN
        a = tl.load(x_ptr + (n * sxn + iy * sxh + ix * sxw)[:, None] + (c0 + ks)[None, :] * sxc,
                    mask=a_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + (ry + ty * STRIDE) * swh + (rx + tx * STRIDE) * sww + (c0 + ks)[:, None] * swi
                    + (cols * swo)[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    oy = qy * STRIDE + py
    ox = qx * STRIDE + px
    y_ptrs = y_ptr + (n * syn + oy * syh + ox * syw)[:, None] + (cols * syc)[None, :]
    out_ok = row_ok[:, None] & col_ok[None, :]
    if BIAS_RELU:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0)
        out = tl.maximum(acc + bias[None, :], 0.0)
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=out_ok)
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_ok)
        count = tl.minimum(rows_per_phase - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
        tile_sum = tl.sum(acc, axis=0)  # rows past the end hold zeros: they add nothing
        centred = tl.where(row_ok[:, None], acc - (tile_sum / count)[None, :], 0.0)
        tile_m2 = tl.sum(centred * centred, axis=0)
        part = (phase * tl.num_programs(0) + pid_m) * C_OUT + cols
        tl.store(psum_ptr + part, tile_sum, mask=col_ok)
        tl.store(pm2_ptr + part, tile_m2, mask=col_ok)


@triton.jit
def convt_input_grad_kernel(
    g_ptr, w_ptr, dx_ptr,
    N, C_IN, H, W, C_OUT, H_OUT, W_OUT,
    sgn, sgc, sgh, sgw,
    swi, swo, swh, sww,
    sdn, sdc, sdh, sdw,
    STRIDE: tl.constexpr, PAD: tl.constexpr, KSIZE: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx[n, ci, iy, ix] = sum over co, ky, kx of g[n, co, iy*s - p + ky, ix*s - p + kx] * w[ci, co, ky, kx]:
    a strided convolution of the output gradient, M = N*H*W rows, C_in columns, K = C_out*k*k."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N * H * W
    n, iy, ix = _pixels(rows, H, W)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C_IN
    ks = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for ky in tl.static_range(KSIZE):
        oy = iy * STRIDE - PAD + ky
        y_ok = row_ok & (oy >= 0) & (oy < H_OUT)
        for kx in tl.static_range(KSIZE):
            ox = ix * STRIDE - PAD + kx
            a_ok = y_ok & (ox >= 0) & (ox < W_OUT)
            a_base = g_ptr + n * sgn + oy * sgh + ox * sgw
            b_base = w_ptr + ky * swh + kx * sww + cols * swi
            for c0 in range(0, C_OUT, BLOCK_K):
                k_ok = (c0 + ks) < C_OUT
                a = tl.load(a_base[:, None] + (c0 + ks)[None, :] * sgc, mask=a_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(b_base[None, :] + (c0 + ks)[:, None] * swo, mask=k_ok[:, None] & col_ok[None, :],
                            other=0.0)
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    dx_ptrs = dx_ptr + (n * sdn + iy * sdh + ix * sdw)[:, None] + (cols * sdc)[None, :]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def convt_weight_grad_kernel(
    x_ptr, g_ptr, dw_ptr,
    N, C_IN, H, W, C_OUT, H_OUT, W_OUT, ROWS_PER_SPLIT,
    sxn, sxc, sxh, sxw,
    sgn, sgc, sgh, sgw,
    STRIDE: tl.constexpr, PAD: tl.constexpr, KSIZE: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dw[split, ci, co, ky, kx] = sum over the split's rows (n, iy, ix) of x[n, ci, iy, ix] * g[n, co, oy, ox]:
    one GEMM per tap (C_in x C_out, K = N*H*W), split along K so that small layers still fill the GPU.
    Splits write fp32 partials (contiguous, [splits, C_in, C_out, k, k]) that the caller sums: deterministic."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    tap_split = tl.program_id(2)
    tap = tap_split % (KSIZE * KSIZE)
    split = tap_split // (KSIZE * KSIZE)
    ky = tap // KSIZE
    kx = tap % KSIZE
    ci = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ci_ok = ci < C_IN
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < C_OUT
    total_rows = N * H * W
    first = split * ROWS_PER_SPLIT
    last = tl.minimum(first + ROWS_PER_SPLIT, total_rows)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(first, last, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        n, iy, ix = _pixels(rows, H, W)
        oy = iy * STRIDE - PAD + ky
        ox = ix * STRIDE - PAD + kx
        r_ok = (rows < last) & (oy >= 0) & (oy < H_OUT) & (ox >= 0) & (ox < W_OUT)
        a = tl.load(x_ptr + (ci * sxc)[:, None] + (n * sxn + iy * sxh + ix * sxw)[None, :],
                    mask=ci_ok[:, None] & r_ok[None, :], other=0.0)
        b = tl.load(g_ptr + (n * sgn + oy * sgh + ox * sgw)[:, None] + (co * sgc)[None, :],
                    mask=r_ok[:, None] & co_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    # partials laid out as [splits, C_in, C_out, k, k]
    out = dw_ptr + split * (C_IN * C_OUT * KSIZE * KSIZE) + (ci * (C_OUT * KSIZE * KSIZE))[:, None] \
        + (co * (KSIZE * KSIZE))[None, :] + tap
    tl.store(out, acc, mask=ci_ok[:, None] & co_ok[None, :])
