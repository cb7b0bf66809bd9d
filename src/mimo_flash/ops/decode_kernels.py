"""Triton kernels for one-token decoding of a single sequence: few, bandwidth-bound kernels per layer.

At batch 1 a decode step reads every weight once and does almost no arithmetic, so its time is the bytes
it reads plus a fixed cost per kernel. These kernels cut a decoder layer to five or six launches:

    norm_gemv      y = W @ rmsnorm(x)           q/k/v (fused weight), the router (fp32 weight), a dense
                                                 MLP's gate/up, lm_head; the norm is recomputed per program
    attn_decode    RoPE on the new q and k, the value scale, the new k/v written to the cache, and attention
                   over the cache (flash-decoding: programs = kv heads x key splits, partial softmax states)
    o_proj         combines the split states with the sink, o_proj, and the residual add
    moe_gate_up    the router's top-k (from its logits, recomputed per program) and the chosen experts'
                   gate/up products
    down           silu(gate) * up, the down products of the chosen experts (or the dense MLP), the routing
                   weights and the residual add

Rounding follows the PyTorch path: products accumulate in fp32 and are rounded to the model dtype where
the PyTorch modules round (normalised input, projection outputs, residual adds). Each kernel is tested
against the modules in fp32 in Triton's CPU interpreter (tests/test_triton_decode.py; the interpreter
mishandles bf16 dots and roundings) and in bf16 on the GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rstd(x_ptr, eps, D: tl.constexpr, BLOCK_K: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps) of the vector x [D], in fp32."""
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        acc += x * x
    return 1.0 / tl.sqrt(tl.sum(acc, axis=0) / D + eps)


