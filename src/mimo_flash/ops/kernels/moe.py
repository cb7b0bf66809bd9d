"""The MoE's kernels on CUDA (ops/moe.py): the counting sort of (token, slot) pairs by expert, the gather-sum that
dispatches tokens to their pairs and combines the pairs' outputs, and the experts' grouped products over sorted pairs
(the expert products of batched decode steps are kernels/decode_experts.py's)."""

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
