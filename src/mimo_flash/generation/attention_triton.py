"""The Triton backend of cache_attention (generation/attention.py): a few new queries per row against the KV cache,
each row reading its keys only up to its own positions, so that a decode step's CUDA graph needs no bucket of the
cache length (options().cache_attention = "triton").

Program (b, g, sp): row b, kv head g, key split sp. Its query rows are the REP query heads of kv head g times the
Tq new tokens (rows (r, t) as cache_attention folds them), padded to BLOCK_M; it visits the key blocks of its split
that lie below the row's bound: on a full layer (no window) the cache slot j holds position j, so no key at or past
max_t(q_pos[b, t]) + 1 can be seen; a ring (window) is read whole. Inside a block the rule of ops/attention.py is
applied per pair (k_pos <= q_pos, q_pos - k_pos < window, q_seg == k_seg), with an online softmax in fp32. Each
program stores its unnormalised output, running max and sum; `combine` joins the splits and the sink (a term
exp(sink_h) of the denominator, no value) in torch ops, which torch.compile fuses into the step.
Run on CUDA, and in Triton's CPU interpreter by the tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.kernels.launch import STATIC_LOOPS

MAX_ROWS = 64  # query rows (heads per kv head x new tokens) a program takes; more: the torch path
MAX_SPLITS = 32
# BLOCK_N keys per block; SPLIT_KEYS keys per split (the last split takes the rest; at most MAX_SPLITS splits),
# halved down to MIN_SPLIT_KEYS while the grid (rows x kv heads x splits) has fewer than min_programs programs;
# split_d: a Q/K head dim that is not a power of two (192 in the release) as two products (128 + 64) instead of
# one padded to the next power of two (256); warps, stages: the launch's. bench/cache_attention.py's best on an H100
# over batch-64 steps of 1 and 2 tokens, full and SWA layers (docs/BENCHMARKS.md): 15% less time than 64-key blocks
# without split_d, most of it on the SWA rings. At batch 16 the best splits were 128 keys long on every shape (a full
# layer's kernel 16.5 us against 22.8 with 512), which min_programs (2 programs per SM of an H100) gives: 512 keys at
# batch 64 (512 programs on a full layer), 128 at batch 16
ATTN_TILES = dict(BLOCK_N=32, SPLIT_KEYS=512, split_d=True, warps=4, stages=2, min_programs=264)
MIN_SPLIT_KEYS = 128


@triton.jit
def _scores(q, k_row, n, nmask, sks, d, DQK: tl.constexpr, IEEE: tl.constexpr):
    """q [BLOCK_M, len(d)] against the keys n (columns d of each, those below DQK) -> [BLOCK_M, BLOCK_N] fp32."""
    k = tl.load(k_row + n[None, :] * sks + d[:, None], mask=nmask[None, :] & (d[:, None] < DQK), other=0.0)
    if IEEE:
        return tl.dot(q, k, input_precision="ieee")
    return tl.dot(q, k)


@triton.jit
def _block(q, q2, qpos, qseg, m_i, l_i, acc, k_row, v_row, kpos_ptr, kseg_ptr, skp, sksg, n0, hi, window, scale,
           sks, svs, d, d2, dv, DQK: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_D: tl.constexpr,
           HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr):
    """One block of keys [n0, n0 + BLOCK_N) (those below hi) into the online softmax of the program's rows. q: the
    queries' first len(d) dims, q2 their dims d2 (SPLIT_D)."""
    n = n0 + tl.arange(0, BLOCK_N)
    nmask = n < hi
    kpos = tl.load(kpos_ptr + n * skp, mask=nmask, other=0)
    kseg = tl.load(kseg_ptr + n * sksg, mask=nmask, other=-4)
    s = _scores(q, k_row, n, nmask, sks, d, DQK, IEEE)
    if SPLIT_D:
        s += _scores(q2, k_row, n, nmask, sks, d2, DQK, IEEE)
    ok = (kpos[None, :] <= qpos[:, None]) & (qseg[:, None] == kseg[None, :]) & nmask[None, :]
    if HAS_WINDOW:
        ok = ok & (qpos[:, None] - kpos[None, :] < window)
    s = tl.where(ok, s * scale, float("-inf")).to(tl.float32)  # (inductor passes a float argument as fp64)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    v = tl.load(v_row + n[:, None] * svs + dv[None, :], mask=nmask[:, None], other=0.0)
    if IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + pv


