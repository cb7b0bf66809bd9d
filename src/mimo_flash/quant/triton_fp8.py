"""Triton kernels for FP8 block weights.

fp8_gemm (decode-sized products) computes y = x @ W^T with W[n, k] = q[n, k] * s[n // 128, k // 128]: the FP8
bytes are loaded (half the bytes of bf16), widened in registers, and each 128-wide K block's partial product is
scaled once by its block scale (the experts' grouped form is ops/kernels/moe.py's grouped_gemm). Activations
stay in their own dtype (bf16 on the GPU): no activation quantization, so these are more accurate than the W8A8
paths. Accumulation in fp32.

For prefill-sized products the tensor cores' FP8 rate is what pays (the W8A8 recipe of the release, vLLM and
SGLang): quantize_activations_fast quantizes activations per token and 128-column group in one pass (the
numbers of blocks.quantize_activations; quantize_dispatch writes each token to its experts' sorted rows instead),
and w8a8_grouped_gemm multiplies FP8 by FP8 per expert (rows sorted by expert, tiles laid out by ops/kernels/moe.py's
tile_schedule, operands loaded by TMA), each 128-wide K step's product scaled by its activation scales (per row) and
its weight block's scale.
Run in Triton's CPU interpreter by the tests (TRITON_INTERPRET=1), on CUDA by the GPU tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..ops.kernels.moe import tile_rows, tile_schedule

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


# ---------------------------------------------------------------------------------------------- W8A8 (prefill)
W8A8_TILE = dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4)  # devrun probe, H100, 2026-12-06: of nine
# tiles, 128 x 128 (8 warps, 4 stages) was 3% faster on gate_up and 4% slower on down; 256-wide N tiles lose 30%


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
def _quant_act_kernel(x_ptr, w_ptr, dest_ptr, q_ptr, s_ptr, M, K, x_stride, s_stride_m, s_stride_g,
                      ROWS: tl.constexpr, SWIGLU: tl.constexpr, SLOTS: tl.constexpr, ROUND: tl.constexpr):
    """Program (i, g): rows [i*ROWS, +ROWS), columns [g*128, +128): s = amax(|x|) * fp32(1 / 448) per row (1 for an
    all-zero group, at least the smallest normal fp32), q = clamp(x / s, +-448) as float8_e4m3fn, the division
    rounded to nearest as torch's is, so q and s equal blocks.quantize_activations'.
    SWIGLU: x [M, K] is the experts' activation, computed here from their gate/up products h [M, 2K] (x_ptr,
    row stride x_stride) and the rows' routing weights w [M] fp32: silu(gate) * up * w in fp32, rounded to h's
    dtype (what the unfused path quantizes).
    SLOTS > 0 (the experts' dispatch): row m goes to rows dest[m * SLOTS + j] of q and s, j < SLOTS, not to row m.
    ROUND: round to FP8 values in fp32 before the cast (_round_e4m3; the interpreter). On the GPU the cast itself
    rounds to nearest even (the GPU test checks every tie), a few % faster on the experts' SwiGLU quantizer."""
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
    q = tl.minimum(tl.maximum(q, -448.0), 448.0)
    if ROUND:
        q = _round_e4m3(q)
    q = q.to(q_ptr.dtype.element_ty)
    if SLOTS == 0:
        tl.store(q_ptr + rm[:, None].to(tl.int64) * K + k[None, :], q, mask=m2)
        tl.store(s_ptr + rm * s_stride_m + g * s_stride_g, s, mask=rm < M)
    else:
        for j in tl.static_range(SLOTS):
            d = tl.load(dest_ptr + rm * SLOTS + j, mask=rm < M, other=0)
            tl.store(q_ptr + d[:, None].to(tl.int64) * K + k[None, :], q, mask=m2)
            tl.store(s_ptr + d * s_stride_m + g * s_stride_g, s, mask=rm < M)


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
        _quant_act_kernel[(triton.cdiv(M, rows), G)](x, x, x, q, s, M, K, x.stride(0), s.stride(0), s.stride(1),
                                                     ROWS=rows, SWIGLU=False, SLOTS=0, ROUND=not x.is_cuda, num_warps=4)
    return q, s


def quantize_dispatch(x: torch.Tensor, dest: torch.Tensor, slots: int, rows: int = 32, num_warps: int = 4):
    """The experts' dispatch, quantized: x [M, K] (contiguous), dest [M * slots] (each (row, slot) pair's place,
    ops/moe.py's sort_by_expert's inv) -> quantize_activations_fast(x[tok]) of the sorted rows (tok[dest[m * slots
    + j]] = m) without the gathered copy: each row quantized once and written to its slots' places. (xq [M * slots,
    K] float8_e4m3fn, scale [M * slots, ceil(K/128)] fp32, strides (1, M * slots))."""
    M, K = x.shape
    G, P = triton.cdiv(K, 128), M * slots
    if dest.numel() != P or x.stride() != (K, 1):
        raise ValueError(f"quantize_dispatch takes contiguous rows [M, K] and M * slots places, got {tuple(x.shape)} "
                         f"rows (strides {x.stride()}), {slots} slots and {dest.numel()} places")
    q = torch.empty(P, K, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(G, P, dtype=torch.float32, device=x.device).t()
    if M:
        _quant_act_kernel[(triton.cdiv(M, rows), G)](x, x, dest, q, s, M, K, x.stride(0), s.stride(0), s.stride(1),
                                                     ROWS=rows, SWIGLU=False, SLOTS=slots, ROUND=not x.is_cuda,
                                                     num_warps=num_warps)
    return q, s


def swiglu_quantize(h: torch.Tensor, w: torch.Tensor):
    """The experts' down-projection input, quantized in one pass: h [M, 2I] (gate columns, then up; rows
    contiguous), w [M] fp32 routing weights -> quantize_activations_fast(silu(gate) * up * w rounded to h's
    dtype), scales outer-dim-major as w8a8_grouped_gemm reads them: (aq [M, I] float8_e4m3fn, scale [M, ceil(I/128)]
    fp32, strides (1, M))."""
    M, I = h.shape[0], h.shape[1] // 2
    G = triton.cdiv(I, 128)
    q = torch.empty(M, I, dtype=torch.float8_e4m3fn, device=h.device)
    s = torch.empty(G, M, dtype=torch.float32, device=h.device).t()
    if M:
        rows = 16
        _quant_act_kernel[(triton.cdiv(M, rows), G)](h, w.contiguous(), h, q, s, M, I, h.stride(0), s.stride(0),
                                                     s.stride(1), ROWS=rows, SWIGLU=True, SLOTS=0, ROUND=not h.is_cuda,
                                                     num_warps=4)
    return q, s


@triton.jit
def _w8a8_grouped_kernel(x_desc, w_desc, xs_ptr, s_ptr, y_ptr, tile_expert_ptr, tile_row_ptr, end_ptr, N, P,
                         s_stride_e, s_stride_r, KB: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    """Tile t (grid axis 1) covers rows [tile_row[t], +BLOCK_M) of expert e = tile_expert[t] (its rows end at
    end[e]; unused tiles have e = -1), columns [pid_n * BLOCK_N, +BLOCK_N): y[r] = dequant(x[r]) @ dequant(W[e])^T.
    x_desc: TMA descriptor of the FP8 rows [P, K] (rows past P and columns past K read as zeros; rows of the next
    expert are computed and not stored), w_desc: of the FP8 weights as [E * N, K]; xs [KB, P] fp32 (each K step's
    row scales contiguous), s [E, ceil(N/128), KB]. Each 128-wide K step's FP8 product (fp32) is scaled by its
    rows' scales and its weight block's scale, one scale per tile while BLOCK_N divides 128."""
    pid_n = tl.program_id(0)  # the N tiles of one row tile are neighbours: its rows stay in L2
    e, row0, rm, mmask = tile_rows(tile_expert_ptr, tile_row_ptr, end_ptr, BLOCK_M)
    if e >= 0:
        n0 = pid_n * BLOCK_N
        rn = n0 + tl.arange(0, BLOCK_N)
        s_tile = s_ptr + e * s_stride_e
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, KB):
            x = x_desc.load([row0, kb * BK])
            w = w_desc.load([e * N + n0, kb * BK])
            sa = tl.load(xs_ptr + kb * P + rm, mask=mmask, other=0.0)
            if 128 % BLOCK_N == 0:
                ws = tl.load(s_tile + (n0 // 128) * s_stride_r + kb)
                acc += tl.dot(x, w.T, out_dtype=tl.float32) * (sa * ws)[:, None]
            else:
                ws = tl.load(s_tile + (rn // 128) * s_stride_r + kb, mask=rn < N, other=0.0)
                acc += tl.dot(x, w.T, out_dtype=tl.float32) * (sa[:, None] * ws[None, :])
        tl.store(y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=mmask[:, None] & (rn < N)[None, :])


def w8a8_grouped_gemm(xq: torch.Tensor, xs: torch.Tensor, q: torch.Tensor, s: torch.Tensor, counts: torch.Tensor,
                      dtype: torch.dtype, tile: dict | None = None) -> torch.Tensor:
    """xq [P, K] float8 rows sorted by expert (counts [E] of them each) with scales xs [P, ceil(K/128)] (cheapest
    outer-dim-major, strides (1, P): copied to that layout otherwise), q [E, N, K] float8, s [E, ceil(N/128),
    ceil(K/128)] fp32 -> [P, N] in dtype: each row's dequantized activations times its expert's dequantized
    weight, transposed, on the FP8 tensor cores with TMA loads. K must be a multiple of 16 (TMA's row
    alignment). tile: W8A8_TILE's keys (BLOCK_N dividing 128 or a multiple of it)."""
    cfg = dict(W8A8_TILE, **(tile or {}))
    bm, bn = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    P, K = xq.shape
    E, N, _ = q.shape
    if K % 16 or xq.stride() != (K, 1) or not q.is_contiguous():
        raise ValueError(f"w8a8_grouped_gemm takes row-major FP8 rows and contiguous weights with K a multiple of "
                         f"16 (rows {tuple(xq.shape)} strides {xq.stride()}, weights contiguous: {q.is_contiguous()})")
    if 128 % bn and bn % 128:
        raise ValueError(f"BLOCK_N must divide 128 or be a multiple of it, got {bn}")
    y = torch.empty(P, N, dtype=dtype, device=xq.device)
    if P == 0:
        return y
    xs_t = xs.t().contiguous()  # [KB, P]
    tile_expert, tile_row, end = tile_schedule(counts, bm, P)
    x_desc = TensorDescriptor.from_tensor(xq, [bm, BK])
    w_desc = TensorDescriptor.from_tensor(q.view(E * N, K), [bn, BK])
    grid = (triton.cdiv(N, bn), tile_expert.numel())
    _w8a8_grouped_kernel[grid](x_desc, w_desc, xs_t, s, y, tile_expert, tile_row, end, N, P, s.stride(0),
                               s.stride(1), KB=triton.cdiv(K, BK), BK=BK, BLOCK_M=bm, BLOCK_N=bn, **cfg)
    return y
