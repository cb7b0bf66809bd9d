"""Triton kernels for FP8 block weights.

fp8_gemm and fp8_grouped_gemm (decode-sized products) compute y = x @ W^T with W[n, k] = q[n, k] *
s[n // 128, k // 128]: the FP8 bytes are loaded (half the bytes of bf16), widened in registers, and each
128-wide K block's partial product is scaled once by its block scale. Activations stay in their own dtype
(bf16 on the GPU): no activation quantization, so these are more accurate than the W8A8 paths. Accumulation
in fp32.

For prefill-sized products the tensor cores' FP8 rate is what pays (the W8A8 recipe of the release, vLLM and
SGLang): quantize_activations_fast quantizes activations per token and 128-column group in one pass (the
numbers of blocks.quantize_activations), and w8a8_grouped_gemm multiplies FP8 by FP8 per expert (the grouped
kernel's W8A8 form), each 128-wide K step's product scaled by its activation scales (per row) and its weight
block's scale.
Run in Triton's CPU interpreter by the tests (TRITON_INTERPRET=1), on CUDA by the GPU tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BK = 128  # = the weight block's columns: one scale per (row block, K step)


@triton.jit
def _fp8_gemm_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, s_stride, KB: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr):
    """y [M, N] = x [M, K] @ (q [N, K] * s [ceil(N/128), KB])^T. BLOCK_N divides 128, so a tile's rows share
    one scale row. DOT=False (M = 1): multiply-and-sum, no tensor-core padding of the single row."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, 128)
    nmask, mmask = rn < N, rm < M
    srow = (pid_n * BLOCK_N) // 128
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, KB):
        k = kb * 128 + rk
        kmask = k < K
        w = tl.load(w_ptr + rn[:, None] * K + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
        x = tl.load(x_ptr + rm[:, None] * K + k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        scale = tl.load(s_ptr + srow * s_stride + kb)
        if DOT:
            part = tl.dot(x, tl.trans(w.to(x.dtype)), out_dtype=tl.float32)
        else:
            part = tl.sum(x.to(tl.float32) * w.to(tl.float32), axis=1)[None, :]
        acc += part * scale
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


def fp8_gemm(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32, contiguous), q [N, K] float8_e4m3fn, s [>= ceil(N/128), >= ceil(K/128)] fp32
    -> y [M, N] in x's dtype. Sized for decode (M up to a few dozen rows): the weight is read once per
    BLOCK_M rows of x."""
    M, K = x.shape
    N = q.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    dot = M > 1
    block_m = min(64, max(16, triton.next_power_of_2(M))) if dot else 1
    block_n = 64 if dot else (32 if N >= 4096 else 8)  # one row: enough programs to keep the SMs reading
    grid = (triton.cdiv(N, block_n), triton.cdiv(M, block_m))
    _fp8_gemm_kernel[grid](x, q, s, y, M, N, K, s.stride(0), triton.cdiv(K, BK),
                           BLOCK_M=block_m, BLOCK_N=block_n, DOT=dot)
    return y


@triton.jit
def _fp8_grouped_kernel(x_ptr, xs_ptr, w_ptr, s_ptr, y_ptr, tile_expert_ptr, tile_row_ptr, end_ptr, N, K,
                        xs_stride_m, xs_stride_g, w_stride_e, s_stride_e, s_stride_r, KB: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, W8A8: tl.constexpr, EVEN_K: tl.constexpr):
    """Grouped product over rows sorted by expert: tile t covers rows [tile_row[t], +BLOCK_M) of expert
    tile_expert[t] (its rows end at end[e]); y[r] = x[r] @ (q[e] * s[e])^T, each 128-wide K step's product scaled
    by its weight blocks' scales (one per 128 rows of the tile). Unused tiles have expert -1.
    W8A8: x holds float8 activations with scales xs [P, ceil(K/128)] (strides xs_stride_m, xs_stride_g): the dots
    run on the FP8 tensor cores, each step's also scaled by its rows' activation scales. Else x is in its own
    dtype and the weight widens to it. EVEN_K: K is a multiple of 128 (no column masks)."""
    t = tl.program_id(1)
    pid_n = tl.program_id(0)
    e = tl.load(tile_expert_ptr + t)
    if e >= 0:
        row0 = tl.load(tile_row_ptr + t)
        end = tl.load(end_ptr + e)
        rm = row0 + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, 128)
        mmask, nmask = rm < end, rn < N
        s_rows = s_ptr + e * s_stride_e + (rn // 128) * s_stride_r  # [BLOCK_N]: each row's scale row
        w_rows = w_ptr + e.to(tl.int64) * w_stride_e + rn[:, None] * K
        x_rows = x_ptr + rm[:, None].to(tl.int64) * K
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, KB):
            k = kb * 128 + rk
            if EVEN_K:
                w = tl.load(w_rows + k[None, :], mask=nmask[:, None], other=0.0)
                x = tl.load(x_rows + k[None, :], mask=mmask[:, None], other=0.0)
            else:
                kmask = k < K
                w = tl.load(w_rows + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
                x = tl.load(x_rows + k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
            scale = tl.load(s_rows + kb, mask=nmask, other=0.0)  # [BLOCK_N]
            if W8A8:
                sa = tl.load(xs_ptr + rm * xs_stride_m + kb * xs_stride_g, mask=mmask, other=0.0)
                acc += tl.dot(x, tl.trans(w), out_dtype=tl.float32) * (sa[:, None] * scale[None, :])
            else:
                acc += tl.dot(x, tl.trans(w.to(x.dtype)), out_dtype=tl.float32) * scale[None, :]
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=mmask[:, None] & nmask[None, :])


def tile_schedule(counts: torch.Tensor, block_m: int, max_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """counts [E] rows per expert (rows sorted by expert) -> (tile_expert [T], tile_row [T], end [E]) for a
    fixed T = ceil(max_rows / block_m) + E tiles (an upper bound, so no host sync): tile t belongs to
    expert tile_expert[t] (-1: unused) and starts at row tile_row[t]; expert e's rows end at end[e]."""
    E = counts.numel()
    T = -(-max_rows // block_m) + E
    tiles = (counts + block_m - 1) // block_m  # [E]
    tile_end = tiles.cumsum(0)  # [E]
    end = counts.cumsum(0)
    start = end - counts
    t = torch.arange(T, device=counts.device)
    e = torch.searchsorted(tile_end, t, right=True)  # [T]
    valid = e < E
    ec = e.clamp(max=E - 1)
    first_tile = tile_end[ec] - tiles[ec]
    row = start[ec] + (t - first_tile) * block_m
    return torch.where(valid, ec, -1).to(torch.int32), row.to(torch.int32), end.to(torch.int32)


def fp8_grouped_gemm(xs: torch.Tensor, q: torch.Tensor, s: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """xs [P, K] rows sorted by expert (counts [E] of them each), q [E, N, K] float8, s [E, ceil(N/128),
    ceil(K/128)] fp32 -> [P, N] in xs's dtype: row r times its expert's dequantized weight, transposed."""
    P, K = xs.shape
    E, N, _ = q.shape
    y = torch.empty(P, N, dtype=xs.dtype, device=xs.device)
    if P == 0:
        return y
    block_m = 16 if P <= 8 * E else 64
    block_n = 64
    tile_expert, tile_row, end = tile_schedule(counts, block_m, P)
    grid = (triton.cdiv(N, block_n), tile_expert.numel())
    _fp8_grouped_kernel[grid](xs, xs, q, s, y, tile_expert, tile_row, end, N, K, 0, 0, q.stride(0), s.stride(0),
                              s.stride(1), triton.cdiv(K, BK), BLOCK_M=block_m, BLOCK_N=block_n, W8A8=False,
                              EVEN_K=K % BK == 0)
    return y


# ---------------------------------------------------------------------------------------------- W8A8 (prefill)
W8A8_TILE = dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4)  # the best of bench/fp8.py's five (H200)


@triton.jit
def _round_e4m3(v):
    """fp32 v (|v| <= 448) rounded to the nearest float8_e4m3fn value, ties to even, still fp32: the rounding
    made explicit (the cast of an exact value is exact everywhere; Triton's CPU interpreter rounds inexact ones
    wrongly). The step at |v| is 2^(exponent - 3), 2^-9 below the normal range; adding and removing
    1.5 * 2^23 steps rounds to a multiple of the step."""
    a = tl.abs(v)
    e = (a.to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased exponent
    step_e = tl.maximum(e - 127, -6) - 3 + 127
    step = (step_e << 23).to(tl.float32, bitcast=True)
    magic = step * 12582912.0
    r = (a + magic) - magic
    sign = v.to(tl.int32, bitcast=True) & -2147483648  # (negative values rounding to 0 keep their sign)
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _quant_act_kernel(x_ptr, w_ptr, q_ptr, s_ptr, M, K, x_stride, s_stride_m, s_stride_g, ROWS: tl.constexpr,
                      SWIGLU: tl.constexpr):
    """Program (i, g): rows [i*ROWS, +ROWS), columns [g*128, +128): s = amax(|x|) * fp32(1 / 448) per row (1 for an
    all-zero group, at least the smallest normal fp32), q = clamp(x / s, +-448) as float8_e4m3fn, the division
    rounded to nearest as torch's is, so q and s equal blocks.quantize_activations'.
    SWIGLU: x [M, K] is the experts' activation, computed here from their gate/up products h [M, 2K] (x_ptr,
    row stride x_stride) and the rows' routing weights w [M] fp32: silu(gate) * up * w in fp32, rounded to h's
    dtype (what the unfused path quantizes)."""
    rm = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    g = tl.program_id(1)
    k = g * 128 + tl.arange(0, 128)
    m2 = (rm < M)[:, None] & (k < K)[None, :]
    rows = x_ptr + rm[:, None].to(tl.int64) * x_stride
    x = tl.load(rows + k[None, :], mask=m2, other=0.0).to(tl.float32)
    if SWIGLU:
        up = tl.load(rows + K + k[None, :], mask=m2, other=0.0).to(tl.float32)
        wt = tl.load(w_ptr + rm, mask=rm < M, other=0.0)
        x = (x * tl.sigmoid(x) * up * wt[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    s = tl.where(amax > 0, tl.maximum(amax * (1.0 / 448.0), 1.1754943508222875e-38), 1.0)  # (blocks.FP8_MAX)
    q = tl.math.div_rn(x, tl.broadcast_to(s[:, None], (ROWS, 128)))
    q = _round_e4m3(tl.minimum(tl.maximum(q, -448.0), 448.0))
    tl.store(q_ptr + rm[:, None].to(tl.int64) * K + k[None, :], q.to(q_ptr.dtype.element_ty), mask=m2)
    tl.store(s_ptr + rm * s_stride_m + g * s_stride_g, s, mask=rm < M)


def quantize_activations_fast(x: torch.Tensor, scales_column_major: bool = True):
    """blocks.quantize_activations(x, 128) for x [M, K] in one kernel: (xq [M, K] float8_e4m3fn, scale
    [M, ceil(K/128)] fp32), the scales outer-dim-major (strides (1, M): torch._scaled_mm's layout for
    scale_a) unless scales_column_major=False."""
    M, K = x.shape
    G = triton.cdiv(K, 128)
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(G, M, dtype=torch.float32, device=x.device).t() if scales_column_major else \
        torch.empty(M, G, dtype=torch.float32, device=x.device)
    if M:
        rows = 16
        _quant_act_kernel[(triton.cdiv(M, rows), G)](x, x, q, s, M, K, x.stride(0), s.stride(0), s.stride(1),
                                                     ROWS=rows, SWIGLU=False, num_warps=4)
    return q, s


def swiglu_quantize(h: torch.Tensor, w: torch.Tensor):
    """The experts' down-projection input, quantized in one pass: h [M, 2I] (gate columns, then up; rows
    contiguous), w [M] fp32 routing weights -> quantize_activations_fast(silu(gate) * up * w rounded to h's
    dtype), scales row-major: (aq [M, I] float8_e4m3fn, scale [M, ceil(I/128)] fp32)."""
    M, I = h.shape[0], h.shape[1] // 2
    G = triton.cdiv(I, 128)
    q = torch.empty(M, I, dtype=torch.float8_e4m3fn, device=h.device)
    s = torch.empty(M, G, dtype=torch.float32, device=h.device)
    if M:
        rows = 16
        _quant_act_kernel[(triton.cdiv(M, rows), G)](h, w.contiguous(), q, s, M, I, h.stride(0), s.stride(0),
                                                     s.stride(1), ROWS=rows, SWIGLU=True, num_warps=4)
    return q, s


def w8a8_grouped_gemm(xq: torch.Tensor, xs: torch.Tensor, q: torch.Tensor, s: torch.Tensor, counts: torch.Tensor,
                      dtype: torch.dtype, tile: dict | None = None) -> torch.Tensor:
    """xq [P, K] float8 rows sorted by expert (counts [E] of them each) with scales xs [P, ceil(K/128)] (any
    strides), q [E, N, K] float8, s [E, ceil(N/128), ceil(K/128)] fp32 -> [P, N] in dtype: each row's
    dequantized activations times its expert's dequantized weight, transposed. tile: W8A8_TILE's keys."""
    P, K = xq.shape
    E, N, _ = q.shape
    y = torch.empty(P, N, dtype=dtype, device=xq.device)
    if P == 0:
        return y
    cfg = dict(W8A8_TILE, **(tile or {}))
    block_m, block_n = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    tile_expert, tile_row, end = tile_schedule(counts, block_m, P)
    grid = (triton.cdiv(N, block_n), tile_expert.numel())
    _fp8_grouped_kernel[grid](xq, xs, q, s, y, tile_expert, tile_row, end, N, K, xs.stride(0), xs.stride(1),
                              q.stride(0), s.stride(0), s.stride(1), triton.cdiv(K, BK), BLOCK_M=block_m,
                              BLOCK_N=block_n, W8A8=True, EVEN_K=K % BK == 0, **cfg)
    return y