@triton.jit
def _cache_attn_kernel(q_ptr, k_ptr, v_ptr, qpos_ptr, qseg_ptr, kpos_ptr, kseg_ptr, acc_ptr, m_ptr, l_ptr,
                       S, Tq, window, scale, sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, sqpb, sqpt, sqsb, sqst,
                       skpb, skp, sksgb, sksg,
                       REP: tl.constexpr, HKV: tl.constexpr, NS: tl.constexpr, DQK: tl.constexpr,
                       DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_D: tl.constexpr,
                       BLOCK_D2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr, HAS_WINDOW: tl.constexpr,
                       IEEE: tl.constexpr, STATIC: tl.constexpr):
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    b = pid // HKV
    g = pid % HKV
    rows = tl.arange(0, BLOCK_M)
    head = g * REP + rows // Tq  # row (r, t): query head g * REP + r, token t
    t = rows % Tq
    rmask = rows < REP * Tq
    d = tl.arange(0, BLOCK_D)  # the head dims of the first product; SPLIT_D: the rest, from BLOCK_D on
    d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
    dv = tl.arange(0, DV)
    qpos = tl.load(qpos_ptr + b * sqpb + t * sqpt, mask=rmask, other=-1)
    qseg = tl.load(qseg_ptr + b * sqsb + t * sqst, mask=rmask, other=-3)
    q_rows = q_ptr + b * sqb + head[:, None] * sqh + t[:, None] * sqt
    q = tl.load(q_rows + d[None, :], mask=rmask[:, None] & (d[None, :] < DQK), other=0.0)
    q2 = q
    if SPLIT_D:
        q2 = tl.load(q_rows + d2[None, :], mask=rmask[:, None] & (d2[None, :] < DQK), other=0.0)
    if HAS_WINDOW:
        bound = S
    else:  # slot j holds position j: nothing at or past the row's last position + 1 is seen
        bound = tl.minimum(tl.max(tl.where(rmask, qpos, -1), 0) + 1, S)
    # a row with no valid query (segment < 0 in every column: done or not speculating, frozen) reads no keys: what
    # the mask would give it anyway (no score kept; its output the sink's zeros)
    bound = tl.where(tl.max(tl.where(rmask, qseg, -1), 0) >= 0, bound, 0)
    lo = sp * BLOCKS * BLOCK_N
    hi = tl.minimum(lo + BLOCKS * BLOCK_N, bound)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV], tl.float32)
    k_row = k_ptr + b * skb + g * skh
    v_row = v_ptr + b * svb + g * svh
    if STATIC:  # Triton's interpreter: no loop to a runtime bound
        for j in range(BLOCKS):
            if lo + j * BLOCK_N < hi:
                m_i, l_i, acc = _block(q, q2, qpos, qseg, m_i, l_i, acc, k_row, v_row, kpos_ptr + b * skpb,
                                       kseg_ptr + b * sksgb, skp, sksg, lo + j * BLOCK_N, hi, window, scale, sks,
                                       svs, d, d2, dv, DQK, BLOCK_N, SPLIT_D, HAS_WINDOW, IEEE)
    else:
        for n0 in range(lo, hi, BLOCK_N):
            m_i, l_i, acc = _block(q, q2, qpos, qseg, m_i, l_i, acc, k_row, v_row, kpos_ptr + b * skpb,
                                   kseg_ptr + b * sksgb, skp, sksg, n0, hi, window, scale, sks, svs, d, d2, dv, DQK,
                                   BLOCK_N, SPLIT_D, HAS_WINDOW, IEEE)
    base = (pid * NS + sp) * BLOCK_M + rows
    tl.store(m_ptr + base, m_i)
    tl.store(l_ptr + base, l_i)
    tl.store(acc_ptr + base[:, None] * DV + dv[None, :], acc)


DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # (tl.dot takes no fp64)


def fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """What the kernel takes: at most MAX_ROWS query rows per kv head, a power-of-two value dim of 16 .. 256, and
    one of DTYPES for all three."""
    B, H, Tq, D = q.shape
    dv = v.shape[-1]
    return (H // k.shape[1] * Tq <= MAX_ROWS and 16 <= dv <= 256 and dv & (dv - 1) == 0 and D <= 256
            and q.dtype == k.dtype == v.dtype and q.dtype in DTYPES)


def cache_attention_triton(q, k, v, q_pos, q_seg, k_pos, k_seg, scale: float, window: int | None,
                           sink: torch.Tensor | None, tiles: dict | None = None) -> torch.Tensor:
    """cache_attention's contract (generation/attention.py) with the positions and segments given: q [B, H, Tq, Dqk],
    k [B, Hkv, S, Dqk], v [B, Hkv, S, Dv] (last dims contiguous), q_pos / q_seg [B, Tq], k_pos / k_seg [B, S]
    (integer tensors of any dtype and strides, rows broadcast where their first dim is 1; segments None: one segment),
    sink [H] or None -> [B, H, Tq, Dv] in v's dtype. Without a window, slot j must hold position j (the full layers'
    cache). tiles: entries that replace ATTN_TILES'."""
    rep = q.shape[1] // k.shape[1]
    acc, m, l = attend_splits(q, k, v, q_pos, q_seg, k_pos, k_seg, scale, window, tiles)
    return combine(acc, m, l, sink, q.shape[0], q.shape[1], q.shape[2], rep).to(v.dtype)


