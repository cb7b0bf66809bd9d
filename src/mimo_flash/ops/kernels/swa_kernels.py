"""The banded attention kernels of ops/kernels/swa_attention.py (which launches them): forward, dQ and dK/dV,
with their shared tile helpers (loads, the mask rule, scores) and RoPE's gradient in the backward's stores.

For queries and keys that are the same tokens (AttnMeta.aligned) whose positions rise by at
least one per token within a document, every key a query may see lies among the `window`
tokens ending at the query, so a query tile of BLOCK_M rows visits only the key tiles of
[m0 - window + 1, m0 + BLOCK_M). Within them the exact rule is applied per pair:
    k_pos <= q_pos, q_pos - k_pos < window, q_seg == k_seg.
Without a window (the full-attention layers) the same kernels visit every key tile up to the query's and
drop the window's test.
The sink starts each row's online softmax as if it were a key with score sink_h and no value
(running max = sink_h, running sum = 1), so the saved log-sum-exp already includes it.
Backward (FlashAttention-2 style, no atomics): one kernel per query tile for dQ, which first
computes and stores Delta = rowsum(dO * O) of its rows, then one per key tile for dK and dV
(looping over the query heads that share the kv head); with P = exp(S - lse),
dS = P * (dP - Delta), and d sink_h = -sum_i exp(sink_h - lse_i) Delta_i.
Head dims: Q/K dim = DA + DB with DA a power of two and DB a power of two or 0 (192 = 128 + 64),
V dim a power of two.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .launch import launcher


# ----------------------------------------------------------------------------------------- kernels
# Loops over the tiles of the band run as `range(lo, hi, BLOCK)`, or under Triton's CPU interpreter (STATIC, see
# launch.STATIC_LOOPS) a fixed count of tiles with a guard.


@triton.jit
def _allowed(qpos, kpos, qseg, kseg, valid, WINDOW: tl.constexpr, HAS_SEG: tl.constexpr):
    """[M, N] bool: may query (row) see key (column). WINDOW 0: no window (full causal attention)."""
    ok = (kpos[None, :] <= qpos[:, None]) & valid
    if WINDOW > 0:
        ok = ok & (qpos[:, None] - kpos[None, :] < WINDOW)
    if HAS_SEG:
        ok = ok & (qseg[:, None] == kseg[None, :])
    return ok


@triton.jit
def _load_rows(X, POS, SEG, b, T, r0, x_head, sxt, PLAIN: tl.constexpr, HAS_SEG: tl.constexpr, DA: tl.constexpr,
               DB: tl.constexpr, BLOCK: tl.constexpr, POS_OTHER: tl.constexpr, SEG_OTHER: tl.constexpr):
    """A tile of query or key rows at r0: (x first DA dims, x last DB dims (or the first again if DB == 0), positions,
    segments, valid); rows past T take POS_OTHER and SEG_OTHER."""
    offs = r0 + tl.arange(0, BLOCK)
    mask = offs < T
    rows = x_head + offs[:, None] * sxt
    xa = tl.load(rows + tl.arange(0, DA)[None, :], mask=mask[:, None], other=0.0)
    if DB > 0:
        xb = tl.load(rows + DA + tl.arange(0, DB)[None, :], mask=mask[:, None], other=0.0)
    else:
        xb = xa
    if PLAIN:
        pos = offs
    else:
        pos = tl.load(POS + b * T + offs, mask=mask, other=POS_OTHER)
    if HAS_SEG:
        seg = tl.load(SEG + b * T + offs, mask=mask, other=SEG_OTHER)
    else:
        seg = pos
    return xa, xb, pos, seg, mask


@triton.jit
def _load_keys(K, V, POS, SEG, b, T, n0, k_head, v_head, skt, svt,
               PLAIN: tl.constexpr, HAS_SEG: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
               DV: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tile at n0: (k first DA dims, k last DB dims (or the first again if DB == 0), v, positions, segments, valid)."""
    ka, kb, kpos, kseg, mask_n = _load_rows(K, POS, SEG, b, T, n0, k_head, skt, PLAIN, HAS_SEG, DA, DB, BLOCK_N,
                                            1073741824, -2)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    vv = tl.load(v_head + offs_n[:, None] * svt + tl.arange(0, DV)[None, :], mask=mask_n[:, None], other=0.0)
    return ka, kb, vv, kpos, kseg, mask_n


