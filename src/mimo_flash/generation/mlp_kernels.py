"""The MLP half of a decoder layer in the batch-1 Triton step (generation/kernels.py: what these kernels share
with the others, the rounding rules, FP8 weights): router_kernel (the router's fp32 logits; the last program takes
the top-k), gate_up_kernel (the chosen experts' gate/up products and silu(gate) * up) and down_kernel (the chosen
experts' down products, or the dense MLP's, the routing weights and the residual add). Launched by
generation/triton_step.py."""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels import _fp8_x, _gemv, _last, _pdl_start, _pdl_wait, _prefetch


@triton.jit
def router_kernel(h_ptr, nw_ptr, w_ptr, bias_ptr, logits_ptr, sel_ptr, wt_ptr, counter_ptr, eps, scaling,
                  E: tl.constexpr, E_PAD: tl.constexpr, TOPK: tl.constexpr, NORM_TOPK: tl.constexpr,
                  D: tl.constexpr, NPROG: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  PDL: tl.constexpr, pfa_ptr, pfa_n, pfb_ptr, pfb_n, dummy_ptr, PF_CHUNK: tl.constexpr):
    """logits [E] = W_r [E, D] (fp32) @ rmsnorm(h); then, in the last program, sel [TOPK] (int32) = the experts
    with the largest sigmoid(logit) + bias, best first (ties: lower index), and wt [TOPK] their sigmoid
    scores (divided by their sum if NORM_TOPK) times `scaling`. Programs from NPROG on pull the next layer's
    weights into L2 meanwhile (_prefetch of pfa, then pfb)."""
    _pdl_start(PDL)
    pid = tl.program_id(0)
    if pid >= NPROG:
        _prefetch(pfa_ptr, pfa_n, pfb_ptr, pfb_n, pid - NPROG, dummy_ptr, PF_CHUNK)
    else:
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < E
        ar = tl.arange(0, E_PAD)
        emask = ar < E
        bias = tl.load(bias_ptr + ar, mask=emask, other=0.0).to(tl.float32)
        y = _gemv(h_ptr, nw_ptr, w_ptr, w_ptr, rows, rmask, eps, D, True, False, BLOCK_N, BLOCK_K, PDL)
        tl.store(logits_ptr + rows, y, mask=rmask)
        if _last(counter_ptr, NPROG):
            score = tl.sigmoid(tl.load(logits_ptr + ar, mask=emask, other=0.0, cache_modifier=".cg"))
            choice = tl.where(emask, score + bias, float("-inf"))
            # rank of each expert: how many beat it (higher choice, or equal choice and lower index)
            beats = (choice[None, :] > choice[:, None]) | ((choice[None, :] == choice[:, None])
                                                           & (ar[None, :] < ar[:, None]))
            rank = tl.sum(beats.to(tl.int32), axis=1)  # [E_PAD]
            rank = tl.where(emask, rank, E_PAD)
            picked = rank < TOPK
            wsum = tl.sum(tl.where(picked, score, 0.0), axis=0)
            # slot j (column) holds the expert whose rank is j
            hit = rank[:, None] == ar[None, :]  # [E_PAD (expert), E_PAD (slot)]
            sel = tl.sum(tl.where(hit, ar[:, None], 0), axis=0)
            wt = tl.sum(tl.where(hit, score[:, None], 0.0), axis=0)
            if NORM_TOPK:
                wt = wt / (wsum + 1e-20)
            tl.store(sel_ptr + ar, sel, mask=ar < TOPK)
            tl.store(wt_ptr + ar, wt * scaling, mask=ar < TOPK)


