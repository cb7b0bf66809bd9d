"""The MoE's kernels on CUDA (ops/moe.py): the counting sort of (token, slot) pairs by expert, the gather-sum that
dispatches tokens to their pairs and combines the pairs' outputs, the experts' grouped products over sorted pairs,
and the dense products of batched decode (every expert on every token)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import STATIC_LOOPS, launcher


@launcher
@triton.jit
def _gather_sum_kernel(Y, IDX, OUT, D, K: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    out = OUT + n.to(tl.int64) * D + offs
    if K == 1:  # a copy to k rows each (dispatch): the source rows stay in L2 for their other copies, the
        # [P, D] output streams past it
        r = tl.load(IDX + n).to(tl.int64)
        acc = tl.load(Y + r * D + offs, mask=mask, other=0.0, eviction_policy="evict_last")
        tl.store(out, acc.to(OUT.dtype.element_ty), mask=mask, cache_modifier=".cs")
    else:  # a sum of k rows each read once
        for s in tl.static_range(K):
            r = tl.load(IDX + n * K + s).to(tl.int64)
            acc += tl.load(Y + r * D + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        tl.store(out, acc.to(OUT.dtype.element_ty), mask=mask)


def gather_sum(y: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
    """y [P, D] (contiguous), index [N * k] -> out [N, D], out[n] = sum_s y[index[n*k + s]] in fp32."""
    y = y.contiguous()
    N, D = index.numel() // k, y.shape[1]
    out = torch.empty(N, D, device=y.device, dtype=y.dtype)
    block = min(1024, triton.next_power_of_2(D))
    _gather_sum_kernel[(N, triton.cdiv(D, block))](y, index, out, D, K=k, BLOCK_D=block,
                                                   num_warps=max(1, min(8, block // 256)))
    return out


# ----------------------------------------------------------------------------------------- MoE sort
# A stable counting sort of the (token, slot) pairs by expert, in place of a radix argsort, in three kernels:
# each block of SORT_BLOCK pairs counts its experts into hist [E, blocks]; one program takes the running sum
# over hist in expert-major order (less hist itself: the first place of every (expert, block)), the tokens
# per expert and their running sum (the grouped GEMMs' offsets); each pair's place is then its (expert,
# block)'s first place plus the number of earlier pairs of its block with the same expert.
SORT_BLOCK = 128
SCAN_ELEMS = 16384  # hist entries per step of the scan program's loop


@launcher
@triton.jit
def _expert_hist_kernel(IDX, HIST, P, NB, E: tl.constexpr, EP: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    e = tl.load(IDX + offs, mask=offs < P, other=-1).to(tl.int32)
    ex = tl.arange(0, EP)
    n = tl.sum((e[:, None] == ex[None, :]).to(tl.int32), 0)
    tl.store(HIST + ex * NB + b, n, mask=ex < E)


@triton.jit
def _hist_chunk(HIST, ex, cols, b0, NB, E: tl.constexpr):
    m = (ex < E)[:, None] & ((b0 + cols) < NB)[None, :]
    return tl.load(HIST + ex[:, None] * NB + b0 + cols[None, :], mask=m, other=0), m


@launcher
@triton.jit
def _expert_scan_kernel(HIST, FIRST, COUNTS, OFFS, NB, E: tl.constexpr, EP: tl.constexpr, BLOCK_B: tl.constexpr,
                        STATIC: tl.constexpr, CHUNKS: tl.constexpr):
    """One program: tokens per expert (COUNTS, int64), their running sum (OFFS, int32) and FIRST [E, NB]."""
    ex = tl.arange(0, EP)
    cols = tl.arange(0, BLOCK_B)
    tot = tl.zeros([EP], dtype=tl.int32)
    if STATIC:  # Triton's interpreter: no loop to a runtime bound
        for j in range(CHUNKS):
            h, _ = _hist_chunk(HIST, ex, cols, j * BLOCK_B, NB, E)
            tot += tl.sum(h, 1)
    else:
        for b0 in range(0, NB, BLOCK_B):
            h, _ = _hist_chunk(HIST, ex, cols, b0, NB, E)
            tot += tl.sum(h, 1)
    end = tl.cumsum(tot, 0)
    tl.store(COUNTS + ex, tot.to(tl.int64), mask=ex < E)
    tl.store(OFFS + ex, end, mask=ex < E)
    run = end - tot
    if STATIC:
        for j in range(CHUNKS):
            h, m = _hist_chunk(HIST, ex, cols, j * BLOCK_B, NB, E)
            tl.store(FIRST + ex[:, None] * NB + j * BLOCK_B + cols[None, :], run[:, None] + tl.cumsum(h, 1) - h,
                     mask=m)
            run += tl.sum(h, 1)
    else:
        for b0 in range(0, NB, BLOCK_B):
            h, m = _hist_chunk(HIST, ex, cols, b0, NB, E)
            tl.store(FIRST + ex[:, None] * NB + b0 + cols[None, :], run[:, None] + tl.cumsum(h, 1) - h, mask=m)
            run += tl.sum(h, 1)


@launcher
@triton.jit
def _expert_place_kernel(IDX, FIRST, ORDER, INV, TOK, P, NB, K, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    offs = b * BLOCK + i
    mask = offs < P
    e = tl.load(IDX + offs, mask=mask, other=-1).to(tl.int32)
    earlier = (e[:, None] == e[None, :]) & (i[None, :] < i[:, None])  # [pair, earlier pair of the block]
    place = tl.load(FIRST + e * NB + b, mask=mask, other=0) + tl.sum(earlier.to(tl.int32), 1)
    tl.store(INV + offs, place.to(tl.int64), mask=mask)
    tl.store(ORDER + place, offs.to(tl.int64), mask=mask)
    tl.store(TOK + place, (offs // K).to(tl.int64), mask=mask)


def sort_by_expert(idx: torch.Tensor, num_experts: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """idx [N, k] -> (order [N*k] long: the flattened pairs sorted by expert, stably; inv [N*k] long: the
    place of each pair in that order; counts [E] long; tok [N*k] long: the token of each sorted pair,
    order // k; offsets [E] int32: the running sum of counts). order is the stable argsort."""
    N, k = idx.shape
    flat = idx.reshape(-1).contiguous()
    P, E = flat.numel(), num_experts
    nb = max(1, triton.cdiv(P, SORT_BLOCK))
    dev = flat.device
    hist, first = torch.empty(E, nb, device=dev, dtype=torch.int32), torch.empty(E, nb, device=dev, dtype=torch.int32)
    order, inv, tok = (torch.empty(P, device=dev, dtype=torch.long) for _ in range(3))
    counts, offs = torch.empty(E, device=dev, dtype=torch.long), torch.empty(E, device=dev, dtype=torch.int32)
    ep = triton.next_power_of_2(E)
    block_b = max(16, min(triton.next_power_of_2(nb), SCAN_ELEMS // ep))
    _expert_hist_kernel[(nb,)](flat, hist, P, nb, E=E, EP=ep, BLOCK=SORT_BLOCK, num_warps=4)
    _expert_scan_kernel[(1,)](hist, first, counts, offs, nb, E=E, EP=ep, BLOCK_B=block_b, STATIC=STATIC_LOOPS,
                              CHUNKS=triton.cdiv(nb, block_b) if STATIC_LOOPS else 0, num_warps=8)
    if P:
        _expert_place_kernel[(nb,)](flat, first, order, inv, tok, P, nb, k, BLOCK=SORT_BLOCK, num_warps=4)
    return order, inv, counts, tok, offs


# ----------------------------------------------------------------------------------------- grouped products
# The experts' products over (token, slot) rows sorted by expert (sort_by_expert's order), for few rows per expert
# (decode and verification; FP8 weights at any size). A program owns BLOCK_M rows of one expert and BLOCK_N
# output columns, so each expert's weights are read once per BLOCK_M of its rows, and only the experts that have
# rows are read. The weights may be bf16 / fp16 / fp32 (widened to the rows' dtype) or FP8 with 128x128 block
# scales (each 128-wide K step's partial product scaled by its block's scale). The tiles are laid out on the device
# (tile_schedule, which quant/triton_fp8.py's W8A8 product for prefill shares), so nothing waits for the GPU:
# CUDA-graph and torch.compile safe.
BK = 128  # the K step: an FP8 weight block's columns (one scale per row block and step)


@triton.jit
def _grouped_kernel(x_ptr, w_ptr, s_ptr, y_ptr, tile_expert_ptr, tile_row_ptr, end_ptr, N, K, w_stride_e,
                    s_stride_e, s_stride_r, KB: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, SCALED: tl.constexpr, EVEN_K: tl.constexpr):
    """Tile t covers rows [tile_row[t], +BLOCK_M) of expert tile_expert[t] (its rows end at end[e]; unused tiles
    have expert -1): y[r] = x[r] @ W[e]^T. SCALED: W = w * s per 128x128 block. The weight widens to x's dtype.
    EVEN_K: K is a multiple of BK."""
    pid_n = tl.program_id(0)
    e, _, rm, mmask = tile_rows(tile_expert_ptr, tile_row_ptr, end_ptr, BLOCK_M)
    if e >= 0:
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BK)
        nmask = rn < N
        s_rows = s_ptr + e * s_stride_e + (rn // 128) * s_stride_r  # [BLOCK_N]: each row's scale row
        w_rows = w_ptr + e.to(tl.int64) * w_stride_e + rn[:, None] * K
        x_rows = x_ptr + rm[:, None].to(tl.int64) * K
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, KB):
            k = kb * BK + rk
            if EVEN_K:
                w = tl.load(w_rows + k[None, :], mask=nmask[:, None], other=0.0)
                x = tl.load(x_rows + k[None, :], mask=mmask[:, None], other=0.0)
            else:
                kmask = k < K
                w = tl.load(w_rows + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
                x = tl.load(x_rows + k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
            if SCALED:
                scale = tl.load(s_rows + kb, mask=nmask, other=0.0)
                acc += tl.dot(x, tl.trans(w.to(x.dtype)), out_dtype=tl.float32) * scale[None, :]
            else:
                acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, out_dtype=tl.float32)
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=mmask[:, None] & nmask[None, :])


@triton.jit
def tile_rows(tile_expert_ptr, tile_row_ptr, end_ptr, BLOCK_M: tl.constexpr):
    """This program's tile of tile_schedule's layout (grid axis 1): (expert, first row, the tile's BLOCK_M rows,
    which of them are the expert's). Expert -1: an unused tile, none of its rows the expert's."""
    t = tl.program_id(1)
    e = tl.load(tile_expert_ptr + t)
    row0 = tl.load(tile_row_ptr + t)
    rm = row0 + tl.arange(0, BLOCK_M)
    return e, row0, rm, (rm < tl.load(end_ptr + tl.maximum(e, 0))) & (e >= 0)


SCHEDULE_TILES = 64  # tiles laid out per program of _tile_schedule_kernel


@triton.jit  # (not @launcher: grouped_gemm runs inside torch.compile'd decode steps, which trace Triton's own
# launch only)
def _tile_schedule_kernel(COUNTS, TILE_E, TILE_ROW, END, T, E, BLOCK_M: tl.constexpr, EP: tl.constexpr,
                          TILES: tl.constexpr):
    """tile_schedule_reference in one launch: each program reads all E counts (a few hundred) and lays out
    TILES tiles; the experts wholly before tile t are those whose tiles end at or before it."""
    ex = tl.arange(0, EP)
    n = tl.load(COUNTS + ex, mask=ex < E, other=0).to(tl.int32)
    tiles = (n + BLOCK_M - 1) // BLOCK_M
    if tl.program_id(0) == 0:
        tl.store(END + ex, tl.cumsum(n, 0), mask=ex < E)
    t = tl.program_id(0) * TILES + tl.arange(0, TILES)
    before = (tl.cumsum(tiles, 0)[None, :] <= t[:, None]) & (ex < E)[None, :]  # [TILES, EP]
    e = tl.sum(before.to(tl.int32), 1)
    first_tile = tl.sum(tl.where(before, tiles[None, :], 0), 1)
    start = tl.sum(tl.where(before, n[None, :], 0), 1)
    valid = e < E
    tl.store(TILE_E + t, tl.where(valid, e, -1), mask=t < T)
    tl.store(TILE_ROW + t, tl.where(valid, start + (t - first_tile) * BLOCK_M, 0), mask=t < T)


def tile_schedule(counts: torch.Tensor, block_m: int, max_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """counts [E] rows per expert (rows sorted by expert) -> (tile_expert [T], tile_row [T], end [E]), int32, for
    a fixed T = ceil(max_rows / block_m) + E tiles (an upper bound, so no host sync): tile t belongs to expert
    tile_expert[t] (-1: unused, row 0) and starts at row tile_row[t]; expert e's rows end at end[e]. One kernel
    (the torch version, tile_schedule_reference, takes about 25 small launches)."""
    E = counts.numel()
    T = -(-max_rows // block_m) + E
    # (three tensors, not views of one: torch.compile's handling of user Triton kernels mishandles aliased outputs)
    tile_expert, tile_row, end = (torch.empty(n, device=counts.device, dtype=torch.int32) for n in (T, T, E))
    _tile_schedule_kernel[(triton.cdiv(T, SCHEDULE_TILES),)](
        counts, tile_expert, tile_row, end, T, E, BLOCK_M=block_m, EP=max(16, triton.next_power_of_2(E)),
        TILES=SCHEDULE_TILES, num_warps=4)
    return tile_expert, tile_row, end


def tile_schedule_reference(counts: torch.Tensor, block_m: int, max_rows: int
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tile_schedule in torch ops, which it is tested against."""
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
    row = torch.where(valid, start[ec] + (t - first_tile) * block_m, 0)
    return torch.where(valid, ec, -1).to(torch.int32), row.to(torch.int32), end.to(torch.int32)


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, scale: torch.Tensor | None = None,
                 out_dtype: torch.dtype | None = None, BLOCK_M: int | None = None, BLOCK_N: int = 64,
                 **launch) -> torch.Tensor:
    """x [P, K] rows sorted by expert (counts [E] of them each), w [E, N, K] -> y [P, N] (out_dtype, default
    x's), y[r] = x[r] @ W[e]^T of its expert e. scale [E, ceil(N/128), ceil(K/128)] fp32: w is FP8 and
    W = w * scale per 128x128 block. BLOCK_M: rows per tile (default 16 while the rows average at most 8 per expert, else 64); launch: num_warps, num_stages."""
    P, K = x.shape
    E, N, _ = w.shape
    if x.stride() != (K, 1) or w.stride()[1:] != (K, 1):
        raise ValueError(f"grouped_gemm takes row-major x and w (strides {x.stride()}, {w.stride()})")
    y = torch.empty(P, N, dtype=out_dtype or x.dtype, device=x.device)
    if P == 0:
        return y
    block_m = BLOCK_M or (16 if P <= 8 * E else 64)
    tile_expert, tile_row, end = tile_schedule(counts, block_m, P)
    s = scale if scale is not None else end  # (unread placeholders; not the output, which the kernel writes)
    grid = (triton.cdiv(N, BLOCK_N), tile_expert.numel())
    _grouped_kernel[grid](x, w, s, y, tile_expert, tile_row, end, N, K, w.stride(0),
                          s.stride(0) if scale is not None else 0, s.stride(1) if scale is not None else 0,
                          triton.cdiv(K, BK), BK=BK, BLOCK_M=block_m, BLOCK_N=BLOCK_N, SCALED=scale is not None,
                          EVEN_K=K % BK == 0, **launch)
    return y


# ----------------------------------------------------------------------------------------- dense products
# Every expert on every token (batched decode and verification, where the tokens touch nearly every expert): the
# routing weights wd [N, E] (zero for the experts a token did not choose) scale each expert's SwiGLU output before
# its down product, so the sum over experts is the down product's own accumulation over (expert, column) steps.
# Nothing [E, N, D] or [E, N, 2I] is written: the gate and up products meet in registers and leave as one
# [E, N, I] tensor, and the down kernel sums its share of the experts into an fp32 partial [S, N, D] (S splits of
# the experts, so that enough programs stream the weights). Experts that no token chose are skipped (their
# weights are not read; their rows of the [E, N, I] tensor are zeros).
@triton.jit
def _dense_gate_up_kernel(x_ptr, w_ptr, wd_ptr, a_ptr, N, D, I, E, BM: tl.constexpr, BI: tl.constexpr,
                          BK: tl.constexpr, KD: tl.constexpr, IEEE: tl.constexpr):
    """a[e, m, i] = silu(x[m] . gate[e, i]) * (x[m] . up[e, i]) * wd[m, e]; w [E, 2I, D] (gate rows, then up).
    The row tiles of one weight tile are neighbours in the grid: its second read comes from L2."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    ri = tl.program_id(1) * BI + tl.arange(0, BI)
    e = tl.program_id(2)
    mmask, imask = rm < N, ri < I
    wdv = tl.load(wd_ptr + rm * E + e, mask=mmask, other=0.0)
    acc_g = tl.zeros((BM, BI), dtype=tl.float32)
    acc_u = tl.zeros((BM, BI), dtype=tl.float32)
    if tl.max(tl.abs(wdv), 0) > 0:  # (an expert no token chose: zeros, its weights unread)
        g_rows = w_ptr + e.to(tl.int64) * 2 * I * D + ri[:, None] * D
        u_rows = g_rows + I * D
        x_rows = x_ptr + rm[:, None] * D
        for kb in range(0, KD):  # (model sizes as constexpr loop counts: Triton's interpreter takes no other)
            rk = kb * BK + tl.arange(0, BK)
            kmask = rk < D
            x = tl.load(x_rows + rk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
            wg = tl.load(g_rows + rk[None, :], mask=imask[:, None] & kmask[None, :], other=0.0)
            wu = tl.load(u_rows + rk[None, :], mask=imask[:, None] & kmask[None, :], other=0.0)
            if IEEE:
                acc_g = tl.dot(x, tl.trans(wg), acc_g, input_precision="ieee")
                acc_u = tl.dot(x, tl.trans(wu), acc_u, input_precision="ieee")
            else:
                acc_g = tl.dot(x, tl.trans(wg), acc_g)
                acc_u = tl.dot(x, tl.trans(wu), acc_u)
    a = acc_g * tl.sigmoid(acc_g) * acc_u * wdv[:, None]
    tl.store(a_ptr + (e * N + rm[:, None]).to(tl.int64) * I + ri[None, :], a.to(a_ptr.dtype.element_ty),
             mask=mmask[:, None] & imask[None, :])


@triton.jit
def _dense_down_kernel(a_ptr, w_ptr, wd_ptr, p_ptr, N, D, I, E, PER: tl.constexpr, BM: tl.constexpr,
                       BD: tl.constexpr, BK: tl.constexpr, KI: tl.constexpr, IEEE: tl.constexpr):
    """p[s, m, d] = sum over experts e of split s (PER each) of a[e, m] . down[e, d]; w [E, D, I]. (One loop over
    (expert, column step) instead, pipelined across experts, measured slower on an H100:
    docs/history/2026-12-superseded.md.)"""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rd = tl.program_id(1) * BD + tl.arange(0, BD)
    s = tl.program_id(2)
    mmask, dmask = rm < N, rd < D
    acc = tl.zeros((BM, BD), dtype=tl.float32)
    for j in range(0, PER):
        e = s * PER + j
        wdv = tl.load(wd_ptr + rm * E + e, mask=mmask & (e < E), other=0.0)
        if tl.max(tl.abs(wdv), 0) > 0:
            a_rows = a_ptr + (e * N + rm[:, None]).to(tl.int64) * I
            w_rows = w_ptr + e.to(tl.int64) * D * I + rd[:, None] * I
            for kb in range(0, KI):
                rk = kb * BK + tl.arange(0, BK)
                kmask = rk < I
                a = tl.load(a_rows + rk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
                w = tl.load(w_rows + rk[None, :], mask=dmask[:, None] & kmask[None, :], other=0.0)
                if IEEE:
                    acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, tl.trans(w), acc)
    tl.store(p_ptr + (s * N + rm[:, None]).to(tl.int64) * D + rd[None, :], acc, mask=mmask[:, None] & dmask[None, :])


@triton.jit
def _split_sum_kernel(p_ptr, o_ptr, M, S: tl.constexpr, BLOCK: tl.constexpr):
    """o[i] = p[0, i] + ... + p[S-1, i] in fp32, in that order, rounded to o's dtype once; p [S, M] fp32. (What
    p.sum(0).to(dtype) computes, in half the time of inductor's kernel for it on an H100: docs/BENCHMARKS.md.)"""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    ptrs = p_ptr + offs
    for _ in tl.static_range(S):  # (pointer steps: no s * M product to overflow 32 bits)
        acc += tl.load(ptrs, mask=mask, other=0.0, eviction_policy="evict_first")
        ptrs += M
    tl.store(o_ptr + offs, acc.to(o_ptr.dtype.element_ty), mask=mask)


# the tiles of dense_experts' two kernels, the best of bench/decode_experts.py --sweep at 128, 64 and 32 tokens of the
# mini preset on an H100 (docs/BENCHMARKS.md): gate/up: BI weight rows of
# each projection, BK columns a step; down: BD output columns, BK a step, SPLITS programs per column tile (each
# sums E / SPLITS experts into its fp32 partial); BM: token rows a program (None: all N, up to 128); warps and
# stages (warps None: 8 from 128 rows, else 4)
SUM_BLOCK = 512  # outputs a program of the partials' sum
DENSE_TILES = dict(gate_up=dict(BI=64, BK=64, BM=None, warps=None, stages=3),
                   down=dict(BD=128, BK=64, SPLITS=16, BM=None, warps=8, stages=5))


def dense_experts(x: torch.Tensor, wd: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                  tiles: dict | None = None) -> torch.Tensor:
    """x [N, D], wd [N, E] fp32 routing weights (zero where not chosen), gate_up [E, 2I, D], down [E, D, I] (x's
    dtype, contiguous) -> [N, D] in x's dtype: sum_e wd[:, e] * down_e(silu(gate_e x) * up_e x), fp32 sums, the
    SwiGLU output rounded to x's dtype once (after its routing weight). No host sync: CUDA-graph and
    torch.compile safe. tiles: {"gate_up": {...}, "down": {...}}, entries that replace DENSE_TILES'."""
    if not (x.is_contiguous() and gate_up.is_contiguous() and down.is_contiguous()):
        raise ValueError("dense_experts takes contiguous x, gate_up and down")
    tiles = tiles or {}
    wd = wd.float().contiguous()
    return dense_down(dense_gate_up(x, wd, gate_up, tiles.get("gate_up")), wd, down, tiles.get("down"))


def _rows(cfg: dict, N: int) -> tuple[int, int]:
    bm = cfg["BM"] or max(16, min(128, triton.next_power_of_2(N)))
    return bm, cfg["warps"] or (8 if bm >= 128 else 4)


def dense_gate_up(x: torch.Tensor, wd: torch.Tensor, gate_up: torch.Tensor, tile: dict | None = None) -> torch.Tensor:
    """dense_experts' first kernel (contiguous operands, wd fp32): -> a [E, N, I], each expert's SwiGLU output
    times its routing weight. tile: entries that replace DENSE_TILES["gate_up"]'s."""
    cfg = dict(DENSE_TILES["gate_up"], **(tile or {}))
    N, D = x.shape
    E, I2, _ = gate_up.shape
    I = I2 // 2
    bm, warps = _rows(cfg, N)
    a = torch.empty(E, N, I, device=x.device, dtype=x.dtype)
    _dense_gate_up_kernel[(triton.cdiv(N, bm), triton.cdiv(I, cfg["BI"]), E)](
        x, gate_up, wd, a, N, D, I, E, BM=bm, BI=cfg["BI"], BK=cfg["BK"], KD=triton.cdiv(D, cfg["BK"]),
        IEEE=x.dtype == torch.float32, num_warps=warps, num_stages=cfg["stages"])
    return a


def dense_down(a: torch.Tensor, wd: torch.Tensor, down: torch.Tensor, tile: dict | None = None) -> torch.Tensor:
    """dense_experts' second kernel and the sum of its partials: a [E, N, I] -> [N, D] in a's dtype. tile: entries
    that replace DENSE_TILES["down"]'s."""
    cfg = dict(DENSE_TILES["down"], **(tile or {}))
    E, N, I = a.shape
    D = down.shape[1]
    splits = max(1, min(cfg["SPLITS"], E))
    bm, warps = _rows(cfg, N)
    p = torch.empty(splits, N, D, device=a.device, dtype=torch.float32)
    _dense_down_kernel[(triton.cdiv(N, bm), triton.cdiv(D, cfg["BD"]), splits)](
        a, down, wd, p, N, D, I, E, PER=triton.cdiv(E, splits), BM=bm, BD=cfg["BD"], BK=cfg["BK"],
        KI=triton.cdiv(I, cfg["BK"]), IEEE=a.dtype == torch.float32, num_warps=warps,
        num_stages=cfg["stages"])
    out = torch.empty(N, D, device=a.device, dtype=a.dtype)
    _split_sum_kernel[(triton.cdiv(N * D, SUM_BLOCK),)](p, out, N * D, S=splits, BLOCK=SUM_BLOCK, num_warps=4)
    return out
