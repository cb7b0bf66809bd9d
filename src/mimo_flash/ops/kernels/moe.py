"""The MoE's data movement on CUDA (ops/moe.py): the counting sort of (token, slot) pairs by expert, and the
gather-sum that dispatches tokens to their pairs and combines the pairs' outputs."""

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
