"""Triton kernels for one-token decoding of a single sequence: few, bandwidth-bound kernels per layer. This file:
the helpers every kernel shares (_gemv, _fp8_x, _last, the PDL calls), the projections, the attention and the
step's tables; the MLP half of a layer (router, gate/up, down) is generation/mlp_kernels.py. The rounding rules
stated here hold for both.

At batch 1 a decode step reads every weight once and does almost no arithmetic, so its time is the bytes
it reads plus a fixed cost per kernel and per chain of dependent loads. These kernels cut a decoder layer
to six launches, each a single pass over its weights:

    gemv_kernel     y = W @ rmsnorm(x) (+ residual): q/k/v (fused weight), o_proj (+ residual), a dense
                    MLP's gate/up, lm_head (+ the greedy token); the norm's sum of squares is gathered in
                    the same pass and applied at the end (y = rstd * W @ (weight * x))
    attn_kernel     RoPE on the new q and k, the value scale, the new k/v written to the cache, attention
                    over the cache split over programs (kv head x key range); the last program of each kv
                    head combines the splits and the sink into the head outputs
    router_kernel   (mlp_kernels.py) the router's fp32 logits; the last program takes the top-k (sigmoid
                    scores + correction bias, weights normalised and scaled as ops.moe.route with one group)
    gate_up_kernel  (mlp_kernels.py) the chosen experts' gate/up products and silu(gate) * up
    down_kernel     (mlp_kernels.py) the chosen experts' down products (or the dense MLP's, with its
                    silu(gate) * up), the routing weights and the residual add

attn_kernel and router_kernel read little; extra programs of theirs pull the weights of later kernels into L2.
The down kernel's programs load their experts' weights before their PDL wait, while gate/up still runs.

Speculative verification of T tokens (TritonStep.verify) reuses these kernels once per token, except that the
projections every token shares (q/k/v, o_proj, a dense MLP's gate/up and down, lm_head) go through
gemv_multi_kernel, which reads each weight tile once for the T tokens. An MTP layer's T draft columns
(TritonStep.draft) run the same way after mtp_input_kernel (the two norms of its input, its ring's tables);
attn_kernel skips the cache write of a masked column (HAS_WRITE).

"The last program" uses a counter per kernel: each program stores its part, then adds 1 to the counter;
the one that sees n - 1 reads every part (past L1) and resets the counter for the next launch.

FP8-resident weights (quant.FP8Linear / FP8Experts: float8_e4m3fn bytes + fp32 128x128 block scales) are read
as they are by gemv_kernel, gate_up_kernel and down_kernel (W_FP8): the bytes widen to fp32 in registers and
the input is multiplied by the scale of each 128-column block (_fp8_x); row tiles never straddle a 128-row
block, so a tile's scales are one row of the grid. Half the weight bytes of bf16 for the same pass.

Rounding: sums in fp32; projection outputs, the attention output, the activations and the residual stream
rounded to the model dtype where the PyTorch modules round them; the normalised inputs are not rounded
(the module rounds x * rstd and its product with the weight; here rstd is applied after the sum).
Tested against the modules in fp32 in Triton's CPU interpreter (tests/test_triton_decode.py; the
interpreter mishandles bf16 dots and roundings) and in bf16 on the GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _pdl_start(PDL: tl.constexpr):
    """Programmatic dependent launch: let the next kernel's programs start (they wait in _pdl_wait)."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def _pdl_wait(PDL: tl.constexpr):
    """Wait until the previous kernel has finished and its writes are visible. With PDL, a kernel reads
    before this only what no kernel of the step writes (weights, the RoPE tables, the position)."""
    if PDL:
        gdc_wait()


@triton.jit
def _last(counter_ptr, n):
    """Called once by each of n programs after its stores: True in the last to arrive (it resets the counter)."""
    tl.debug_barrier()  # every thread's stores come before the arrival
    last = tl.atomic_add(counter_ptr, 1, sem="acq_rel") == n - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0)
    tl.debug_barrier()
    return last