@triton.jit
def _normed(x_ptr, nw_ptr, cols, cmask, rstd, HAS_NORM: tl.constexpr):
    """RMSNorm of x at `cols` as the module computes it: (x * rstd) rounded to x's dtype, times the weight,
    rounded again; returned in fp32."""
    x = tl.load(x_ptr + cols, mask=cmask, other=0.0)
    if HAS_NORM:
        xn = (x.to(tl.float32) * rstd).to(x.dtype).to(tl.float32)
        w = tl.load(nw_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        return (w * xn).to(x.dtype).to(tl.float32)
    return x.to(tl.float32)


@triton.jit
def norm_gemv_kernel(x_ptr, nw_ptr, w_ptr, out_ptr, xn_ptr, N, eps,
                     D: tl.constexpr, HAS_NORM: tl.constexpr, WRITE_XN: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out [N] = W [N, D] @ rmsnorm(x [D]) (fp32 sums, rounded to out's dtype). WRITE_XN: program 0 also
    writes the normalised x to xn [D] (the hidden state after the final norm)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    rstd = 1.0
    if HAS_NORM:
        rstd = _rstd(x_ptr, eps, D, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < D
        xn = _normed(x_ptr, nw_ptr, cols, cmask, rstd, HAS_NORM)
        if WRITE_XN:
            if pid == 0:
                tl.store(xn_ptr + cols, xn.to(xn_ptr.dtype.element_ty), mask=cmask)
        w = tl.load(w_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                    other=0.0)
        acc += w.to(tl.float32) * xn[None, :]
    y = tl.sum(acc, axis=1)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _rope(ptr, d, pos, cos_ptr, sin_ptr, rmask, ROT: tl.constexpr, DQK: tl.constexpr):
    """Rows of head vectors at ptr [R, DQK] (row stride DQK) loaded at dims d [BLOCK_D] and rotated NeoX style
    over dims [0, ROT) with the cos/sin rows of `pos` (tables [*, ROT]); fp32 [R, BLOCK_D]."""
    dmask = d < DQK
    x = tl.load(ptr + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    half: tl.constexpr = ROT // 2
    rmask_rot = d < ROT
    partner = tl.where(d < half, d + half, d - half)
    xp = tl.load(ptr + partner[None, :], mask=rmask[:, None] & rmask_rot[None, :], other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + pos * ROT + d, mask=rmask_rot, other=1.0).to(tl.float32)
    s = tl.load(sin_ptr + pos * ROT + d, mask=rmask_rot, other=0.0).to(tl.float32)
    rotated = tl.where((d < half)[None, :], -xp, xp)
    return tl.where(rmask_rot[None, :], x * c[None, :] + rotated * s[None, :], x)


@triton.jit
def attn_decode_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, tpos_ptr, tvalid_ptr,
                       acc_ptr, m_ptr, l_ptr, n_keys, n_slots, window, scale, v_scale,
                       H: tl.constexpr, HKV: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
                       ROT: tl.constexpr, RING: tl.constexpr, SPLIT: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """One new token of one sequence against its cache: program (g, sp) = kv head g, keys [sp*SPLIT, +SPLIT).

    qkv [H*DQK + HKV*DQK + HKV*DV]: the projections of the new token. The cache k [HKV, n_slots, DQK],
    v [HKV, n_slots, DV]; slot of the new token: pos % n_slots (RING) or pos. The slot tables tpos/tvalid
    [n_slots] already hold the new token (the step's table update ran first). Keys [0, n_keys) are read.
    A key is seen if valid, kpos <= pos and pos - kpos < window; the new token's own slot is taken from
    registers (program sp = 0 writes it to the cache; other programs skip that slot).
    Writes the unnormalised partial state of each query head: acc [NS, H, DV], max m [NS, H], sum l [NS, H]
    (fp32, natural-log domain); o_proj_kernel combines the splits and the sink.
    """
    g = tl.program_id(0)
    sp = tl.program_id(1)
    REP: tl.constexpr = H // HKV
    pos = tl.load(pos_ptr)
    if RING:
        slot = pos % n_slots
    else:
        slot = pos
    r = tl.arange(0, BLOCK_R)
    rmask = r < REP
    d = tl.arange(0, BLOCK_D)
    dmask = d < DQK
    dv = tl.arange(0, DV)
    dt = k_ptr.dtype.element_ty
    q = _rope(qkv_ptr + (g * REP + r)[:, None] * DQK, d, pos, cos_ptr, sin_ptr, rmask, ROT, DQK).to(dt)
    # the new key, the same in every row (rows keep the shapes of q; row 0 is stored)
    k_new = _rope(qkv_ptr + H * DQK + g * DQK + r[:, None] * 0, d, pos, cos_ptr, sin_ptr, r >= 0, ROT, DQK).to(dt)
    v_new = (tl.load(qkv_ptr + H * DQK + HKV * DQK + g * DV + dv).to(tl.float32) * v_scale).to(dt)  # [DV]
    k_head = k_ptr + g.to(tl.int64) * n_slots * DQK
    v_head = v_ptr + g.to(tl.int64) * n_slots * DV
    if sp == 0:
        tl.store(k_head + slot * DQK + r[:, None] * 0 + d[None, :], k_new, mask=(r == 0)[:, None] & dmask[None, :])
        tl.store(v_head + slot * DV + dv, v_new)
    s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32), axis=1) * scale  # [BLOCK_R]
    first = sp == 0
    m_i = tl.where(first, s_new, -1.0e30)
    l_i = tl.where(first, 1.0, 0.0) + tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.where(first, 1.0, 0.0) * v_new.to(tl.float32)[None, :] + tl.zeros([BLOCK_R, DV], dtype=tl.float32)
    for j in range(0, SPLIT, BLOCK_S):
        sl = sp * SPLIT + j + tl.arange(0, BLOCK_S)
        smask = sl < n_keys
        kp = tl.load(tpos_ptr + sl, mask=smask, other=0)
        kv = tl.load(tvalid_ptr + sl, mask=smask, other=0)
        ok = smask & (kv != 0) & (kp <= pos) & (pos - kp < window) & (sl != slot)
        kt = tl.load(k_head + sl[:, None] * DQK + d[None, :], mask=ok[:, None] & dmask[None, :], other=0.0)
        s = tl.dot(q, tl.trans(kt)) * scale  # [BLOCK_R, BLOCK_S]
        s = tl.where(ok[None, :], s, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.where(ok[None, :], tl.exp(s - m_new[:, None]), 0.0)
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(v_head + sl[:, None] * DV + dv[None, :], mask=ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(dt), vt)
        m_i = m_new
    head = g * REP + r
    tl.store(acc_ptr + (sp * H + head)[:, None] * DV + dv[None, :], acc, mask=rmask[:, None])
    tl.store(m_ptr + sp * H + head, m_i, mask=rmask)
    tl.store(l_ptr + sp * H + head, l_i, mask=rmask)


@triton.jit
def o_proj_kernel(acc_ptr, m_ptr, l_ptr, sink_ptr, w_ptr, res_ptr, out_ptr, D,
                  NS: tl.constexpr, NS_PAD: tl.constexpr, H: tl.constexpr, DV: tl.constexpr,
                  HAS_SINK: tl.constexpr, BLOCK_N: tl.constexpr):
    """out [D] = res + W_o [D, H*DV] @ attention output, the output of each head combined from the NS split
    states of attn_decode_kernel with the sink as an extra term of the denominator (rounded to the model
    dtype, as the attention output is)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < D
    spl = tl.arange(0, NS_PAD)
    smask = spl < NS
    dv = tl.arange(0, DV)
    dt = out_ptr.dtype.element_ty
    total = tl.zeros([BLOCK_N, DV], dtype=tl.float32)
    for h in range(H):
        m = tl.load(m_ptr + spl * H + h, mask=smask, other=-1.0e30)
        lsum = tl.load(l_ptr + spl * H + h, mask=smask, other=0.0)
        mx = tl.max(m, axis=0)
        if HAS_SINK:
            sink = tl.load(sink_ptr + h).to(tl.float32)
            mx = tl.maximum(mx, sink)
        wgt = tl.exp(m - mx)
        den = tl.sum(wgt * lsum, axis=0)
        if HAS_SINK:
            den += tl.exp(sink - mx)
        a = tl.load(acc_ptr + (spl * H + h)[:, None] * DV + dv[None, :], mask=smask[:, None], other=0.0)
        o = (tl.sum(a * wgt[:, None], axis=0) / tl.maximum(den, 1.0e-38)).to(dt).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None] * (H * DV) + h * DV + dv[None, :], mask=rmask[:, None], other=0.0)
        total += w.to(tl.float32) * o[None, :]
    y = tl.sum(total, axis=1).to(dt).to(tl.float32)
    res = tl.load(res_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, (res + y).to(dt), mask=rmask)


@triton.jit
def moe_gate_up_kernel(h_ptr, nw_ptr, logits_ptr, bias_ptr, w_ptr, gu_ptr, sel_ptr, wt_ptr, eps, scaling,
                       E: tl.constexpr, E_PAD: tl.constexpr, TOPK: tl.constexpr, NORM_TOPK: tl.constexpr,
                       I: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (s, b): routing slot s, rows [b*BLOCK_N, +BLOCK_N) of the gate and of the up projection.

    Routing as ops.moe.route with one group: scores = sigmoid(logits [E]) (fp32), experts chosen by
    scores + bias, best first (ties: lower index), weights = their scores (normalised over the k when
    NORM_TOPK) * scaling. Every program recomputes it from the E logits; the programs of block 0 write
    the slot's expert and weight to sel [TOPK] / wt [TOPK]. gu [TOPK, 2I] = gate_up[e] [2I, D] @ rmsnorm(h).
    """
    s = tl.program_id(0)
    b = tl.program_id(1)
    ar = tl.arange(0, E_PAD)
    emask = ar < E
    score = tl.sigmoid(tl.load(logits_ptr + ar, mask=emask, other=0.0).to(tl.float32))
    choice = tl.where(emask, score + tl.load(bias_ptr + ar, mask=emask, other=0.0).to(tl.float32), float("-inf"))
    my_e = 0
    my_w = 0.0
    wsum = 0.0
    for j in tl.static_range(TOPK):
        best = tl.max(choice, axis=0)
        e_j = tl.min(tl.where(choice == best, ar, E_PAD), axis=0)
        w_j = tl.sum(tl.where(ar == e_j, score, 0.0), axis=0)
        wsum += w_j
        my_e = tl.where(s == j, e_j, my_e)
        my_w = tl.where(s == j, w_j, my_w)
        choice = tl.where(ar == e_j, float("-inf"), choice)
    if NORM_TOPK:
        my_w = my_w / (wsum + 1e-20)
    my_w = my_w * scaling
    if b == 0:
        tl.store(sel_ptr + s, my_e)
        tl.store(wt_ptr + s, my_w)
    rows = b * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < I
    base = w_ptr + my_e.to(tl.int64) * (2 * I * D)
    rstd = _rstd(h_ptr, eps, D, BLOCK_K)
    acc_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < D
        xn = _normed(h_ptr, nw_ptr, cols, cmask, rstd, True)
        m2 = rmask[:, None] & cmask[None, :]
        wg = tl.load(base + rows[:, None] * D + cols[None, :], mask=m2, other=0.0)
        wu = tl.load(base + (rows + I)[:, None] * D + cols[None, :], mask=m2, other=0.0)
        acc_g += wg.to(tl.float32) * xn[None, :]
        acc_u += wu.to(tl.float32) * xn[None, :]
    dt = gu_ptr.dtype.element_ty
    tl.store(gu_ptr + s * (2 * I) + rows, tl.sum(acc_g, axis=1).to(dt), mask=rmask)
    tl.store(gu_ptr + s * (2 * I) + I + rows, tl.sum(acc_u, axis=1).to(dt), mask=rmask)


@triton.jit
def down_kernel(gu_ptr, sel_ptr, wt_ptr, w_ptr, res_ptr, out_ptr, D,
                TOPK: tl.constexpr, I: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out [D] = res + sum_s wt[s] * down[sel[s]] [D, I] @ (silu(gate_s) * up_s), gu [TOPK, 2I] (gate, then up).

    Each product is rounded to the model dtype before its fp32 weighting, the sum once more before the
    residual add (as the expert path does; a dense MLP is TOPK = 1 with weight 1)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < D
    dt = out_ptr.dtype.element_ty
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for s in tl.static_range(TOPK):
        e = tl.load(sel_ptr + s).to(tl.int64)
        ws = tl.load(wt_ptr + s).to(tl.float32)
        base = w_ptr + e * D * I
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            cmask = cols < I
            gt = tl.load(gu_ptr + s * (2 * I) + cols, mask=cmask, other=0.0).to(tl.float32)
            up = tl.load(gu_ptr + s * (2 * I) + I + cols, mask=cmask, other=0.0).to(tl.float32)
            a = (gt * tl.sigmoid(gt) * up).to(dt).to(tl.float32)
            w = tl.load(base + rows[:, None] * I + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            acc += w.to(tl.float32) * a[None, :]
        total += tl.sum(acc, axis=1).to(dt).to(tl.float32) * ws
    res = tl.load(res_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, (res + total.to(dt).to(tl.float32)).to(dt), mask=rmask)


@triton.jit
def tables_kernel(pos_ptr, fvalid_ptr, svalid_ptr, spos_ptr, n_ring, HAS_FULL: tl.constexpr, HAS_RING: tl.constexpr):
    """The slot tables of a one-token step (KVCache.step for one row): the full layers' slot pos becomes
    valid; the ring's slot pos % n_ring becomes valid and holds position pos."""
    pos = tl.load(pos_ptr)
    if HAS_FULL:
        tl.store(fvalid_ptr + pos, 1)
    if HAS_RING:
        slot = pos % n_ring
        tl.store(svalid_ptr + slot, 1)
        tl.store(spos_ptr + slot, pos)