def split_plan(programs: int, S: int, cfg: dict) -> tuple[int, int]:
    """(splits, key blocks per split) over a cache of S slots for `programs` (rows x kv heads) programs a split, at
    tiles cfg (ATTN_TILES' keys): splits of SPLIT_KEYS keys, halved down to MIN_SPLIT_KEYS while the grid has fewer
    than min_programs programs, at most MAX_SPLITS of them (longer then), whole key blocks covering S."""
    block_n, split_keys = cfg["BLOCK_N"], cfg["SPLIT_KEYS"]
    while split_keys > MIN_SPLIT_KEYS and programs * -(-S // split_keys) < cfg["min_programs"]:
        split_keys = max(MIN_SPLIT_KEYS, split_keys // 2)
    blocks = -(-min(S, split_keys) // block_n)
    ns = min(MAX_SPLITS, -(-S // (blocks * block_n)))
    return ns, -(-S // (ns * block_n))  # (the splits cover S)


def attend_splits(q, k, v, q_pos, q_seg, k_pos, k_seg, scale: float, window: int | None, tiles: dict | None = None):
    """The kernel alone (cache_attention_triton's arguments but the sink): each split's unnormalised output,
    running max and sum, as combine() takes them."""
    cfg = dict(ATTN_TILES, **(tiles or {}))
    block_n = cfg["BLOCK_N"]
    B, H, Tq, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    rep = H // Hkv
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("cache_attention_triton takes tensors whose last dimension is contiguous")
    block_m = max(16, triton.next_power_of_2(rep * Tq))
    ns, blocks = split_plan(B * Hkv, S, cfg)
    block_d, block_d2 = max(16, triton.next_power_of_2(D)), 16
    split_d = cfg["split_d"] and block_d != D and D > 16
    if split_d:  # e.g. 192 = 128 + 64 instead of 256
        block_d //= 2
        block_d2 = max(16, triton.next_power_of_2(D - block_d))
    dev = q.device
    acc = torch.empty(B * Hkv, ns, block_m, Dv, device=dev, dtype=torch.float32)
    m = torch.empty(B * Hkv, ns, block_m, device=dev, dtype=torch.float32)
    l = torch.empty_like(m)
    # the tables as the cache holds them (any integer dtype, broadcast rows and sliced columns through strides): no
    # conversion kernel before each layer's attention
    qp = q_pos.expand(B, Tq)
    kp = k_pos.expand(B, S)
    qs = torch.zeros(1, 1, dtype=torch.int32, device=dev).expand(B, Tq) if q_seg is None else q_seg.expand(B, Tq)
    ks = torch.zeros(1, 1, dtype=torch.int32, device=dev).expand(B, S) if k_seg is None else k_seg.expand(B, S)
    for name, x in (("q_pos", qp), ("q_seg", qs), ("k_pos", kp), ("k_seg", ks)):
        if x.dtype.is_floating_point or x.dtype == torch.bool:
            raise ValueError(f"cache_attention_triton: {name} must be an integer tensor, got {x.dtype}")
    _cache_attn_kernel[(B * Hkv, ns)](
        q, k, v, qp, qs, kp, ks, acc, m, l, S, Tq, 0 if window is None else window, scale,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), *qp.stride(), *qs.stride(), *kp.stride(), *ks.stride(), REP=rep, HKV=Hkv, NS=ns, DQK=D, DV=Dv,
        BLOCK_M=block_m, BLOCK_D=block_d, SPLIT_D=split_d, BLOCK_D2=block_d2, BLOCK_N=block_n, BLOCKS=blocks,
        HAS_WINDOW=window is not None, IEEE=q.dtype == torch.float32, STATIC=STATIC_LOOPS, num_warps=cfg["warps"],
        num_stages=cfg["stages"])
    return acc, m, l


def combine(acc, m, l, sink, B: int, H: int, Tq: int, rep: int) -> torch.Tensor:
    """The splits' unnormalised outputs acc [B * Hkv, NS, BLOCK_M, Dv], maxima and sums m, l [B * Hkv, NS, BLOCK_M]
    and the sink [H] -> [B, H, Tq, Dv] fp32 (a row that sees nothing, and no sink: zeros)."""
    Hkv, Dv = H // rep, acc.shape[-1]
    rows = rep * Tq
    acc, m, l = acc[:, :, :rows], m[:, :, :rows], l[:, :, :rows]
    mx = m.amax(1)  # [B * Hkv, rows]
    if sink is not None:
        s = sink.float().view(Hkv, rep, 1).expand(Hkv, rep, Tq).reshape(1, Hkv, rows)
        s = s.expand(B, Hkv, rows).reshape(B * Hkv, rows)
        mx = torch.maximum(mx, s)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    w = torch.exp(m - mx[:, None])  # [B * Hkv, NS, rows] (0 for empty splits)
    den = (w * l).sum(1)
    if sink is not None:
        den = den + torch.exp(s - mx)
    out = (acc * w[..., None]).sum(1) / den.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    return out.view(B, Hkv, rep, Tq, Dv).reshape(B, H, Tq, Dv)
