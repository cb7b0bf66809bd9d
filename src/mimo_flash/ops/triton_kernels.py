"""Triton kernels for CUDA: banded sliding-window attention with the sink, the gradient of RoPE / q / k / v,
the MoE counting sort, gather-sum and weighted SwiGLU, and the cross-entropy loss.

Importing this module needs triton; ops/attention_fast.py and ops/fused.py use it only where it
imports and the tensors are on CUDA.

Banded SWA attention ("triton" attention backend)
    For queries and keys that are the same tokens (AttnMeta.aligned) whose positions rise by at
    least one per token within a document, every key a query may see lies among the `window`
    tokens ending at the query, so a query tile of BLOCK_M rows visits only the key tiles of
    [m0 - window + 1, m0 + BLOCK_M). Within them the exact rule is applied per pair:
        k_pos <= q_pos, q_pos - k_pos < window, q_seg == k_seg.
    The sink starts each row's online softmax as if it were a key with score sink_h and no value
    (running max = sink_h, running sum = 1), so the saved log-sum-exp already includes it.
    Backward (FlashAttention-2 style, no atomics): one kernel per query tile for dQ, which first
    computes and stores Delta = rowsum(dO * O) of its rows, then one per key tile for dK and dV
    (looping over the query heads that share the kv head); with P = exp(S - lse),
    dS = P * (dP - Delta), and d sink_h = -sum_i exp(sink_h - lse_i) Delta_i.
    Head dims: Q/K dim = DA + DB with DA a power of two and DB a power of two or 0 (192 = 128 + 64),
    V dim a power of two.
    banded_swa_qkv takes the q/k/v projection's output: RoPE's kernel rotates q and k and scales v, and
    the backward kernels store the projection's gradient (dQ and dK unrotated, dV scaled, once per tile of
    sums) in place of dQ, dK, dV and a pass of RoPE's backward kernel over them.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634



class _Launcher:
    """`kernel[grid](*args, **meta)` for a @triton.jit kernel, with less host work per call.

    The forward of a training step issues ~110 of these short kernels barely ahead of the GPU, and
    Triton's own launch path spends most of its time in Python (hooks, launch metadata, a cache-key
    string, scratch allocators): 15-23 us of host time per call on the device's machines, 9-13 us
    here (bench/host_time.py). Here the first call of each specialization goes through
    Triton (compiling if need be) and keeps the compiled kernel, keyed by Triton's own binder (the
    argument specialization it keys its cache by, so the same compiled kernel runs); later calls
    launch it through its C launcher directly. Kernels that need scratch memory, and anything other
    than a compiled JITFunction (Triton's CPU interpreter), take Triton's path every time.
    """

    def __init__(self, fn):
        self.fn = fn
        self.kernels = {}

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launch(grid, args, meta)

    def launch(self, grid, args, meta):
        device = torch.cuda.current_device()
        bound, spec, options = self.fn.device_caches[device][4](*args, **meta)
        key = (device, *spec, *options.items())
        hit = self.kernels.get(key)
        if hit is None:
            kernel = self.fn[grid](*args, **meta)
            run = kernel.run
            direct = run.global_scratch_size == 0 and run.profile_scratch_size == 0 and hasattr(run, "launch")
            self.kernels[key] = (run.launch if direct else None, run, kernel.function, kernel.packed_metadata,
                                 run.launch_cooperative_grid, run.launch_pdl)
            return
        launch, run, function, packed, coop, pdl = hit
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        stream = torch._C._cuda_getCurrentRawStream(device)
        if launch is not None:
            launch(grid[0], g1, g2, stream, function, coop, pdl, None, None, packed, None, None, None,
                   *bound.values())
        else:
            run(grid[0], g1, g2, stream, function, packed, None, None, None, *bound.values())


def launcher(fn):
    """Wrap a compiled @triton.jit kernel in _Launcher (kept as it is under Triton's interpreter)."""
    return _Launcher(fn) if isinstance(fn, triton.runtime.JITFunction) else fn


def split_dim(d: int) -> tuple[int, int] | None:
    """d -> (DA, DB), DA the largest power of two <= d and DB = d - DA a power of two or 0; None if not."""
    if d < 16:
        return None
    da = 1 << (d.bit_length() - 1)
    db = d - da
    if db and (db & (db - 1) or db < 16):
        return None
    return da, db


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Head dims the kernels take (see split_dim) and half-precision inputs."""
    dv = v.shape[-1]
    return (split_dim(q.shape[-1]) is not None and dv >= 16 and dv & (dv - 1) == 0 and dv <= 256
            and q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype and v.dtype == q.dtype)


# ----------------------------------------------------------------------------------------- kernels
# Loops over the tiles of the band run as `range(lo, hi, BLOCK)`; Triton's CPU interpreter
# (TRITON_INTERPRET=1, used to test the index logic without a GPU) cannot take tensor loop bounds,
# so there they run a fixed count of tiles with a guard.
STATIC_LOOPS = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _allowed(qpos, kpos, qseg, kseg, valid, WINDOW: tl.constexpr, HAS_SEG: tl.constexpr):
    """[M, N] bool: may query (row) see key (column)."""
    ok = (kpos[None, :] <= qpos[:, None]) & (qpos[:, None] - kpos[None, :] < WINDOW) & valid
    if HAS_SEG:
        ok = ok & (qseg[:, None] == kseg[None, :])
    return ok


@triton.jit
def _load_keys(K, V, POS, SEG, b, T, n0, k_head, v_head, skt, svt,
               PLAIN: tl.constexpr, HAS_SEG: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
               DV: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tile at n0: (k first DA dims, k last DB dims (or the first again if DB == 0), v, positions, segments, valid)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < T
    k_rows = k_head + offs_n[:, None] * skt
    ka = tl.load(k_rows + tl.arange(0, DA)[None, :], mask=mask_n[:, None], other=0.0)
    if DB > 0:
        kb = tl.load(k_rows + DA + tl.arange(0, DB)[None, :], mask=mask_n[:, None], other=0.0)
    else:
        kb = ka
    vv = tl.load(v_head + offs_n[:, None] * svt + tl.arange(0, DV)[None, :], mask=mask_n[:, None], other=0.0)
    if PLAIN:
        kpos = offs_n
    else:
        kpos = tl.load(POS + b * T + offs_n, mask=mask_n, other=1073741824)
    if HAS_SEG:
        kseg = tl.load(SEG + b * T + offs_n, mask=mask_n, other=-2)
    else:
        kseg = kpos
    return ka, kb, vv, kpos, kseg, mask_n


@triton.jit
def _load_queries(Q, POS, SEG, b, T, m0, q_head, sqt,
                  PLAIN: tl.constexpr, HAS_SEG: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
                  BLOCK_M: tl.constexpr):
    """Query tile at m0: (q first DA dims, q last DB dims (or the first again), positions, segments, valid)."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < T
    q_rows = q_head + offs_m[:, None] * sqt
    qa = tl.load(q_rows + tl.arange(0, DA)[None, :], mask=mask_m[:, None], other=0.0)
    if DB > 0:
        qb = tl.load(q_rows + DA + tl.arange(0, DB)[None, :], mask=mask_m[:, None], other=0.0)
    else:
        qb = qa
    if PLAIN:
        qpos = offs_m
    else:
        qpos = tl.load(POS + b * T + offs_m, mask=mask_m, other=-1)
    if HAS_SEG:
        qseg = tl.load(SEG + b * T + offs_m, mask=mask_m, other=-1)
    else:
        qseg = qpos
    return qa, qb, qpos, qseg, mask_m


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
             REP: tl.constexpr, WINDOW: tl.constexpr, PLAIN: tl.constexpr, HAS_SEG: tl.constexpr, HAS_SINK: tl.constexpr,
             DA: tl.constexpr, DB: tl.constexpr, DV: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STATIC: tl.constexpr):
    """One query tile of one head: O [B, H, T, DV] and LSE [B, H, T] (base 2, sink included)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // REP
    m0 = pid_m * BLOCK_M
    qa, qb, qpos, qseg, mask_m = _load_queries(Q, POS, SEG, b, T, m0, Q + b * sqb + h * sqh, sqt,
                                               PLAIN, HAS_SEG, DA, DB, BLOCK_M)
    if HAS_SINK:  # the sink is a key with score sink_h and no value
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(SINK + h).to(tl.float32) * 1.4426950408889634
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    else:
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DV], dtype=tl.float32)
    lo = (tl.maximum(m0 - (WINDOW - 1), 0) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(m0 + BLOCK_M, T)
    k_head = K + b * skb + hk * skh
    v_head = V + b * svb + hk * svh
    if STATIC:
        for j in range((BLOCK_M + WINDOW - 1 + BLOCK_N - 1) // BLOCK_N + 1):
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
    ok = (kpos[:, None] <= qpos[None, :]) & (qpos[None, :] - kpos[:, None] < WINDOW) & mask_m[None, :]
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
                  REP: tl.constexpr, WINDOW: tl.constexpr, PLAIN: tl.constexpr, HAS_SEG: tl.constexpr,
                  ROPE: tl.constexpr, R: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, DV: tl.constexpr,
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
    hi = tl.minimum(n0 + BLOCK_N + WINDOW - 1, T)
    for r in range(REP):
        h = hk * REP + r
        q_head = Q + b * sqb + h * sqh
        do_head = DO + b * sdb + h * sdh
        row = (b * HKV * REP + h) * T
        if STATIC:
            for j in range((BLOCK_N + WINDOW - 1 + BLOCK_M - 1) // BLOCK_M + 1):
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
                REP: tl.constexpr, WINDOW: tl.constexpr, PLAIN: tl.constexpr, HAS_SEG: tl.constexpr,
                HAS_SINK: tl.constexpr, ROPE: tl.constexpr, R: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
                DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STATIC: tl.constexpr):
    """One query tile of one head: Delta = rowsum(dO * O) of its rows (stored in DELTA for the dK/dV
    kernel, which runs after this one), then dQ. DQ [B, H, T, DA + DB] has strides sdqb, sdqh, sdqt.
    With the sink, the tile's share of d sink_h, -sum_i exp(sink_h - lse_i) Delta_i, goes to
    DSINK [B * H, tiles]. ROPE: dQ before RoPE (see _swa_bwd_dkdv)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // REP
    m0 = pid_m * BLOCK_M
    qa, qb, qpos, qseg, mask_m = _load_queries(Q, POS, SEG, b, T, m0, Q + b * sqb + h * sqh, sqt,
                                               PLAIN, HAS_SEG, DA, DB, BLOCK_M)
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
        tl.store(DSINK + bh * tl.num_programs(0) + pid_m, -tl.sum(tl.where(mask_m, share * delta, 0.0), 0))
    dqa = tl.zeros([BLOCK_M, DA], dtype=tl.float32)
    dqb = tl.zeros([BLOCK_M, DB if DB > 0 else DA], dtype=tl.float32)
    lo = (tl.maximum(m0 - (WINDOW - 1), 0) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(m0 + BLOCK_M, T)
    k_head = K + b * skb + hk * skh
    v_head = V + b * svb + hk * svh
    if STATIC:
        for j in range((BLOCK_M + WINDOW - 1 + BLOCK_N - 1) // BLOCK_N + 1):
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
FWD_CFG = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
DKDV_CFG = dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=1)
DQ_CFG = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _heads_view(B: int, T: int, H: int, D: int, like: torch.Tensor) -> torch.Tensor:
    """A new [B, H, T, D] tensor stored as [B, T, H, D]: the layout the model's projections read and
    write, so that the output (and the gradients) need no transposing copy."""
    return torch.empty(B, T, H, D, device=like.device, dtype=like.dtype).transpose(1, 2)


def rope_fits(d: int, rotary_dim: int) -> bool:
    """Can the backward kernels take the gradient through RoPE over the first rotary_dim of d Q/K dims: the
    rotary dims are the whole first part of split_dim(d) or its first half (192 = 128 + 64, 64 rotary)."""
    parts = split_dim(d)
    return parts is not None and rotary_dim in (parts[0], parts[0] // 2) and rotary_dim >= 4


def _qkv_views(x: torch.Tensor, H: int, Hkv: int, D: int, Dv: int):
    """x [B, T, H * D + Hkv * (D + Dv)] -> its q [B, H, T, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv] (views)."""
    B, T, _ = x.shape
    q = x[..., :H * D].view(B, T, H, D).transpose(1, 2)
    k = x[..., H * D:(H + Hkv) * D].view(B, T, Hkv, D).transpose(1, 2)
    v = x[..., (H + Hkv) * D:].view(B, T, Hkv, Dv).transpose(1, 2)
    return q, k, v


class _Band:
    """The launches of the banded kernels, for both autograd functions below. rope: None, or (cos, sin, v_scale)
    with cos / sin [B or 1, T, R]: q, k, v were rotated and scaled by ops.fused.rope_qkv, and the backward
    returns the gradients before it (the projection's)."""

    def __init__(self, q, k, v, pos, seg, scale: float, window: int, plain: bool, rope=None):
        self.q, self.k, self.v, self.pos, self.seg = q, k, v, pos, seg
        self.scale, self.window, self.plain = scale, window, plain
        B, H, T, D = q.shape
        self.B, self.H, self.T, self.Hkv, self.Dv = B, H, T, k.shape[1], v.shape[-1]
        self.DA, self.DB = split_dim(D)
        if rope is None:
            self.cos, self.sin, self.scb, self.sct, self.v_scale = None, None, 0, 0, 1.0
        else:
            cos, sin, self.v_scale = rope
            self.cos, self.sin, self.scb = _cos_sin(cos, sin)
            self.sct = self.cos.stride(1)

    def flags(self) -> dict:
        return dict(REP=self.H // self.Hkv, WINDOW=self.window, PLAIN=self.plain, HAS_SEG=self.seg is not None,
                    DA=self.DA, DB=self.DB, DV=self.Dv, STATIC=STATIC_LOOPS)

    def _strides(self):
        return tuple(s for t in (self.q, self.k, self.v) for s in t.stride()[:3])

    def forward(self, sink) -> tuple[torch.Tensor, torch.Tensor]:
        q, B, H, T = self.q, self.B, self.H, self.T
        out = _heads_view(B, T, H, self.Dv, q)
        lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)  # base 2, sink included
        pick = lambda t: t if t is not None else lse  # noqa: E731  (an unused pointer argument)
        grid = (triton.cdiv(T, FWD_CFG["BLOCK_M"]), B * H)
        _swa_fwd[grid](q, self.k, self.v, pick(self.pos), pick(self.seg), pick(sink), out, lse, *self._strides(),
                       *out.stride()[:3], T, H, self.scale * LOG2E, HAS_SINK=sink is not None,
                       **self.flags(), **FWD_CFG)
        return out, lse

    def backward(self, dout, out, lse, sink, dq, dk, dv) -> torch.Tensor | None:
        """dq, dk, dv: [B, H(kv), T, d] outputs (any strides, last dim contiguous); sink None unless its gradient
        is wanted -> d sink [H] or None."""
        B, H, T = self.B, self.H, self.T
        dout = _last_dim_contiguous(dout)
        delta = torch.empty_like(lse)  # rowsum(dout * out) [B, H, T] fp32: written by the dQ kernel
        pick = lambda t: t if t is not None else lse  # noqa: E731
        pos, seg, cos, sin = (pick(t) for t in (self.pos, self.seg, self.cos, self.sin))
        common = (*self._strides(), *dout.stride()[:3])
        flags = dict(ROPE=self.cos is not None, R=self.cos.shape[-1] if self.cos is not None else 0, **self.flags())
        tiles = triton.cdiv(T, DQ_CFG["BLOCK_M"])
        dsink = torch.empty(B * H, tiles, device=lse.device, dtype=torch.float32) if sink is not None else None
        _swa_bwd_dq[(tiles, B * H)](
            self.q, self.k, self.v, dout, out, lse, delta, pos, seg, cos, sin, dq, pick(sink), pick(dsink), *common,
            *out.stride()[:3], *dq.stride()[:3], self.scb, self.sct, T, H, self.scale * LOG2E, self.scale,
            HAS_SINK=sink is not None, **flags, **DQ_CFG)
        _swa_bwd_dkdv[(triton.cdiv(T, DKDV_CFG["BLOCK_N"]), B * self.Hkv)](
            self.q, self.k, self.v, dout, lse, delta, pos, seg, cos, sin, dk, dv, *common, *dk.stride()[:3],
            *dv.stride()[:3], self.scb, self.sct, T, self.Hkv, self.scale * LOG2E, self.scale, self.v_scale,
            **flags, **DKDV_CFG)
        return dsink.view(B, H, tiles).sum((0, 2)).to(sink.dtype) if sink is not None else None


class _BandedSWA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sink, pos, seg, scale: float, window: int, plain: bool):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        out, lse = _Band(q, k, v, pos, seg, scale, window, plain).forward(sink)
        ctx.save_for_backward(q, k, v, sink, pos, seg, out, lse)
        ctx.args = (scale, window, plain)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, sink, pos, seg, out, lse = ctx.saved_tensors
        band = _Band(q, k, v, pos, seg, *ctx.args)
        B, H, T, D = q.shape
        Hkv, Dv = band.Hkv, band.Dv
        dq, dk, dv = _heads_view(B, T, H, D, q), _heads_view(B, T, Hkv, D, q), _heads_view(B, T, Hkv, Dv, q)
        dsink = band.backward(dout, out, lse, sink if ctx.needs_input_grad[3] else None, dq, dk, dv)
        return dq, dk, dv, dsink, None, None, None, None, None


class _BandedSWAQKV(torch.autograd.Function):
    """RoPE (ops.fused.rope_qkv's kernel) then banded attention, with the backward through both in the attention
    kernels: they write the projection's gradient, unrotated and scaled once per tile, in place of the gradients
    of q, k and v and a RoPE kernel's pass over them."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, sink, pos, seg, heads: int, kv_heads: int, qk_dim: int, v_dim: int,
                v_scale: float, scale: float, window: int, plain: bool):
        q, k, v = (t.transpose(1, 2) for t in rope_qkv(qkv, cos, sin, heads, kv_heads, qk_dim, v_dim, v_scale))
        out, lse = _Band(q, k, v, pos, seg, scale, window, plain).forward(sink)
        ctx.save_for_backward(q, k, v, cos, sin, sink, pos, seg, out, lse)
        ctx.args = (scale, window, plain, v_scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, cos, sin, sink, pos, seg, out, lse = ctx.saved_tensors
        scale, window, plain, v_scale = ctx.args
        band = _Band(q, k, v, pos, seg, scale, window, plain, (cos, sin, v_scale))
        B, H, T, D = q.shape
        grad = torch.empty(B, T, H * D + band.Hkv * (D + band.Dv), device=q.device, dtype=q.dtype)
        dsink = band.backward(dout, out, lse, sink if ctx.needs_input_grad[3] else None,
                              *_qkv_views(grad, H, band.Hkv, D, band.Dv))
        return (grad, None, None, dsink) + (None,) * 10


def banded_swa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor | None,
               seg: torch.Tensor | None, scale: float, window: int, sink: torch.Tensor | None) -> torch.Tensor:
    """q [B, H, T, Dqk], k [B, Hkv, T, Dqk], v [B, Hkv, T, Dv]; pos / seg [B, T] int32 or None
    (None pos = positions are the indices; None seg = one document); sink [H] or None -> [B, H, T, Dv].

    Queries and keys are the same T tokens; positions must rise by at least one per token within a
    document (see the module docstring).
    """
    return _BandedSWA.apply(q, k, v, sink, pos, seg, scale, window, pos is None)


def banded_swa_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int, qk_dim: int,
                   v_dim: int, v_scale: float, pos: torch.Tensor | None, seg: torch.Tensor | None, scale: float,
                   window: int, sink: torch.Tensor | None) -> torch.Tensor:
    """banded_swa of ops.fused.rope_qkv(qkv, cos, sin, ...)'s q, k, v, with the gradient through RoPE and the value
    scale taken in the attention kernels. qkv [B, T, heads * qk_dim + kv_heads * (qk_dim + v_dim)] (last dim
    contiguous), cos / sin [B or 1, T, R] with rope_fits(qk_dim, R); the rest as banded_swa
    -> [B, heads, T, v_dim]."""
    return _BandedSWAQKV.apply(qkv, cos, sin, sink, pos, seg, heads, kv_heads, qk_dim, v_dim, v_scale, scale,
                               window, pos is None)


# ----------------------------------------------------------------------------------------- RoPE of q / k / v
@triton.jit
def _rope_part(G, sgb, sgt, sgh, b, t, COS, SIN, cs_row, OUT, out_col, scale,
               H: tl.constexpr, D: tl.constexpr, R: tl.constexpr, HB: tl.constexpr, DB: tl.constexpr,
               FWD: tl.constexpr):
    """One token's heads [H, D] of G (strides sgb, sgt, sgh) -> OUT[out_col + h * D + d], times `scale`: the
    NeoX rotation over dims < R (pairs j, j + R/2) when FWD, else its transpose (the gradient); dims >= R
    pass through. fp32 math, one rounding. HB heads at a time."""
    d = tl.arange(0, DB)[None, :]
    rot = d < R
    half = R // 2
    partner = tl.where(d < half, d + half, d - half)
    if R > 0:
        c = tl.load(COS + cs_row + d, mask=rot, other=1.0).to(tl.float32)
        # forward: x_d cos_d + (-x_{d+h} | x_{d-h}) sin_d; transpose: g_d cos_d + (g_{d+h} | -g_{d-h}) sin_partner
        if FWD:
            sn = tl.load(SIN + cs_row + d, mask=rot, other=0.0).to(tl.float32)
            sn = tl.where(d < half, -sn, sn)
        else:
            sn = tl.load(SIN + cs_row + partner, mask=rot, other=0.0).to(tl.float32)
            sn = tl.where(d < half, sn, -sn)
    for h0 in tl.static_range(0, H, HB):
        h = h0 + tl.arange(0, HB)[:, None]
        m = (h < H) & (d < D)
        base = G + b * sgb + t * sgt + h * sgh
        g = tl.load(base + d, mask=m, other=0.0).to(tl.float32)
        out = g
        if R > 0:
            gp = tl.load(base + partner, mask=m & rot, other=0.0).to(tl.float32)
            out = tl.where(rot, g * c + gp * sn, g)
        tl.store(OUT + out_col + h * D + d, (out * scale).to(OUT.dtype.element_ty), mask=m)


@launcher
@triton.jit
def _rope_qkv_kernel(QKV, COS, SIN, Q, K, V, T, v_scale, sxb, sxt, scb, sct,
                     H: tl.constexpr, HKV: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr, R: tl.constexpr,
                     HQB: tl.constexpr, HKB: tl.constexpr, DQB: tl.constexpr, DVB: tl.constexpr):
    row = tl.program_id(0)
    b = row // T
    t = row % T
    r64 = row.to(tl.int64)
    cs = b * scb + t * sct
    _rope_part(QKV, sxb, sxt, DQK, b, t, COS, SIN, cs, Q + r64 * (H * DQK), 0, 1.0, H, DQK, R, HQB, DQB, True)
    _rope_part(QKV + H * DQK, sxb, sxt, DQK, b, t, COS, SIN, cs, K + r64 * (HKV * DQK), 0, 1.0, HKV, DQK, R, HKB,
               DQB, True)
    _rope_part(QKV + (H + HKV) * DQK, sxb, sxt, DV, b, t, COS, SIN, cs, V + r64 * (HKV * DV), 0, v_scale, HKV, DV,
               0, HKB, DVB, True)


@launcher
@triton.jit
def _rope_qkv_grad_kernel(GQ, GK, GV, COS, SIN, OUT, T, v_scale,
                          sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, scb, sct,
                          H: tl.constexpr, HKV: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
                          R: tl.constexpr, HQB: tl.constexpr, HKB: tl.constexpr, DQB: tl.constexpr,
                          DVB: tl.constexpr):
    row = tl.program_id(0)
    b = row // T
    t = row % T
    out_row = OUT + row.to(tl.int64) * (H * DQK + HKV * (DQK + DV))
    cs = b * scb + t * sct
    _rope_part(GQ, sqb, sqt, sqh, b, t, COS, SIN, cs, out_row, 0, 1.0, H, DQK, R, HQB, DQB, False)
    _rope_part(GK, skb, skt, skh, b, t, COS, SIN, cs, out_row, H * DQK, 1.0, HKV, DQK, R, HKB, DQB, False)
    _rope_part(GV, svb, svt, svh, b, t, COS, SIN, cs, out_row, (H + HKV) * DQK, v_scale, HKV, DV, 0, HKB, DVB, False)


ROPE_BLOCK = 4096  # elements of one block of heads in the RoPE kernels


def _rope_heads(n: int, d: int) -> int:
    """Heads per block of at most ROPE_BLOCK elements."""
    p2 = triton.next_power_of_2
    return min(p2(n), max(1, ROPE_BLOCK // p2(d)))


def _cos_sin(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin, cos.stride(0) if cos.shape[0] > 1 else 0


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int, qk_dim: int,
             v_dim: int, v_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ops.fused.rope_qkv's forward in one pass: qkv [B, T, n] (last dim contiguous) -> q [B, T, H, Dqk],
    k [B, T, Hkv, Dqk] rotated, v [B, T, Hkv, Dv] * v_scale (fp32 math, one rounding)."""
    qkv = _last_dim_contiguous(qkv)
    B, T, _ = qkv.shape
    H, Hkv, D, Dv, R = heads, kv_heads, qk_dim, v_dim, cos.shape[-1]
    q = torch.empty(B, T, H, D, device=qkv.device, dtype=qkv.dtype)
    k = torch.empty(B, T, Hkv, D, device=qkv.device, dtype=qkv.dtype)
    v = torch.empty(B, T, Hkv, Dv, device=qkv.device, dtype=qkv.dtype)
    cos, sin, scb = _cos_sin(cos, sin)
    p2 = triton.next_power_of_2
    if B * T:
        _rope_qkv_kernel[(B * T,)](qkv, cos, sin, q, k, v, T, v_scale, qkv.stride(0), qkv.stride(1), scb,
                                   cos.stride(1), H=H, HKV=Hkv, DQK=D, DV=Dv, R=R, HQB=_rope_heads(H, D),
                                   HKB=_rope_heads(Hkv, max(D, Dv)), DQB=p2(D), DVB=p2(Dv), num_warps=8)
    return q, k, v


def rope_qkv_grad(gq: torch.Tensor, gk: torch.Tensor, gv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  v_scale: float) -> torch.Tensor:
    """The gradient of ops.fused.rope_qkv's input: gq [B, T, H, Dqk], gk [B, T, Hkv, Dqk], gv [B, T, Hkv, Dv]
    (any strides, last dim contiguous), cos / sin [B or 1, T, R] -> [B, T, H * Dqk + Hkv * (Dqk + Dv)]."""
    B, T, H, D = gq.shape
    Hkv, Dv, R = gk.shape[2], gv.shape[3], cos.shape[-1]
    out = torch.empty(B, T, H * D + Hkv * (D + Dv), device=gq.device, dtype=gq.dtype)
    gq, gk, gv = (_last_dim_contiguous(x) for x in (gq, gk, gv))
    cos, sin, scb = _cos_sin(cos, sin)
    p2 = triton.next_power_of_2
    if B * T:
        _rope_qkv_grad_kernel[(B * T,)](gq, gk, gv, cos, sin, out, T, v_scale,
                                        gq.stride(0), gq.stride(1), gq.stride(2), gk.stride(0), gk.stride(1),
                                        gk.stride(2), gv.stride(0), gv.stride(1), gv.stride(2), scb, cos.stride(1),
                                        H=H, HKV=Hkv, DQK=D, DV=Dv, R=R, HQB=_rope_heads(H, D),
                                        HKB=_rope_heads(Hkv, max(D, Dv)), DQB=p2(D), DVB=p2(Dv), num_warps=8)
    return out


# ----------------------------------------------------------------------------------------- RMSNorm
# ops.fused.add_rms_norm / rms_norm with the roundings of their plain bodies: h = x + y rounded to the input
# dtype; normalised in fp32, rounded, then times the weight (rounded). The backward adds the residual's own
# gradient; the weight's gradient is summed per program in fp32 (partials [programs, D], then one sum).
@launcher
@triton.jit
def _norm_fwd_kernel(X, Y, W, H, OUT, RSTD, N, eps, D: tl.constexpr, HAS_Y: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < N
    mask = rmask[:, None] & (cols < D)[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    h = tl.load(X + offs, mask=mask, other=0.0)
    if HAS_Y:
        h = (h.to(tl.float32) + tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
        tl.store(H + offs, h, mask=mask)
    hf = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, 1) / D + eps)
    n = (hf * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
    tl.store(OUT + offs, (w[None, :] * n).to(OUT.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@launcher
@triton.jit
def _norm_bwd_kernel(H, W, RSTD, GOUT, GH, GX, GWP, N, D: tl.constexpr, HAS_GH: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    """out = w * round(h r), r = rsqrt(mean(h^2) + eps): g_n = round(g_out w); g_h = round(g_n r - h r^3
    mean(g_n h)) (+ the residual gradient g_h, rounded); the weight's partial sum of round(g_out n)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    gw = tl.zeros([BLOCK_D], dtype=tl.float32)
    dt = GX.dtype.element_ty
    for r0 in range(0, ROWS, BLOCK_R):
        rows = pid * ROWS + r0 + tl.arange(0, BLOCK_R)
        rmask = rows < N
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        hf = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        go = tl.load(GOUT + offs, mask=mask, other=0.0).to(tl.float32)
        n = (hf * rstd[:, None]).to(dt).to(tl.float32)
        gw += tl.sum((go * n).to(dt).to(tl.float32), 0)
        gn = (go * w[None, :]).to(dt).to(tl.float32)
        dot = tl.sum(gn * hf, 1) / D
        gx = (gn * rstd[:, None] - hf * (rstd * rstd * rstd * dot)[:, None]).to(dt)
        if HAS_GH:
            gx = (gx.to(tl.float32) + tl.load(GH + offs, mask=mask, other=0.0).to(tl.float32)).to(dt)
        tl.store(GX + offs, gx, mask=mask)
    tl.store(GWP + pid * D + cols, gw, mask=cmask)


NORM_BWD = dict(ROWS=16, num_warps=4)  # rows per program of the norm's backward (one partial weight gradient each;
# bench/gpu_check.py --norm-sweep)


def _norm_blocks(D: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(D)
    return max(1, 4096 // block_d), block_d


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, weight, eps: float):
        shape = x.shape
        D = shape[-1]
        x2 = x.reshape(-1, D).contiguous()
        N = x2.shape[0]
        h = torch.empty_like(x2) if y is not None else x2
        out = torch.empty(N, D, device=x.device, dtype=torch.promote_types(x.dtype, weight.dtype))
        rstd = torch.empty(N, device=x.device, dtype=torch.float32)
        block_r, block_d = _norm_blocks(D)
        if N:
            y2 = y.reshape(-1, D).contiguous() if y is not None else x2
            _norm_fwd_kernel[(triton.cdiv(N, block_r),)](x2, y2, weight, h, out, rstd, N, eps, D=D,
                                                         HAS_Y=y is not None, BLOCK_R=block_r, BLOCK_D=block_d,
                                                         num_warps=8)
        ctx.save_for_backward(h, weight, rstd)
        ctx.has_y, ctx.shape = y is not None, shape
        ctx.set_materialize_grads(False)
        return (h.view(shape), out.view(shape)) if y is not None else out.view(shape)

    @staticmethod
    def backward(ctx, *grads):
        gh, gout = grads if ctx.has_y else (None, grads[0])
        h, weight, rstd = ctx.saved_tensors
        N, D = h.shape
        gx = torch.empty_like(h)
        block_r, block_d = _norm_blocks(D)
        progs = triton.cdiv(N, NORM_BWD["ROWS"])
        gwp = torch.empty(progs, D, device=h.device, dtype=torch.float32)
        if gout is None:
            gout = torch.zeros(N, D, device=h.device, dtype=h.dtype)
        if N:
            gh2 = gh.reshape(N, D).contiguous() if gh is not None else h
            _norm_bwd_kernel[(progs,)](h, weight, rstd, gout.reshape(N, D).contiguous(), gh2, gx, gwp, N, D=D,
                                       HAS_GH=gh is not None, BLOCK_R=min(block_r, NORM_BWD["ROWS"]),
                                       BLOCK_D=block_d, **NORM_BWD)
        gx = gx.view(ctx.shape)
        return gx, (gx if ctx.has_y else None), gwp.sum(0).to(weight.dtype), None


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """ops.fused.add_rms_norm: x, y [..., D] (same dtype), weight [D] -> (h = x + y, rms_norm(h) * weight),
    one kernel each way."""
    return _AddRMSNorm.apply(x, y, weight, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """ops.fused.rms_norm, one kernel each way."""
    return _AddRMSNorm.apply(x, None, weight, eps)


# ----------------------------------------------------------------------------------------- MoE combine
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


# ----------------------------------------------------------------------------------------- MoE router
# The sigmoid router in one kernel per direction. fp32 logits from bf16 tokens without an fp32 copy of them:
# the fp32 weight is split in the kernel into three bf16 parts (hi + mid + lo == weight, exactly), so every
# product x * part is exact in fp32 and the three bf16 tensor-core products sum to the fp32 product (up to
# the order of the fp32 additions). Then sigmoid, top-k of score + bias by k argmax passes (ties to the
# lower expert), the chosen scores normalised and scaled, and (training) the per-expert token counts.
@triton.jit
def _split3(w, DT: tl.constexpr = tl.bfloat16):
    """fp32 -> three DT (bf16) tensors whose fp32 sum is w (DT fp32: w, 0, 0)."""
    hi = w.to(DT)
    r = w - hi.to(tl.float32)
    mid = r.to(DT)
    return hi, mid, (r - mid.to(tl.float32)).to(DT)


@launcher
@triton.jit
def _router_fwd_kernel(X, W, BIAS, IDX, WT, SEL, COUNTS, N, stride_x, scaling, D: tl.constexpr,
                       E: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, NORM: tl.constexpr, COUNT: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    cols = tl.arange(0, E)
    dd = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_N, E), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dmask = d0 + dd < D
        x = tl.load(X + rows.to(tl.int64)[:, None] * stride_x + (d0 + dd)[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        hi, mid, lo = _split3(tl.load(W + cols[:, None] * D + (d0 + dd)[None, :], mask=dmask[None, :], other=0.0),
                              X.dtype.element_ty)
        acc = tl.dot(x, tl.trans(hi), acc)
        acc = tl.dot(x, tl.trans(mid), acc)
        acc = tl.dot(x, tl.trans(lo), acc)
    s = tl.sigmoid(acc)
    choice = s + tl.load(BIAS + cols)[None, :]
    kcols = tl.arange(0, KP)
    sel = tl.zeros((BLOCK_N, KP), dtype=tl.float32)
    ids = tl.zeros((BLOCK_N, KP), dtype=tl.int32)
    chosen = tl.zeros((BLOCK_N, E), dtype=tl.int32)
    for j in tl.static_range(K):
        best = tl.argmax(choice, 1, tie_break_left=True)
        hit = cols[None, :] == best[:, None]
        sel = tl.where(kcols[None, :] == j, tl.sum(tl.where(hit, s, 0.0), 1)[:, None], sel)
        ids = tl.where(kcols[None, :] == j, best[:, None], ids)
        chosen += hit.to(tl.int32)
        choice = tl.where(hit, float("-inf"), choice)
    wt = sel
    if NORM:
        wt = sel / (tl.sum(sel, 1)[:, None] + 1e-20)
    out = rows.to(tl.int64)[:, None] * K + kcols[None, :]
    omask = rmask[:, None] & (kcols < K)[None, :]
    tl.store(IDX + out, ids.to(tl.int64), mask=omask)
    tl.store(WT + out, wt * scaling, mask=omask)
    tl.store(SEL + out, sel, mask=omask)
    if COUNT:
        tl.atomic_add(COUNTS + cols, tl.sum(tl.where(rmask[:, None], chosen, 0), 0))


@launcher
@triton.jit
def _router_bwd_kernel(GWT, IDX, SEL, G3, N, scaling, E: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                       NORM: tl.constexpr, BLOCK_N: tl.constexpr):
    """The logits' gradient as dense rows [hi | mid | lo] (bf16 parts, as _split3) of G3 [N, 3E]:
    w_j = c s_j / Z (Z = sum s + 1e-20) -> dL/ds_i = c (g_i / Z - sum_j g_j s_j / Z^2), times s_i (1 - s_i)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    kcols = tl.arange(0, KP)
    mask = rmask[:, None] & (kcols < K)[None, :]
    offs = rows.to(tl.int64)[:, None] * K + kcols[None, :]
    g = tl.load(GWT + offs, mask=mask, other=0.0)
    s = tl.load(SEL + offs, mask=mask, other=0.0)
    ids = tl.load(IDX + offs, mask=mask, other=-1).to(tl.int32)
    if NORM:
        z = tl.sum(s, 1) + 1e-20
        gs = scaling * (g / z[:, None] - (tl.sum(g * s, 1) / (z * z))[:, None])
    else:
        gs = scaling * g
    gl = gs * s * (1.0 - s)
    cols = tl.arange(0, E)
    dense = tl.zeros((BLOCK_N, E), dtype=tl.float32)
    for j in tl.static_range(K):
        pick = kcols[None, :] == j
        col = tl.sum(tl.where(pick, ids, 0), 1)
        dense = tl.where(cols[None, :] == col[:, None], tl.sum(tl.where(pick, gl, 0.0), 1)[:, None], dense)
    hi, mid, lo = _split3(dense)
    out = G3 + rows.to(tl.int64)[:, None] * (3 * E) + cols[None, :]
    tl.store(out, hi, mask=rmask[:, None])
    tl.store(out + E, mid, mask=rmask[:, None])
    tl.store(out + 2 * E, lo, mask=rmask[:, None])


def router_supported(x: torch.Tensor, num_experts: int, top_k: int) -> bool:
    """bf16 tokens, a power-of-two expert count of 16..256, top_k <= 16."""
    return (x.dtype == torch.bfloat16 and 16 <= num_experts <= 256 and num_experts & (num_experts - 1) == 0
            and 1 <= top_k <= min(16, num_experts))


def _router_meta(N: int, E: int, K: int, norm: bool) -> tuple[int, dict]:
    block_n = 64 if E <= 128 else 32
    return triton.cdiv(N, block_n), dict(E=E, K=K, KP=max(2, triton.next_power_of_2(K)), NORM=norm,
                                         BLOCK_N=block_n, num_warps=4 if E <= 64 else 8)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bf16 a @ b with the fp32 sums (cuBLAS's out_dtype; elsewhere the same numbers through fp32 inputs)."""
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return a.float() @ b.float()


class _Router(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, top_k: int, norm: bool, scaling: float, count: bool):
        x = _last_dim_contiguous(x)
        N, D = x.shape
        E = weight.shape[0]
        grid, meta = _router_meta(N, E, top_k, norm)
        idx = torch.empty(N, top_k, device=x.device, dtype=torch.long)
        w = torch.empty(N, top_k, device=x.device, dtype=torch.float32)
        sel = torch.empty_like(w)
        counts = torch.zeros(E if count else 1, device=x.device, dtype=torch.int64)
        if N:
            _router_fwd_kernel[(grid,)](x, weight.float().contiguous(), bias.float().contiguous(), idx, w, sel,
                                        counts, N, x.stride(0), float(scaling), D=D, COUNT=count,
                                        BLOCK_D=64, **meta)
        ctx.save_for_backward(x, weight, idx, sel)
        ctx.top_k, ctx.norm, ctx.scaling = top_k, norm, float(scaling)
        ctx.mark_non_differentiable(idx, counts)
        return idx, w, counts

    @staticmethod
    def backward(ctx, _gidx, gw, _gcounts):
        x, weight, idx, sel = ctx.saved_tensors
        N, D = x.shape
        E = weight.shape[0]
        grid, meta = _router_meta(N, E, ctx.top_k, ctx.norm)
        g3 = torch.empty(N, 3 * E, device=x.device, dtype=torch.bfloat16)
        if N:
            _router_bwd_kernel[(grid,)](gw.contiguous(), idx, sel, g3, N, ctx.scaling, **meta)
        # x's gradient bf16(g) @ bf16(W), as _RouterLogits gives a bf16 x
        gx = g3[:, :E].to(x.dtype) @ weight.to(x.dtype) if ctx.needs_input_grad[0] else None
        gwt = _mm_fp32(g3.t(), x).view(3, E, D).sum(0) if ctx.needs_input_grad[1] else None
        return gx, gwt, None, None, None, None, None


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int, norm: bool, scaling: float,
          count: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ops.moe.route with one expert group, bf16 x [N, D], weight [E, D] fp32 (see router_supported) ->
    (indices [N, k] long, weights [N, k] fp32, tokens per expert [E] long (zeros [1] unless count))."""
    return _Router.apply(x, weight, bias, top_k, norm, scaling, count)


# ----------------------------------------------------------------------------------------- MoE SwiGLU
@triton.jit
def _swiglu_rows(H, W, ORDER, rows, P, stride_h, I: tl.constexpr, HAS_ORDER: tl.constexpr, BLOCK_I: tl.constexpr):
    """Rows `rows` of h [P, 2I]: gate, up [BLOCK_R, BLOCK_I] fp32, each row's place in W (ORDER[row], else
    the row itself), its w [BLOCK_R] fp32, mask, column offsets."""
    cols = tl.arange(0, BLOCK_I)
    rmask = rows < P
    mask = rmask[:, None] & (cols < I)[None, :]
    h = H + rows.to(tl.int64)[:, None] * stride_h + cols[None, :]
    gate = tl.load(h, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h + I, mask=mask, other=0.0).to(tl.float32)
    wrow = tl.load(ORDER + rows, mask=rmask, other=0) if HAS_ORDER else rows
    w = tl.load(W + wrow, mask=rmask, other=0.0).to(tl.float32)
    return gate, up, wrow, w, mask, cols


@launcher
@triton.jit
def _swiglu_fwd_kernel(H, W, ORDER, A, P, stride_h, stride_a, I: tl.constexpr, HAS_ORDER: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    gate, up, _, w, mask, cols = _swiglu_rows(H, W, ORDER, rows, P, stride_h, I, HAS_ORDER, BLOCK_I)
    a = gate * tl.sigmoid(gate) * up * w[:, None]
    tl.store(A + rows.to(tl.int64)[:, None] * stride_a + cols[None, :], a.to(A.dtype.element_ty), mask=mask)


@launcher
@triton.jit
def _swiglu_bwd_kernel(H, W, ORDER, GA, GH, GW, P, stride_h, stride_ga, I: tl.constexpr, HAS_ORDER: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    """a = w * silu(g) * u: dg = w da u silu'(g), du = w da silu(g), dw = sum(da silu(g) u) in one pass."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    gate, up, wrow, w, mask, cols = _swiglu_rows(H, W, ORDER, rows, P, stride_h, I, HAS_ORDER, BLOCK_I)
    r64 = rows.to(tl.int64)[:, None]
    ga = tl.load(GA + r64 * stride_ga + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    tl.store(GW + wrow, tl.sum(ga * silu * up, 1), mask=rows < P)
    gs = ga * w[:, None]
    gh = GH + r64 * (2 * I) + cols[None, :]
    tl.store(gh, (gs * up * sig * (1.0 + gate * (1.0 - sig))).to(GH.dtype.element_ty), mask=mask)
    tl.store(gh + I, (gs * silu).to(GH.dtype.element_ty), mask=mask)


def _swiglu_launch(h: torch.Tensor) -> tuple[int, dict]:
    I = h.shape[1] // 2
    block_i = triton.next_power_of_2(I)
    block_r = max(1, 4096 // block_i)
    return triton.cdiv(h.shape[0], block_r), dict(I=I, BLOCK_R=block_r, BLOCK_I=block_i, num_warps=4)


class _SwigluWeighted(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, order):
        h = _last_dim_contiguous(h)
        w = w.contiguous()
        grid, meta = _swiglu_launch(h)
        a = torch.empty(h.shape[0], meta["I"], device=h.device, dtype=h.dtype)
        order_arg = order if order is not None else w
        _swiglu_fwd_kernel[(grid,)](h, w, order_arg, a, h.shape[0], h.stride(0), a.stride(0),
                                    HAS_ORDER=order is not None, **meta)
        ctx.save_for_backward(h, w, order)
        return a

    @staticmethod
    def backward(ctx, ga):
        h, w, order = ctx.saved_tensors
        ga = _last_dim_contiguous(ga)
        grid, meta = _swiglu_launch(h)
        gh = torch.empty(h.shape[0], h.shape[1], device=h.device, dtype=h.dtype)
        gw = torch.empty(w.shape[0], device=h.device, dtype=torch.float32)  # every place written once
        _swiglu_bwd_kernel[(grid,)](h, w, order if order is not None else w, ga, gh, gw, h.shape[0], h.stride(0),
                                    ga.stride(0), HAS_ORDER=order is not None, **meta)
        return gh, gw.to(w.dtype), None


def swiglu_weighted(h: torch.Tensor, w: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
    """h [P, 2I] (gate columns, then up), w [P] -> w * silu(gate) * up [P, I] in h's dtype, fp32 math;
    with order [P] (a permutation), row r takes w[order[r]] (w in the pairs' own order). The backward is
    one kernel that also gives w's gradient (the same formulas as ops.fused's body)."""
    return _SwigluWeighted.apply(h, w, order)


# ----------------------------------------------------------------------------------------- cross entropy
@launcher
@triton.jit
def _ce_fwd_kernel(X, TGT, LSE, LOSS, stride_x, V: tl.constexpr, IGNORE: tl.constexpr, BLOCK_V: tl.constexpr):
    """One row per program: lse = logsumexp(x) in fp32 (online over blocks of the row), loss = lse - x[t]."""
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    offs = tl.arange(0, BLOCK_V)
    x = tl.load(x_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    m = tl.max(x, 0)
    s = tl.sum(tl.exp(x - m), 0)
    for v0 in range(BLOCK_V, V, BLOCK_V):
        o = v0 + offs
        x = tl.load(x_row + o, mask=o < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    t = tl.load(TGT + row)
    valid = t != IGNORE
    xt = tl.load(x_row + tl.where(valid, t, 0)).to(tl.float32)
    tl.store(LSE + row, lse)
    tl.store(LOSS + row, tl.where(valid, lse - xt, 0.0))


@launcher
@triton.jit
def _ce_bwd_kernel(X, TGT, LSE, SCALE, G, stride_x, stride_g, V: tl.constexpr, IGNORE: tl.constexpr, BLOCK_V: tl.constexpr):
    """Program (row, block): g = (exp(x - lse) - [col == t]) * scale, 0 on ignored rows; G may be X."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < V
    t = tl.load(TGT + row)
    scale = tl.load(SCALE).to(tl.float32)
    scale = tl.where(t != IGNORE, scale, 0.0)
    lse = tl.load(LSE + row)
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.exp(x - lse)
    g = (tl.where(offs == t, p - 1.0, p)) * scale
    tl.store(G + row * stride_g + offs, g.to(G.dtype.element_ty), mask=mask)


CE_FWD_BLOCK = 4096
CE_BWD_BLOCK = 4096


def ce_forward(x: torch.Tensor, t: torch.Tensor, ignore: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, V] (last dim contiguous), t [N] -> (lse [N] fp32, loss per row [N] fp32)."""
    N, V = x.shape
    lse = torch.empty(N, device=x.device, dtype=torch.float32)
    rows = torch.empty_like(lse)
    if N:
        block = min(CE_FWD_BLOCK, triton.next_power_of_2(V))
        _ce_fwd_kernel[(N,)](x, t, lse, rows, x.stride(0), V=V, IGNORE=ignore, BLOCK_V=block,
                             num_warps=8 if block >= 2048 else 4)
    return lse, rows


def ce_backward(x: torch.Tensor, t: torch.Tensor, lse: torch.Tensor, g: torch.Tensor, out: torch.Tensor,
                ignore: int) -> None:
    """Write (softmax(x) - onehot(t)) * g into out [N, V] (may be x); g is a 0-dim device tensor."""
    N, V = x.shape
    if N:
        block = min(CE_BWD_BLOCK, triton.next_power_of_2(V))
        _ce_bwd_kernel[(N, triton.cdiv(V, block))](x, t, lse, g.float().reshape(1), out, x.stride(0),
                                                   out.stride(0), V=V, IGNORE=ignore, BLOCK_V=block,
                                                   num_warps=8 if block >= 2048 else 4)


# ----------------------------------------------------------------------------------------- AdamW
@launcher
@triton.jit
def _adamw_kernel(P, G, M, V, POW1, POW2, COEF, N, lr, beta1, beta2, wd, eps, HAS_COEF: tl.constexpr,
                  BLOCK: tl.constexpr):
    """One AdamW step over BLOCK elements of one tensor in fp32, written as torch's fused CUDA kernel writes it
    (the moments as fma(beta, m, fma(-beta, x, x)), IEEE square roots and quotients); POW1 / POW2: beta1 and
    beta2 to the power of the step (fp32, computed by torch.pow, as torch's kernel computes them). HAS_COEF: the
    gradient is first multiplied by COEF, with the roundings of torch._foreach_mul_ scaling it in place."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    bc1 = 1.0 - tl.load(POW1)
    bc2_sqrt = tl.sqrt_rn(1.0 - tl.load(POW2))
    step_size = tl.div_rn(lr, bc1)
    p = tl.load(P + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_COEF:  # torch._foreach_mul_(grads, coef) casts coef to the gradient's dtype first
        g = (g * tl.load(COEF).to(G.dtype.element_ty).to(tl.float32)).to(G.dtype.element_ty).to(tl.float32)
    m = tl.load(M + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(V + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.fma(-(lr * wd), p, p)
    m = tl.fma(beta1, m, tl.fma(-beta1, g, g))
    gg = g * g
    v = tl.fma(beta2, v, tl.fma(-beta2, gg, gg))
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - tl.div_rn(step_size * m, denom)
    tl.store(P + offs, p.to(P.dtype.element_ty), mask=mask)
    tl.store(M + offs, m.to(M.dtype.element_ty), mask=mask)
    tl.store(V + offs, v.to(V.dtype.element_ty), mask=mask)


ADAMW_BLOCK = 4096


def adamw_step(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, pow1: torch.Tensor,
               pow2: torch.Tensor, lr: float, beta1: float, beta2: float, weight_decay: float, eps: float,
               coef: torch.Tensor | None = None) -> None:
    """AdamW on one contiguous CUDA tensor in place (p, m, v updated; g read) in fp32 arithmetic, the
    hyper-parameters rounded to fp32; pow1 / pow2: 1-element fp32 device tensors, beta1 and beta2 to the power of
    this step's count; coef: a 1-element fp32 device tensor the gradient is scaled by (g itself is not written)."""
    n = p.numel()
    if n:
        _adamw_kernel[(triton.cdiv(n, ADAMW_BLOCK),)](p, g, m, v, pow1, pow2, coef if coef is not None else pow1, n,
                                                      float(lr), float(beta1), float(beta2), float(weight_decay),
                                                      float(eps), HAS_COEF=coef is not None, BLOCK=ADAMW_BLOCK,
                                                      num_warps=8)


# ----------------------------------------------------------------------------------------- sum of squares
@launcher
@triton.jit
def _sq_sum_kernel(X, OUT, N, out_offset, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """OUT[out_offset + program] = the fp32 sum of x^2 over the program's CHUNK elements of X."""
    base = tl.program_id(0).to(tl.int64) * CHUNK
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, CHUNK, BLOCK):
        offs = base + i + tl.arange(0, BLOCK)
        x = tl.load(X + offs, mask=offs < N, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(OUT + out_offset + tl.program_id(0), tl.sum(acc, 0))


SQ_BLOCK, SQ_CHUNK = 8192, 8192  # one block per program: 17% faster than 64k-element chunks (H100)


def sq_sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The sum of squares of every element of contiguous CUDA tensors (a 0-dim fp32 tensor): one pass at copy
    speed, fp32 sums per chunk of SQ_CHUNK elements, then one sum of the chunks (the same order every time)."""
    chunks = [triton.cdiv(t.numel(), SQ_CHUNK) for t in tensors]
    part = torch.empty(sum(chunks), device=tensors[0].device, dtype=torch.float32)
    offset = 0
    for t, c in zip(tensors, chunks):
        if c:
            _sq_sum_kernel[(c,)](t, part, t.numel(), offset, BLOCK=SQ_BLOCK, CHUNK=SQ_CHUNK, num_warps=8)
        offset += c
    return part.sum()