@triton.jit
def _fp8_x(x, s_ptr, cols, cmask, BLOCK_N: tl.constexpr):
    """x [BLOCK_K] (or [TOPK_PAD, BLOCK_K], one row per expert) fp32 times the block scales of its columns,
    s_ptr + cols // 128 (s_ptr: the scale row, or [TOPK_PAD, 1] of them). For a float8 weight tile
    q [BLOCK_N, BLOCK_K] (quant.blocks' format: W = q * s[row // 128, col // 128]) whose rows lie in one
    128-row block, sum_k q[n, k] * (s[k // 128] * x[k]) = (W x)[n]: one scale load per column, not per
    weight element. Along K the scale varies (BLOCK_K may span several 128-column blocks, the last one
    partial: masked columns load no scale)."""
    tl.static_assert(128 % BLOCK_N == 0)  # the host picks row tiles that never straddle a 128-row block
    return x * tl.load(s_ptr + cols // 128, mask=cmask, other=0.0)


@triton.jit
def _rms_row(src, nw_ptr, dst, eps, D: tl.constexpr, BLOCK: tl.constexpr):
    """dst [D] = nw * (x * rstd rounded to x's dtype), x = src [D]: rms_norm as the module rounds it."""
    ss = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, D, BLOCK):
        cols = k0 + tl.arange(0, BLOCK)
        x = tl.load(src + cols, mask=cols < D, other=0.0).to(tl.float32)
        ss += x * x
    rstd = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / D + eps)
    for k0 in range(0, D, BLOCK):
        cols = k0 + tl.arange(0, BLOCK)
        cmask = cols < D
        x = tl.load(src + cols, mask=cmask, other=0.0)
        xn = (x.to(tl.float32) * rstd).to(x.dtype).to(tl.float32)
        nw = tl.load(nw_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        tl.store(dst + cols, (nw * xn).to(dst.dtype.element_ty), mask=cmask)


@triton.jit
def _gemv(x_ptr, nw_ptr, w_ptr, s_ptr, rows, rmask, eps, D: tl.constexpr, HAS_NORM: tl.constexpr,
          W_FP8: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """[BLOCK_N] fp32: rows of W [*, D] times rmsnorm(x [D]) (times x when not HAS_NORM), in one pass.
    W_FP8: W is float8 with block scales; s_ptr points at the scale row [ceil(D/128)] of the rows' block (the
    rows lie in one: BLOCK_N divides 128 and they start at a multiple of it), see _fp8_x.
    The first weight block loads before _pdl_wait (x is the previous kernel's output)."""
    w_rows = w_ptr + rows[:, None].to(tl.int64) * D
    cols = tl.arange(0, BLOCK_K)
    w = tl.load(w_rows + cols[None, :], mask=rmask[:, None] & (cols < D)[None, :], other=0.0)
    _pdl_wait(PDL)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    ss = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in tl.static_range(0, D, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < D
        if k0 > 0:
            w = tl.load(w_rows + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        x = tl.load(x_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        if HAS_NORM:
            ss += x * x
            x = x * tl.load(nw_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        if W_FP8:
            x = _fp8_x(x, s_ptr, cols, cmask, BLOCK_N)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_NORM:
        y = y / tl.sqrt(tl.sum(ss, axis=0) / D + eps)
    return y


@triton.jit
def gemv_kernel(x_ptr, nw_ptr, w_ptr, s_ptr, out_ptr, res_ptr, xn_ptr, pmax_ptr, pidx_ptr, tok_ptr, counter_ptr,
                N, eps, s_stride, D: tl.constexpr, HAS_NORM: tl.constexpr, HAS_RES: tl.constexpr,
                WRITE_XN: tl.constexpr, ARGMAX: tl.constexpr, W_FP8: tl.constexpr, NPROG: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, PDL: tl.constexpr):
    """out [N] = W [N, D] @ rmsnorm(x [D]) (+ res [N]), rounded to out's dtype (res added to the rounded product
    and rounded again). W_FP8: W = q [N, D] float8 * s [ceil(N/128), ceil(D/128)] fp32 (row stride s_stride)
    per 128x128 block. WRITE_XN: program 0 also writes rmsnorm(x) to xn [D] (the hidden state after the
    final norm). ARGMAX: tok [1] (int64) = the first index of the largest rounded output, each program's
    best in pmax/pidx [NPROG], reduced by the last program in blocks of BLOCK_P."""
    _pdl_start(PDL)
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    dt = out_ptr.dtype.element_ty
    s_row = s_ptr + (pid * BLOCK_N // 128) * s_stride  # used only if W_FP8
    y = _gemv(x_ptr, nw_ptr, w_ptr, s_row, rows, rmask, eps, D, HAS_NORM, W_FP8, BLOCK_N, BLOCK_K, PDL).to(dt)
    if HAS_RES:
        y = (tl.load(res_ptr + rows, mask=rmask, other=0.0).to(tl.float32) + y.to(tl.float32)).to(dt)
    tl.store(out_ptr + rows, y, mask=rmask)
    if WRITE_XN:
        if pid == 0:
            _rms_row(x_ptr, nw_ptr, xn_ptr, eps, D, BLOCK_K)
    if ARGMAX:
        yf = tl.where(rmask, y.to(tl.float32), float("-inf"))
        best = tl.max(yf, axis=0)
        tl.store(pmax_ptr + pid, best)
        tl.store(pidx_ptr + pid, tl.min(tl.where(yf == best, rows, N), axis=0))
        if _last(counter_ptr, NPROG):
            vbest = tl.full([BLOCK_P], float("-inf"), tl.float32)
            ibest = tl.zeros([BLOCK_P], dtype=tl.int32) + N
            for p0 in range(0, NPROG, BLOCK_P):
                p = p0 + tl.arange(0, BLOCK_P)
                pm = p < NPROG
                v = tl.load(pmax_ptr + p, mask=pm, other=float("-inf"), cache_modifier=".cg")
                i = tl.load(pidx_ptr + p, mask=pm, other=N, cache_modifier=".cg")
                take = (v > vbest) | ((v == vbest) & (i < ibest))
                vbest = tl.where(take, v, vbest)
                ibest = tl.where(take, i, ibest)
            top = tl.max(vbest, axis=0)
            tl.store(tok_ptr, tl.min(tl.where(vbest == top, ibest, N), axis=0).to(tl.int64))


@triton.jit
def gemv_multi_kernel(x_ptr, nw_ptr, w_ptr, s_ptr, out_ptr, res_ptr, xn_ptr, N, eps, s_stride, x_stride, out_stride,
                      T: tl.constexpr,
                      T_PAD: tl.constexpr, D: tl.constexpr, HAS_NORM: tl.constexpr, HAS_RES: tl.constexpr,
                      WRITE_XN: tl.constexpr, GATED: tl.constexpr, W_FP8: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """gemv_kernel for T tokens of one sequence (speculative verification, MTP drafting): out [T, N] =
    rmsnorm(x [T, D]) @ W.T (+ res [T, N]), each weight tile loaded once for all T (a [T_PAD, BLOCK_N, BLOCK_K]
    accumulator: the host divides the tile by T_PAD); each token's norm and rounding as gemv_kernel's. Row
    strides: x_stride for x, out_stride for out and res; xn is [T, D] contiguous. WRITE_XN: program 0 also
    writes rmsnorm(x) to xn. GATED (a dense MLP's down projection, no norm): x [T, 2D] holds (gate, up) and the
    input is silu(gate) * up, rounded as down_kernel's. No PDL (these steps launch without it)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    t = tl.arange(0, T_PAD)
    tmask = t < T
    dt = out_ptr.dtype.element_ty
    s_row = s_ptr + (pid * BLOCK_N // 128) * s_stride  # used only if W_FP8 (rows lie in one 128-row block)
    w_rows = w_ptr + rows[:, None].to(tl.int64) * D
    acc = tl.zeros([T_PAD, BLOCK_N, BLOCK_K], dtype=tl.float32)
    ss = tl.zeros([T_PAD, BLOCK_K], dtype=tl.float32)
    for k0 in tl.static_range(0, D, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < D
        w = tl.load(w_rows + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        x = tl.load(x_ptr + t[:, None] * x_stride + cols[None, :], mask=tmask[:, None] & cmask[None, :],
                    other=0.0).to(tl.float32)
        if GATED:
            up = tl.load(x_ptr + t[:, None] * x_stride + D + cols[None, :], mask=tmask[:, None] & cmask[None, :],
                         other=0.0).to(tl.float32)
            x = (x * tl.sigmoid(x) * up).to(out_ptr.dtype.element_ty).to(tl.float32)
        if HAS_NORM:
            ss += x * x
            x = x * tl.load(nw_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if W_FP8:
            x = _fp8_x(x, s_row, cols[None, :], cmask[None, :], BLOCK_N)
        acc += w[None, :, :] * x[:, None, :]
    y = tl.sum(acc, axis=2)  # [T_PAD, BLOCK_N]
    if HAS_NORM:
        y = y / tl.sqrt(tl.sum(ss, axis=1) / D + eps)[:, None]
    y = y.to(dt)
    m2 = tmask[:, None] & rmask[None, :]
    if HAS_RES:
        y = (tl.load(res_ptr + t[:, None] * out_stride + rows[None, :], mask=m2, other=0.0).to(tl.float32)
             + y.to(tl.float32)).to(dt)
    tl.store(out_ptr + t[:, None] * out_stride + rows[None, :], y, mask=m2)
    if WRITE_XN:
        if pid == 0:  # (in a helper: its loop variables must not meet this kernel's x, of another dtype)
            for i in tl.static_range(T):
                _rms_row(x_ptr + i * x_stride, nw_ptr, xn_ptr + i * D, eps, D, BLOCK_K)


@triton.jit
def _rope_rows(ptr, d, cos, sin, rmask, ROT: tl.constexpr, DQK: tl.constexpr):
    """Head vectors at ptr [R, 1] (+ d) rotated NeoX style over dims [0, ROT) by cos/sin [BLOCK_D]; fp32."""
    half: tl.constexpr = ROT // 2
    x = tl.load(ptr + d[None, :], mask=rmask[:, None] & (d < DQK)[None, :], other=0.0).to(tl.float32)
    partner = tl.where(d < half, d + half, d - half)
    xp = tl.load(ptr + partner[None, :], mask=rmask[:, None] & (d < ROT)[None, :], other=0.0).to(tl.float32)
    rotated = tl.where((d < half)[None, :], -xp, xp)
    return tl.where((d < ROT)[None, :], x * cos[None, :] + rotated * sin[None, :], x)


@triton.jit
def _keys(k_head, v_head, tpos_ptr, tvalid_ptr, sl, d, dv, n_keys, DQK: tl.constexpr, DV: tl.constexpr):
    """A block of cache slots sl: keys [BLOCK_S, BLOCK_D], values [BLOCK_S, DV], positions, validity. Nothing
    here waits for the tables: unused slots hold zeros or old finite entries, masked out later."""
    smask = sl < n_keys
    kt = tl.load(k_head + sl[:, None] * DQK + d[None, :], mask=smask[:, None] & (d < DQK)[None, :], other=0.0)
    vt = tl.load(v_head + sl[:, None] * DV + dv[None, :], mask=smask[:, None], other=0.0)
    kp = tl.load(tpos_ptr + sl, mask=smask, other=0)
    kv = tl.load(tvalid_ptr + sl, mask=smask, other=0)
    return kt, vt, kp, kv


@triton.jit
def _attend(q, kt, vt, kp, kv, sl, m_i, l_i, acc, pos, slot, n_keys, window, scale):
    """Online-softmax update of (max, sum, acc) [BLOCK_R], [BLOCK_R], [BLOCK_R, DV] with one block of keys.
    A key is seen if valid, kpos <= pos, pos - kpos < window and it is not the new token's slot."""
    ok = (sl < n_keys) & (kv != 0) & (kp <= pos) & (pos - kp < window) & (sl != slot)
    s = tl.dot(q, tl.trans(kt)) * scale  # [BLOCK_R, BLOCK_S]
    s = tl.where(ok[None, :], s, -1.0e30)
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.where(ok[None, :], tl.exp(s - m_new[:, None]), 0.0)
    alpha = tl.exp(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
    return m_new, l_i, acc


@triton.jit
def _prefetch(a_ptr, a_n, b_ptr, b_n, c, dummy_ptr, CHUNK: tl.constexpr):
    """Pull chunk c (CHUNK elements) of the concatenation of regions a [a_n] and b [b_n] into L2, marked to
    stay (evict_last) for the next kernels. The sum is stored only if it is NaN: the loads are not dead code."""
    STEP: tl.constexpr = 4096
    na = tl.cdiv(a_n, CHUNK)
    in_a = c < na
    base = tl.where(in_a, c, c - na).to(tl.int64) * CHUNK
    n = tl.where(in_a, a_n, b_n)
    t = tl.zeros([STEP], dtype=tl.float32)
    for i in range(0, CHUNK, STEP):
        offs = base + i + tl.arange(0, STEP)
        m = offs < n
        xa = tl.load(a_ptr + offs, mask=m & in_a, other=0.0, eviction_policy="evict_last")
        xb = tl.load(b_ptr + offs, mask=m & (c >= na), other=0.0, eviction_policy="evict_last")
        t += xa.to(tl.float32) + xb.to(tl.float32)
    total = tl.sum(t, axis=0)
    tl.store(dummy_ptr, total, mask=total != total)


@triton.jit
def attn_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, tpos_ptr, tvalid_ptr, sink_ptr, o_ptr,
                acc_ptr, m_ptr, l_ptr, counter_ptr, n_keys, n_slots, window, scale, v_scale,
                H: tl.constexpr, HKV: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr, ROT: tl.constexpr,
                RING: tl.constexpr, HAS_SINK: tl.constexpr, NS: tl.constexpr, NS_PAD: tl.constexpr,
                REP_PAD: tl.constexpr, SPLIT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_S: tl.constexpr, PDL: tl.constexpr, pfa_ptr, pfa_n, pfb_ptr, pfb_n, dummy_ptr,
                PF_CHUNK: tl.constexpr, write_ptr, HAS_WRITE: tl.constexpr):
    """One new token of one sequence against its cache: program (g, sp) = kv head g, keys [sp*SPLIT, +SPLIT).

    qkv [H*DQK + HKV*DQK + HKV*DV]: the new token's projections. RoPE (NeoX style over dims [0, ROT), the
    cos/sin rows of pos) on its q and k, the value scale on its v; the cache k [HKV, n_slots, DQK],
    v [HKV, n_slots, DV]; the token's slot: pos % n_slots (RING) or pos. The slot tables tpos/tvalid
    [n_slots] already hold the token (the step's table update ran first); keys [0, n_keys) are read. The
    new key and value come from registers (program sp = 0 writes them to the cache; every program skips
    that slot). Output o [H*DV] in the model dtype: softmax over the seen keys and the sink (a term
    exp(sink_h) of the denominator). With NS > 1 the split states (unnormalised acc [NS, H, DV], max m
    and sum l [NS, H], fp32) meet in the last program of each kv head.
    Programs (g >= HKV, sp) pull the next kernels' weights into L2 meanwhile (_prefetch of pfa, then pfb):
    attention reads little, and the GPU would idle.
    HAS_WRITE: the new key and value go to the cache only if write[0] != 0 (an MTP draft's masked column: it
    changes nothing; its output is not read).
    """
    _pdl_start(PDL)
    g = tl.program_id(0)
    sp = tl.program_id(1)
    if g >= HKV:
        _prefetch(pfa_ptr, pfa_n, pfb_ptr, pfb_n, (g - HKV) * NS + sp, dummy_ptr, PF_CHUNK)
    else:
        REP: tl.constexpr = H // HKV
        r = tl.arange(0, BLOCK_R)
        rmask = r < REP
        head = g * REP + r
        d = tl.arange(0, BLOCK_D)
        dmask = d < DQK
        dv = tl.arange(0, DV)
        dt = k_ptr.dtype.element_ty
        k_head = k_ptr + g.to(tl.int64) * n_slots * DQK
        v_head = v_ptr + g.to(tl.int64) * n_slots * DV
        # before the wait: what no kernel of this step writes (old cache entries, tables, RoPE rows, position)
        pos = tl.load(pos_ptr)
        if RING:
            slot = pos % n_slots
        else:
            slot = pos
        c = tl.load(cos_ptr + pos * ROT + d, mask=d < ROT, other=1.0).to(tl.float32)
        sn = tl.load(sin_ptr + pos * ROT + d, mask=d < ROT, other=0.0).to(tl.float32)
        sl0 = sp * SPLIT + tl.arange(0, BLOCK_S)
        kt, vt, kp, kv = _keys(k_head, v_head, tpos_ptr, tvalid_ptr, sl0, d, dv, n_keys, DQK, DV)
        rr = tl.arange(0, REP_PAD)
        hh = g * REP + rr
        rm = rr < REP
        sink = tl.zeros([REP_PAD], dtype=tl.float32)
        if HAS_SINK:
            sink = tl.load(sink_ptr + hh, mask=rm, other=0.0).to(tl.float32)
        _pdl_wait(PDL)
        q = _rope_rows(qkv_ptr + head[:, None] * DQK, d, c, sn, rmask, ROT, DQK).to(dt)
        # the new key, the same in every row (rows keep the shapes of q; row 0 is stored)
        k_new = _rope_rows(qkv_ptr + H * DQK + g * DQK + r[:, None] * 0, d, c, sn, r >= 0, ROT, DQK).to(dt)
        v_new = (tl.load(qkv_ptr + H * DQK + HKV * DQK + g * DV + dv).to(tl.float32) * v_scale).to(dt)  # [DV]
        if sp == 0:
            ok = tl.full([], 1, tl.int32)
            if HAS_WRITE:
                ok = tl.load(write_ptr).to(tl.int32)
            tl.store(k_head + slot * DQK + r[:, None] * 0 + d[None, :], k_new,
                     mask=(r == 0)[:, None] & dmask[None, :] & (ok != 0))
            tl.store(v_head + slot * DV + dv, v_new, mask=(dv >= 0) & (ok != 0))
        first = sp == 0
        s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32), axis=1) * scale  # [BLOCK_R]
        m_i = tl.where(first, s_new, -1.0e30)
        l_i = tl.where(first, 1.0, 0.0) + tl.zeros([BLOCK_R], dtype=tl.float32)
        acc = tl.where(first, 1.0, 0.0) * v_new.to(tl.float32)[None, :] + tl.zeros([BLOCK_R, DV], dtype=tl.float32)
        m_i, l_i, acc = _attend(q, kt, vt, kp, kv, sl0, m_i, l_i, acc, pos, slot, n_keys, window, scale)
        for j in range(BLOCK_S, SPLIT, BLOCK_S):
            sl = sp * SPLIT + j + tl.arange(0, BLOCK_S)
            kt, vt, kp, kv = _keys(k_head, v_head, tpos_ptr, tvalid_ptr, sl, d, dv, n_keys, DQK, DV)
            m_i, l_i, acc = _attend(q, kt, vt, kp, kv, sl, m_i, l_i, acc, pos, slot, n_keys, window, scale)
        if NS > 1:  # hand this split's state over; the last program of kv head g combines them all
            tl.store(acc_ptr + (sp * H + head)[:, None] * DV + dv[None, :], acc, mask=rmask[:, None])
            tl.store(m_ptr + sp * H + head, m_i, mask=rmask)
            tl.store(l_ptr + sp * H + head, l_i, mask=rmask)
            if _last(counter_ptr + g, NS):
                t = tl.arange(0, NS_PAD)
                tm = (t < NS)[:, None] & rm[None, :]
                ms = tl.load(m_ptr + t[:, None] * H + hh[None, :], mask=tm, other=-1.0e30, cache_modifier=".cg")
                ls = tl.load(l_ptr + t[:, None] * H + hh[None, :], mask=tm, other=0.0, cache_modifier=".cg")
                mx = tl.max(ms, axis=0)  # [REP_PAD]
                w = tl.exp(ms - mx[None, :])  # [NS_PAD, REP_PAD]
                a = tl.load(acc_ptr + (t[:, None, None] * H + hh[None, :, None]) * DV + dv[None, None, :],
                            mask=tm[:, :, None], other=0.0, cache_modifier=".cg")
                _finish(tl.sum(a * w[:, :, None], axis=0), mx, tl.sum(w * ls, axis=0), sink, o_ptr, hh, rm, dv, HAS_SINK,
                        DV)
        else:
            # rows of the head block (BLOCK_R) and of the sink (REP_PAD) differ in size: spread the sink over rows
            sink_rows = tl.sum(tl.where(r[:, None] == rr[None, :], sink[None, :], 0.0), axis=1)
            _finish(acc, m_i, l_i, sink_rows, o_ptr, head, rmask, dv, HAS_SINK, DV)


@triton.jit
def _finish(acc, m_i, l_i, sink, o_ptr, head, rmask, dv, HAS_SINK: tl.constexpr, DV: tl.constexpr):
    """o[head] = acc / (l + exp(sink - m)) in o's dtype (acc and l relative to the running max m; sink per row)."""
    den = l_i
    if HAS_SINK:
        mx = tl.maximum(m_i, sink)
        scale = tl.exp(m_i - mx)
        den = l_i * scale + tl.exp(sink - mx)
        acc = acc * scale[:, None]
    o = acc / tl.maximum(den, 1.0e-38)[:, None]
    tl.store(o_ptr + head[:, None] * DV + dv[None, :], o.to(o_ptr.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def tables_kernel(ids_ptr, emb_ptr, x_ptr, pos_ptr, fvalid_ptr, svalid_ptr, spos_ptr, n_ring, D: tl.constexpr,
                  BLOCK: tl.constexpr, HAS_FULL: tl.constexpr, HAS_RING: tl.constexpr, PDL: tl.constexpr):
    """The start of a one-token step: x [D] = the embedding row of ids[0]; the slot tables as KVCache.step
    for one row (the full layers' slot pos becomes valid; the ring's slot pos % n_ring becomes valid and
    holds position pos)."""
    _pdl_start(PDL)
    _pdl_wait(PDL)
    row = emb_ptr + tl.load(ids_ptr).to(tl.int64) * D
    for k0 in range(0, D, BLOCK):
        cols = k0 + tl.arange(0, BLOCK)
        tl.store(x_ptr + cols, tl.load(row + cols, mask=cols < D), mask=cols < D)
    pos = tl.load(pos_ptr)
    if HAS_FULL:
        tl.store(fvalid_ptr + pos, 1)
    if HAS_RING:
        slot = pos % n_ring
        tl.store(svalid_ptr + slot, 1)
        tl.store(spos_ptr + slot, pos)


@triton.jit
def mtp_input_kernel(ids_ptr, emb_ptr, h_ptr, enw_ptr, hnw_ptr, out_ptr, valid_ptr, pos_ptr, svalid_ptr, spos_ptr,
                     n_ring, eps, h_stride, D: tl.constexpr, BLOCK: tl.constexpr):
    """The start of an MTP layer over T columns of one sequence (speculative drafting). Program (t, 0):
    out[t, :D] = enorm(the embedding row of ids[t]), and, if valid[t], the one-token table rule of tables_kernel
    for position pos[t] in the layer's ring (a masked column changes nothing in the cache); program (t, 1):
    out[t, D:] = hnorm(h[t]) (row stride h_stride). Both norms rounded as the module rounds them (_rms_row):
    their concatenation is eh_proj's input as it is."""
    t = tl.program_id(0)
    if tl.program_id(1) == 0:
        _rms_row(emb_ptr + tl.load(ids_ptr + t).to(tl.int64) * D, enw_ptr, out_ptr + t * (2 * D), eps, D, BLOCK)
        if tl.load(valid_ptr + t) != 0:
            pos = tl.load(pos_ptr + t)
            slot = pos % n_ring
            tl.store(svalid_ptr + slot, 1)
            tl.store(spos_ptr + slot, pos)
    else:
        _rms_row(h_ptr + t * h_stride, hnw_ptr, out_ptr + t * (2 * D) + D, eps, D, BLOCK)


@triton.jit
def probe_kernel(x_ptr, PDL: tl.constexpr):
    """x[0] += 1 after the previous kernel (checks that launches with PDL run, and are captured in order)."""
    _pdl_start(PDL)
    _pdl_wait(PDL)
    tl.store(x_ptr, tl.load(x_ptr) + 1)