@triton.jit
def _load_queries(Q, POS, SEG, b, T, m0, q_head, sqt,
                  PLAIN: tl.constexpr, HAS_SEG: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
                  BLOCK_M: tl.constexpr):
    """Query tile at m0: (q first DA dims, q last DB dims (or the first again), positions, segments, valid)."""
    return _load_rows(Q, POS, SEG, b, T, m0, q_head, sqt, PLAIN, HAS_SEG, DA, DB, BLOCK_M, -1, -1)


@triton.jit
def _head_queries(Q, POS, SEG, sqb, sqh, sqt, T, H, REP: tl.constexpr, PLAIN: tl.constexpr, HAS_SEG: tl.constexpr,
                  DA: tl.constexpr, DB: tl.constexpr, BLOCK_M: tl.constexpr):
    """A query-tile program's (batch row, head, kv head, first query) from its grid place (tile, b * H + h), and
    its tile (_load_queries)."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    m0 = tl.program_id(0) * BLOCK_M
    qa, qb, qpos, qseg, mask_m = _load_queries(Q, POS, SEG, b, T, m0, Q + b * sqb + h * sqh, sqt, PLAIN, HAS_SEG, DA,
                                               DB, BLOCK_M)
    return b, h, h // REP, m0, qa, qb, qpos, qseg, mask_m


@triton.jit
def _key_band(K, V, b, hk, m0, T, skb, skh, svb, svh, BAND: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """The keys a query tile at m0 can see, [lo, hi) (lo on a key block's start), and its kv head's key and value
    rows."""
    lo = (tl.maximum(m0 - (BAND - 1), 0) // BLOCK_N) * BLOCK_N
    return lo, tl.minimum(m0 + BLOCK_M, T), K + b * skb + hk * skh, V + b * svb + hk * svh


@triton.jit
def _scores(xa, xb, ya, yb, DB: tl.constexpr):
    """x [R, D] . y [C, D]^T over both parts of the head dim -> [R, C] fp32."""
    s = tl.dot(xa, tl.trans(ya))
    if DB > 0:
        s += tl.dot(xb, tl.trans(yb))
    return s


@triton.jit
def _fwd_tile(qa, qb, qpos, qseg, m_i, l_i, acc, K, V, POS, SEG, b, T, n0, k_head, v_head, skt, svt, qk_scale,
              WINDOW: tl.constexpr, PLAIN: tl.constexpr, HAS_SEG: tl.constexpr, DA: tl.constexpr,
              DB: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr):
    ka, kb, vv, kpos, kseg, mask_n = _load_keys(K, V, POS, SEG, b, T, n0, k_head, v_head, skt, svt,
                                                PLAIN, HAS_SEG, DA, DB, DV, BLOCK_N)
    s = _scores(qa, qb, ka, kb, DB) * qk_scale
    s = tl.where(_allowed(qpos, kpos, qseg, kseg, mask_n[None, :], WINDOW, HAS_SEG), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
    return m_new, l_i, acc


@launcher
@triton.jit
def _swa_fwd(Q, K, V, POS, SEG, SINK, O, LSE,
             sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
             T, H, qk_scale,
             REP: tl.constexpr, WINDOW: tl.constexpr, BAND: tl.constexpr, PLAIN: tl.constexpr, HAS_SEG: tl.constexpr,
             HAS_SINK: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, DV: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STATIC: tl.constexpr):
    """One query tile of one head: O [B, H, T, DV] and LSE [B, H, T] (base 2, sink included)."""
    b, h, hk, m0, qa, qb, qpos, qseg, mask_m = _head_queries(Q, POS, SEG, sqb, sqh, sqt, T, H, REP, PLAIN, HAS_SEG,
                                                             DA, DB, BLOCK_M)
    bh = tl.program_id(1)
    if HAS_SINK:  # the sink is a key with score sink_h and no value
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(SINK + h).to(tl.float32) * 1.4426950408889634
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    else:
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DV], dtype=tl.float32)
    lo, hi, k_head, v_head = _key_band(K, V, b, hk, m0, T, skb, skh, svb, svh, BAND, BLOCK_M, BLOCK_N)
    if STATIC:
        for j in range((BLOCK_M + BAND - 1 + BLOCK_N - 1) // BLOCK_N + 1):
            if lo + j * BLOCK_N < hi:
                m_i, l_i, acc = _fwd_tile(qa, qb, qpos, qseg, m_i, l_i, acc, K, V, POS, SEG, b, T, lo + j * BLOCK_N,
                                          k_head, v_head, skt, svt, qk_scale, WINDOW, PLAIN, HAS_SEG, DA, DB, DV,
                                          BLOCK_N)
    else:
        for n0 in range(lo, hi, BLOCK_N):
            m_i, l_i, acc = _fwd_tile(qa, qb, qpos, qseg, m_i, l_i, acc, K, V, POS, SEG, b, T, n0,
                                      k_head, v_head, skt, svt, qk_scale, WINDOW, PLAIN, HAS_SEG, DA, DB, DV,
                                      BLOCK_N)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    offs_m = m0 + tl.arange(0, BLOCK_M)
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + tl.arange(0, DV)[None, :], out.to(O.dtype.element_ty),
             mask=mask_m[:, None])
    tl.store(LSE + bh * T + offs_m, m_i + tl.log2(l_safe), mask=mask_m)


@triton.jit
def _halves(x, ROWS: tl.constexpr, W: tl.constexpr):
    """x [ROWS, W] -> (x[:, :W // 2], x[:, W // 2:])."""
    return tl.split(tl.permute(tl.reshape(x, (ROWS, 2, W // 2)), (0, 2, 1)))


@triton.jit
def _store_unrotated(rows, ga, mask, COS, SIN, cs, ROWS: tl.constexpr, DA: tl.constexpr, R: tl.constexpr):
    """Store ga [ROWS, DA] (fp32: the gradient of rotated queries or keys, their first R dims rotated, R = DA or
    DA / 2) at `rows` (pointers [ROWS, 1]) as the gradient before RoPE: the transpose of the rotation of the NeoX
    pairs (j, j + R / 2) at the angles of the COS / SIN rows at offsets cs [ROWS], with the arithmetic of
    _rope_part's; in the rows' element type."""
    ty = rows.dtype.element_ty
    m = mask[:, None]
    if R < DA:
        rot, rest = _halves(ga, ROWS, DA)
        tl.store(rows + R + tl.arange(0, DA - R)[None, :], rest.to(ty), mask=m)
    else:
        rot = ga
    g1, g2 = _halves(rot, ROWS, R)
    j = tl.arange(0, R // 2)[None, :]
    cs_rows = cs[:, None]
    c1 = tl.load(COS + cs_rows + j, mask=m, other=1.0).to(tl.float32)
    c2 = tl.load(COS + cs_rows + R // 2 + j, mask=m, other=1.0).to(tl.float32)
    s1 = tl.load(SIN + cs_rows + j, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + cs_rows + R // 2 + j, mask=m, other=0.0).to(tl.float32)
    tl.store(rows + j, (g1 * c1 + g2 * s2).to(ty), mask=m)
    tl.store(rows + R // 2 + j, (g2 * c2 + g1 * (-s1)).to(ty), mask=m)


@triton.jit
def _dkdv_tile(ka, kb, vv, kpos, kseg, dka, dkb, dvacc, Q, DO, LSE, DELTA, POS, SEG, b, T, m0, q_head, do_head,
               row, sqt, sdt, qk_scale,
               WINDOW: tl.constexpr, PLAIN: tl.constexpr, HAS_SEG: tl.constexpr, DA: tl.constexpr,
               DB: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr):
    qa, qb, qpos, qseg, mask_m = _load_queries(Q, POS, SEG, b, T, m0, q_head, sqt, PLAIN, HAS_SEG, DA, DB, BLOCK_M)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    st = _scores(ka, kb, qa, qb, DB)  # [N, M]
    ok = (kpos[:, None] <= qpos[None, :]) & mask_m[None, :]
    if WINDOW > 0:
        ok = ok & (qpos[None, :] - kpos[:, None] < WINDOW)
    if HAS_SEG:
        ok = ok & (kseg[:, None] == qseg[None, :])
    lse = tl.load(LSE + row + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + row + offs_m, mask=mask_m, other=0.0)
    pt = tl.where(ok, tl.exp2(st * qk_scale - lse[None, :]), 0.0)
    do = tl.load(do_head + offs_m[:, None] * sdt + tl.arange(0, DV)[None, :], mask=mask_m[:, None], other=0.0)
    dvacc += tl.dot(pt.to(do.dtype), do)
    dst = (pt * (tl.dot(vv, tl.trans(do)) - delta[None, :])).to(qa.dtype)
    dka += tl.dot(dst, qa)
    if DB > 0:
        dkb += tl.dot(dst, qb)
    return dka, dkb, dvacc


@launcher
@triton.jit
def _swa_bwd_dkdv(Q, K, V, DO, LSE, DELTA, POS, SEG, COS, SIN, DK, DVO,
                  sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,
                  sdkb, sdkh, sdkt, sdvb, sdvh, sdvt, scb, sct,
                  T, HKV, qk_scale, sm_scale, v_scale,
                  REP: tl.constexpr, WINDOW: tl.constexpr, BAND: tl.constexpr, PLAIN: tl.constexpr,
                  HAS_SEG: tl.constexpr, ROPE: tl.constexpr, R: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
                  DV: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STATIC: tl.constexpr):
    """One key tile of one kv head: dK, dV summed over the REP query heads that read it.
    DK [B, HKV, T, DA + DB] and DVO [B, HKV, T, DV] have strides sdk*, sdv*; DO [B, H, T, DV] sdb, sdh, sdt.
    ROPE: K and V came from RoPE over the first R dims and a value scale (COS / SIN rows at b * scb + t * sct):
    the gradients stored are those before both, applied once to the sums."""
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // HKV
    hk = bhk % HKV
    n0 = pid_n * BLOCK_N
    ka, kb, vv, kpos, kseg, mask_n = _load_keys(K, V, POS, SEG, b, T, n0, K + b * skb + hk * skh,
                                                V + b * svb + hk * svh, skt, svt, PLAIN, HAS_SEG, DA, DB, DV,
                                                BLOCK_N)
    dka = tl.zeros([BLOCK_N, DA], dtype=tl.float32)
    dkb = tl.zeros([BLOCK_N, DB if DB > 0 else DA], dtype=tl.float32)
    dvacc = tl.zeros([BLOCK_N, DV], dtype=tl.float32)
    lo = (n0 // BLOCK_M) * BLOCK_M
    hi = tl.minimum(n0 + BLOCK_N + BAND - 1, T)
    for r in range(REP):
        h = hk * REP + r
        q_head = Q + b * sqb + h * sqh
        do_head = DO + b * sdb + h * sdh
        row = (b * HKV * REP + h) * T
        if STATIC:
            for j in range((BLOCK_N + BAND - 1 + BLOCK_M - 1) // BLOCK_M + 1):
                if lo + j * BLOCK_M < hi:
                    dka, dkb, dvacc = _dkdv_tile(ka, kb, vv, kpos, kseg, dka, dkb, dvacc, Q, DO, LSE, DELTA, POS,
                                                 SEG, b, T, lo + j * BLOCK_M, q_head, do_head, row, sqt, sdt,
                                                 qk_scale, WINDOW, PLAIN, HAS_SEG, DA, DB, DV, BLOCK_M)
        else:
            for m0 in range(lo, hi, BLOCK_M):
                dka, dkb, dvacc = _dkdv_tile(ka, kb, vv, kpos, kseg, dka, dkb, dvacc, Q, DO, LSE, DELTA, POS,
                                             SEG, b, T, m0, q_head, do_head, row, sqt, sdt,
                                             qk_scale, WINDOW, PLAIN, HAS_SEG, DA, DB, DV, BLOCK_M)
    offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
    dk_rows = DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkt
    if ROPE:
        _store_unrotated(dk_rows, dka * sm_scale, mask_n, COS, SIN, b * scb + (n0 + tl.arange(0, BLOCK_N)) * sct,
                         BLOCK_N, DA, R)
        dvacc = dvacc * v_scale
    else:
        tl.store(dk_rows + tl.arange(0, DA)[None, :], (dka * sm_scale).to(DK.dtype.element_ty), mask=mask_n[:, None])
    if DB > 0:
        tl.store(dk_rows + DA + tl.arange(0, DB)[None, :], (dkb * sm_scale).to(DK.dtype.element_ty),
                 mask=mask_n[:, None])
    tl.store(DVO + b * sdvb + hk * sdvh + offs_n[:, None] * sdvt + tl.arange(0, DV)[None, :],
             dvacc.to(DVO.dtype.element_ty), mask=mask_n[:, None])


@triton.jit
def _dq_tile(qa, qb, qpos, qseg, do, lse, delta, dqa, dqb, K, V, POS, SEG, b, T, n0, k_head, v_head, skt, svt,
             qk_scale, WINDOW: tl.constexpr, PLAIN: tl.constexpr, HAS_SEG: tl.constexpr, DA: tl.constexpr,
             DB: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr):
    ka, kb, vv, kpos, kseg, mask_n = _load_keys(K, V, POS, SEG, b, T, n0, k_head, v_head, skt, svt,
                                                PLAIN, HAS_SEG, DA, DB, DV, BLOCK_N)
    s = _scores(qa, qb, ka, kb, DB)
    ok = _allowed(qpos, kpos, qseg, kseg, mask_n[None, :], WINDOW, HAS_SEG)
    p = tl.where(ok, tl.exp2(s * qk_scale - lse[:, None]), 0.0)
    ds = (p * (tl.dot(do, tl.trans(vv)) - delta[:, None])).to(qa.dtype)
    dqa += tl.dot(ds, ka)
    if DB > 0:
        dqb += tl.dot(ds, kb)
    return dqa, dqb


@launcher
@triton.jit
def _swa_bwd_dq(Q, K, V, DO, O, LSE, DELTA, POS, SEG, COS, SIN, DQ, SINK, DSINK,
                sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,
                sob, soh, sot, sdqb, sdqh, sdqt, scb, sct,
                T, H, qk_scale, sm_scale,
                REP: tl.constexpr, WINDOW: tl.constexpr, BAND: tl.constexpr, PLAIN: tl.constexpr,
                HAS_SEG: tl.constexpr, HAS_SINK: tl.constexpr, ROPE: tl.constexpr, R: tl.constexpr, DA: tl.constexpr,
                DB: tl.constexpr,
                DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STATIC: tl.constexpr):
    """One query tile of one head: Delta = rowsum(dO * O) of its rows (stored in DELTA for the dK/dV
    kernel, which runs after this one), then dQ. DQ [B, H, T, DA + DB] has strides sdqb, sdqh, sdqt.
    With the sink, the tile's share of d sink_h, -sum_i exp(sink_h - lse_i) Delta_i, goes to
    DSINK [B * H, tiles]. ROPE: dQ before RoPE (see _swa_bwd_dkdv)."""
    b, h, hk, m0, qa, qb, qpos, qseg, mask_m = _head_queries(Q, POS, SEG, sqb, sqh, sqt, T, H, REP, PLAIN, HAS_SEG,
                                                             DA, DB, BLOCK_M)
    bh = tl.program_id(1)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdt + tl.arange(0, DV)[None, :], mask=mask_m[:, None],
                 other=0.0)
    lse = tl.load(LSE + bh * T + offs_m, mask=mask_m, other=0.0)
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sot + tl.arange(0, DV)[None, :], mask=mask_m[:, None],
                other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + bh * T + offs_m, delta, mask=mask_m)
    if HAS_SINK:
        share = tl.exp2(tl.load(SINK + h).to(tl.float32) * 1.4426950408889634 - lse)  # the sink's share of each row
        tl.store(DSINK + bh * tl.num_programs(0) + tl.program_id(0), -tl.sum(tl.where(mask_m, share * delta, 0.0), 0))
    dqa = tl.zeros([BLOCK_M, DA], dtype=tl.float32)
    dqb = tl.zeros([BLOCK_M, DB if DB > 0 else DA], dtype=tl.float32)
    lo, hi, k_head, v_head = _key_band(K, V, b, hk, m0, T, skb, skh, svb, svh, BAND, BLOCK_M, BLOCK_N)
    if STATIC:
        for j in range((BLOCK_M + BAND - 1 + BLOCK_N - 1) // BLOCK_N + 1):
            if lo + j * BLOCK_N < hi:
                dqa, dqb = _dq_tile(qa, qb, qpos, qseg, do, lse, delta, dqa, dqb, K, V, POS, SEG, b, T,
                                    lo + j * BLOCK_N, k_head, v_head, skt, svt, qk_scale, WINDOW, PLAIN, HAS_SEG,
                                    DA, DB, DV, BLOCK_N)
    else:
        for n0 in range(lo, hi, BLOCK_N):
            dqa, dqb = _dq_tile(qa, qb, qpos, qseg, do, lse, delta, dqa, dqb, K, V, POS, SEG, b, T, n0,
                                k_head, v_head, skt, svt, qk_scale, WINDOW, PLAIN, HAS_SEG, DA, DB, DV, BLOCK_N)
    dq_rows = DQ + b * sdqb + h * sdqh + offs_m.to(tl.int64)[:, None] * sdqt
    if ROPE:
        _store_unrotated(dq_rows, dqa * sm_scale, mask_m, COS, SIN, b * scb + offs_m * sct, BLOCK_M, DA, R)
    else:
        tl.store(dq_rows + tl.arange(0, DA)[None, :], (dqa * sm_scale).to(DQ.dtype.element_ty), mask=mask_m[:, None])
    if DB > 0:
        tl.store(dq_rows + DA + tl.arange(0, DB)[None, :], (dqb * sm_scale).to(DQ.dtype.element_ty),
                 mask=mask_m[:, None])


# ----------------------------------------------------------------------------------------- autograd
# Tile settings: chosen with `python bench/gpu_check.py --swa-sweep` on an H100 (mini training size) and
# checked kernel by kernel in the training step's profile (docs/BENCHMARKS.md).
