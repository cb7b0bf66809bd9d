"""Attention of a few new queries over the KV cache (decode, verification, prefill chunks).

Grouped-query: the query heads that share a kv head are folded into the query rows, so keys and values
are read once per kv head (no repeat_interleave copy of the cache). The rules of ops/attention.py apply
(positions, window, segments, sink); this function is tested against attention_reference.
Backends (options().cache_attention): "torch", the body below (what torch.compile fuses into a decode step; a full
layer reads the keys of the step's cache bucket); "triton", generation/attention_triton.py on CUDA, whose programs
read each row's keys only up to its own position, so that graphed steps of more than one row need no cache
bucket (runner.graph_bucket); "auto" (the default), the Triton kernel on CUDA for steps of several query tokens
a row (speculative verification, MTP re-runs) and for one-token steps of at least TRITON_ROWS rows, the body for
one-token steps of fewer (see TRITON_ROWS). Prefill-sized calls (more than MAX_ROWS query rows per kv head) keep
the body.
"""

from __future__ import annotations

import torch

from ..ops.attention import AttnMeta
from ..options import options

CACHE_ATTENTION = ("auto", "torch", "triton")  # options().cache_attention
# "auto": one-token steps of this many rows or more take the kernel. bench/cache_attention.py on an H100, the mini
# preset's shapes, each compiled: at batch 64 the kernel took 53 / 31 us on a full / SWA layer against the body's
# 62 / 59; at batch 16, 23 / 15 against 16 / 13, and plain steps' graphs took the same time either way (1.45 ms).
# Summed over a step's layers (3 full, 10 SWA) and interpolated, the two cross near 21 rows (docs/BENCHMARKS.md)
TRITON_ROWS = 32


def uses_triton(mode: str, cuda: bool, tokens: int, rows: int) -> bool:
    """Whether cache_attention takes the Triton kernel (where it fits) under option value `mode`, for queries on
    CUDA or not, of `tokens` new tokens in each of `rows` rows."""
    return cuda and (mode == "triton" or (mode == "auto" and (tokens > 1 or rows >= TRITON_ROWS)))


def cache_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMeta, scale: float,
                    window: int | None = None, sink: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, Tq, Dqk], k [B, Hkv, S, Dqk], v [B, Hkv, S, Dv], sink [H] or None -> [B, H, Tq, Dv].

    meta: q_pos/q_seg [B, Tq], k_pos/k_seg [B, S]. Scores are taken in the input dtype (fp32 accumulation)
    and the softmax in fp32, as in transformers' eager attention; fp32 inputs give fp32 throughout. Traced
    by torch.compile for a single decode row, both products are multiply-and-sum reductions in fp32,
    which fuse with the softmax instead of two tiny GEMM calls.
    A query that sees no key and has no sink gets zeros.
    """
    mode = options().cache_attention
    if mode not in CACHE_ATTENTION:
        raise ValueError(f"option cache_attention must be one of {CACHE_ATTENTION}, got {mode!r}")
    if uses_triton(mode, q.is_cuda, q.shape[2], q.shape[0]):
        from .attention_triton import cache_attention_triton, fits
        if fits(q, k, v):
            return cache_attention_triton(q, k, v, meta.q_pos, meta.q_seg, meta.k_pos, meta.k_seg, scale, window,
                                          sink)
    B, H, Tq, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    rep = H // Hkv
    qg = q.reshape(B, Hkv, rep * Tq, D)  # rows (r, t) of kv head g = query head g * rep + r at t
    reduce = torch.compiler.is_compiling() and B * Tq == 1  # one decode row: fused fp32 reductions
    if reduce:
        scores = (qg.float()[:, :, :, None, :] * k.float()[:, :, None]).sum(-1).view(B, Hkv, rep, Tq, S) * scale
    else:
        scores = torch.matmul(qg, k.transpose(-1, -2)).float().view(B, Hkv, rep, Tq, S) * scale
    qp, kp = meta.q_pos[:, None, None, :, None], meta.k_pos[:, None, None, None, :]
    allowed = kp <= qp
    if window is not None:
        allowed = allowed & (qp - kp < window)
    if meta.q_seg is not None:
        allowed = allowed & (meta.q_seg[:, None, None, :, None] == meta.k_seg[:, None, None, None, :])
    scores = scores.masked_fill(~allowed, float("-inf"))
    mx = scores.amax(-1, keepdim=True)
    if sink is not None:
        s = sink.float().view(1, Hkv, rep, 1, 1)
        mx = torch.maximum(mx, s)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    e = torch.exp(scores - mx)
    den = e.sum(-1, keepdim=True)
    if sink is not None:
        den = den + torch.exp(s - mx)
    p = e / den.clamp_min(torch.finfo(torch.float32).tiny)
    if reduce:
        out = (p.view(B, Hkv, rep * Tq, S, 1) * v.float()[:, :, None]).sum(-2).to(v.dtype)
    else:
        out = torch.matmul(p.to(v.dtype).view(B, Hkv, rep * Tq, S), v)  # [B, Hkv, rep * Tq, Dv]
    return out.view(B, H, Tq, v.shape[-1])