@triton.jit
def gate_up_kernel(h_ptr, nw_ptr, sel_ptr, w_ptr, s_ptr, act_ptr, eps, s_stride_e, s_stride_r, I: tl.constexpr,
                   D: tl.constexpr, W_FP8: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   PDL: tl.constexpr, DOWN_EARLY: tl.constexpr):
    """Program (s, b): act[s, rows] = silu(gate) * up, where (gate, up) = gate_up[sel[s]] [2I, D] @ rmsnorm(h)
    at rows and I + rows, rows = [b*BLOCK_N, +BLOCK_N); gate, up and act each rounded to the model dtype.
    W_FP8: gate_up = q [E, 2I, D] float8 * s [E, ceil(2I/128), ceil(D/128)] (strides s_stride_e, s_stride_r)
    per 128x128 block; I a multiple of BLOCK_N, so that the up rows too lie in one 128-row block.
    DOWN_EARLY: the programs let the next kernel start only after their PDL wait, so that the router's output
    is visible to it before its own wait (down_kernel's EARLY)."""
    if not DOWN_EARLY:
        _pdl_start(PDL)
    s = tl.program_id(0)
    b = tl.program_id(1)
    rows = b * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < I
    _pdl_wait(PDL)
    if DOWN_EARLY:
        _pdl_start(PDL)  # only now: the down kernel reads the router's output before its wait
    e = tl.load(sel_ptr + s).to(tl.int64)
    base = w_ptr + e * (2 * I * D)
    if W_FP8:
        tl.static_assert(I % BLOCK_N == 0)
    s_gate = s_ptr + e * s_stride_e + (b * BLOCK_N // 128) * s_stride_r  # used only if W_FP8
    s_up = s_ptr + e * s_stride_e + ((I + b * BLOCK_N) // 128) * s_stride_r
    acc_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    ss = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < D
        m2 = rmask[:, None] & cmask[None, :]
        wg = tl.load(base + rows[:, None] * D + cols[None, :], mask=m2, other=0.0, eviction_policy="evict_first")
        wu = tl.load(base + (rows + I)[:, None] * D + cols[None, :], mask=m2, other=0.0,
                     eviction_policy="evict_first")
        x = tl.load(h_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        ss += x * x
        x = x * tl.load(nw_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        if W_FP8:
            acc_g += wg.to(tl.float32) * _fp8_x(x, s_gate, cols, cmask, BLOCK_N)[None, :]
            acc_u += wu.to(tl.float32) * _fp8_x(x, s_up, cols, cmask, BLOCK_N)[None, :]
        else:
            acc_g += wg.to(tl.float32) * x[None, :]
            acc_u += wu.to(tl.float32) * x[None, :]
    rstd = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / D + eps)
    dt = act_ptr.dtype.element_ty
    g = (tl.sum(acc_g, axis=1) * rstd).to(dt).to(tl.float32)
    u = (tl.sum(acc_u, axis=1) * rstd).to(dt).to(tl.float32)
    tl.store(act_ptr + s * I + rows, (g * tl.sigmoid(g) * u).to(dt), mask=rmask)


@triton.jit
def down_kernel(gu_ptr, sel_ptr, wt_ptr, w_ptr, s_ptr, res_ptr, out_ptr, D, s_stride_e, s_stride_r,
                TOPK: tl.constexpr, TOPK_PAD: tl.constexpr, I: tl.constexpr, GATED: tl.constexpr,
                W_FP8: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
                EARLY: tl.constexpr):
    """out [D] = res + sum_s wt[s] * down[sel[s]] [D, I] @ act_s: with GATED, gu [TOPK, 2I] holds (gate, up) and
    act_s = silu(gate_s) * up_s; else gu [TOPK, I] holds act_s (gate_up_kernel's output).
    W_FP8: down = q [E, D, I] float8 * s [E, ceil(D/128), ceil(I/128)] (strides s_stride_e, s_stride_r) per
    128x128 block (a dense MLP: E = 1).

    All TOPK products of a row block load as one tile. Each product is rounded to the model dtype before its
    fp32 weighting, the sum once more before the residual add (as the expert path does; a dense MLP is
    TOPK = 1 with weight 1).
    EARLY: sel, wt and the first weight block load before the PDL wait, so the weights stream in while the
    gate/up kernel ends (the router wrote sel and wt two kernels back; gate_up_kernel's DOWN_EARLY keeps this
    kernel from starting before that is visible; a dense MLP's are constants). After experts (not GATED), res
    (h, written three kernels back) too."""
    _pdl_start(PDL)
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < D
    s = tl.arange(0, TOPK_PAD)
    smask = s < TOPK
    dt = out_ptr.dtype.element_ty
    RES_EARLY: tl.constexpr = EARLY and not GATED  # a dense MLP's h comes from the kernel just before
    if not EARLY:
        _pdl_wait(PDL)
    e = tl.load(sel_ptr + s, mask=smask, other=0, cache_modifier=".cg").to(tl.int64)
    base = w_ptr + e * D * I
    s_rows = s_ptr + e * s_stride_e + (pid * BLOCK_N // 128) * s_stride_r  # [TOPK_PAD]; used only if W_FP8
    ws = tl.load(wt_ptr + s, mask=smask, other=0.0, cache_modifier=".cg").to(tl.float32)
    cols = tl.arange(0, BLOCK_K)
    w = tl.load(base[:, None, None] + rows[None, :, None] * I + cols[None, None, :],
                mask=smask[:, None, None] & rmask[None, :, None] & (cols < I)[None, None, :], other=0.0,
                eviction_policy="evict_first")
    if RES_EARLY:
        res = tl.load(res_ptr + rows, mask=rmask, other=0.0, cache_modifier=".cg").to(tl.float32)
    if EARLY:
        _pdl_wait(PDL)
    acc = tl.zeros([TOPK_PAD, BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in tl.static_range(0, I, BLOCK_K):  # unrolled (2 us a step); 32 blocks for the flash dense MLP
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < I
        m2 = smask[:, None] & cmask[None, :]
        if GATED:
            gt = tl.load(gu_ptr + s[:, None] * (2 * I) + cols[None, :], mask=m2, other=0.0).to(tl.float32)
            up = tl.load(gu_ptr + s[:, None] * (2 * I) + I + cols[None, :], mask=m2, other=0.0).to(tl.float32)
            a = (gt * tl.sigmoid(gt) * up).to(dt).to(tl.float32)  # [TOPK_PAD, BLOCK_K]
        else:
            a = tl.load(gu_ptr + s[:, None] * I + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        if W_FP8:
            a = _fp8_x(a, s_rows[:, None], cols[None, :], m2, BLOCK_N)
        if k0 > 0:
            w = tl.load(base[:, None, None] + rows[None, :, None] * I + cols[None, None, :],
                        mask=smask[:, None, None] & rmask[None, :, None] & cmask[None, None, :], other=0.0,
                        eviction_policy="evict_first")
        acc += w.to(tl.float32) * a[:, None, :]
    y = tl.sum(acc, axis=2).to(dt).to(tl.float32)  # [TOPK_PAD, BLOCK_N]
    total = tl.sum(y * ws[:, None], axis=0).to(dt).to(tl.float32)
    if not RES_EARLY:
        res = tl.load(res_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, (res + total).to(dt), mask=rmask)
