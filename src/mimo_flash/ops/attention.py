"""Attention with GQA, Q/K dim != V dim, an optional sliding window and an optional sink.

Which key a query may see is defined by positions and segments, never by tensor indices, so the
same function serves plain causal batches, left padding, packed documents and a KV cache:

    allowed(i, j) = k_pos[j] <= q_pos[i]                      (causal)
                and q_pos[i] - k_pos[j] < window              (SWA layers only; window = keys seen)
                and q_seg[i] == k_seg[j]                      (same document; padding keys get -1)

The sink is one logit per query head that joins the softmax denominator and has no value:
    p_ij = exp(a_ij) / (exp(sink_h) + sum_j' exp(a_ij')).

Backends:
    "reference" - the specification in code: full score matrix, explicit softmax with a sink column.
    "blocked"   - CPU-efficient SWA for aligned queries/keys (training, prefill): query block b attends
                  key blocks b-1 and b only, so it never builds T x T scores. Exact.
    "sdpa"      - torch SDPA with a boolean mask for layers without a sink.
    "auto"      - picks among the above (and GPU kernels registered in `_FAST`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class AttnMeta:
    """Positions and segments of queries and keys.

    q_pos: [B, Tq] long; k_pos: [B, Tk] long; q_seg / k_seg: [B, Tq] / [B, Tk] long or None
    (None = one segment, nothing padded). `aligned` is True when keys are exactly the queries
    (no cache), which lets banded kernels skip index arithmetic.
    `plain` is True when positions are 0..T-1 in every row and there are no segments: pure causal.
    """

    q_pos: torch.Tensor
    k_pos: torch.Tensor
    q_seg: torch.Tensor | None = None
    k_seg: torch.Tensor | None = None
    aligned: bool = True
    plain: bool = False


def allowed_mask(meta: AttnMeta, window: int | None) -> torch.Tensor:
    """Boolean [B, 1, Tq, Tk]: may query i see key j."""
    qp, kp = meta.q_pos[:, :, None], meta.k_pos[:, None, :]
    m = kp <= qp
    if window is not None:
        m = m & (qp - kp < window)
    if meta.q_seg is not None:
        m = m & (meta.q_seg[:, :, None] == meta.k_seg[:, None, :])
    return m[:, None]


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Upcast half precisions to fp32 for the softmax path; fp32 and fp64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _expand_kv(k: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, Hkv, T, D] -> [B, heads, T, D] (each kv head serves heads / Hkv query heads)."""
    rep = heads // k.shape[1]
    return k if rep == 1 else k.repeat_interleave(rep, dim=1)


def _softmax_probs(scores: torch.Tensor, mask: torch.Tensor, sink: torch.Tensor | None) -> torch.Tensor:
    """scores [B, H, Tq, Tk] (fp32 or fp64), mask bool broadcastable, sink [H] -> probabilities [B, H, Tq, Tk].

    The sink joins the denominator as one extra column and is dropped afterwards.
    A row that sees no key (a padding query) gets all-zero probabilities instead of NaN.
    """
    scores = scores.masked_fill(~mask, float("-inf"))
    if sink is not None:
        col = sink.to(scores.dtype).view(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1)
        scores = torch.cat([scores, col], dim=-1)
    mx = scores.amax(dim=-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    p = torch.exp(scores - mx)
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    return p[..., :-1] if sink is not None else p


def attention_reference(q, k, v, meta: AttnMeta, scale: float, window: int | None = None,
                        sink: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, Tq, Dqk], k [B, Hkv, Tk, Dqk], v [B, Hkv, Tk, Dv], sink [H] or None -> [B, H, Tq, Dv]."""
    H = q.shape[1]
    k, v = _expand_kv(k, H), _expand_kv(v, H)
    scores = (_acc(q) @ _acc(k).transpose(-1, -2)) * scale
    return (_softmax_probs(scores, allowed_mask(meta, window), sink) @ _acc(v)).to(q.dtype)


def attention_blocked(q, k, v, meta: AttnMeta, scale: float, window: int,
                      sink: torch.Tensor | None = None) -> torch.Tensor:
    """Banded SWA for aligned q/k (Tq == Tk, key j is token j). Shapes as attention_reference.

    Valid because within one segment positions advance with the index, so every allowed key of
    query i lies in [i - window + 1, i]: block b (size `window`) needs key blocks b-1 and b.
    """
    B, H, T, _ = q.shape
    W = window
    nb = (T + W - 1) // W
    pad = nb * W - T
    k, v = _expand_kv(k, H), _expand_kv(v, H)

    def blocks(x, fill=0):  # [B, H, T, D] -> [B, H, nb, W, D] (padded at the end)
        return F.pad(x, (0, 0, 0, pad), value=fill).view(B, H, nb, W, x.shape[-1])

    qb = blocks(_acc(q))
    kb, vb = blocks(_acc(k)), blocks(_acc(v))
    # keys of block b: previous block then this block -> [B, H, nb, 2W, D]
    prev = lambda x: torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, :-1]], dim=2)
    k2 = torch.cat([prev(kb), kb], dim=3)
    v2 = torch.cat([prev(vb), vb], dim=3)
    scores = (qb @ k2.transpose(-1, -2)) * scale  # [B, H, nb, W, 2W]

    def meta_blocks(x, fill):  # [B, T] -> [B, nb, W]
        return F.pad(x, (0, pad), value=fill).view(B, nb, W)

    qp = meta_blocks(meta.q_pos, -1)
    kp = meta_blocks(meta.k_pos, 1 << 40)  # padded keys lie in the future
    kp2 = torch.cat([torch.cat([torch.full_like(kp[:, :1], 1 << 40), kp[:, :-1]], 1), kp], dim=2)
    m = (kp2[:, :, None, :] <= qp[:, :, :, None]) & (qp[:, :, :, None] - kp2[:, :, None, :] < W)
    if meta.q_seg is not None:
        qs = meta_blocks(meta.q_seg, -2)
        ks = meta_blocks(meta.k_seg, -3)
        ks2 = torch.cat([torch.cat([torch.full_like(ks[:, :1], -3), ks[:, :-1]], 1), ks], dim=2)
        m = m & (qs[:, :, :, None] == ks2[:, :, None, :])
    p = _softmax_probs(scores.reshape(B, H, nb * W, 2 * W), m.reshape(B, 1, nb * W, 2 * W), sink)
    out = p.view(B, H, nb, W, 2 * W) @ v2  # [B, H, nb, W, Dv]
    return out.reshape(B, H, nb * W, -1)[:, :, :T].to(q.dtype)


def attention_sdpa(q, k, v, meta: AttnMeta, scale: float, window: int | None = None,
                   sink: torch.Tensor | None = None) -> torch.Tensor:
    """torch SDPA for layers without a sink. Shapes as attention_reference."""
    assert sink is None, "sdpa backend has no sink"
    H = q.shape[1]
    k, v = _expand_kv(k, H), _expand_kv(v, H)
    if meta.plain and window is None and q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    mask = allowed_mask(meta, window)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    # rows that see no key (only padding queries can) come out NaN from SDPA; zero them
    return torch.nan_to_num(out, nan=0.0) if not meta.plain else out


# Fast kernels (GPU) register here: name -> (predicate(q, meta, window, sink) -> bool, fn).
_FAST: dict[str, tuple[Callable[..., bool], Callable[..., torch.Tensor]]] = {}
BACKENDS = ("auto", "reference", "blocked", "sdpa")


def register_backend(name: str, applies: Callable[..., bool], fn: Callable[..., torch.Tensor]) -> None:
    _FAST[name] = (applies, fn)


# Fast kernels that also apply RoPE and the value scale, from the q/k/v projection's output (GPU), register
# here: name -> fn(qkv, cos, sin, dims, meta, scale, window, sink) -> output, or None where they do not apply.
_FAST_QKV: dict[str, Callable[..., torch.Tensor | None]] = {}


def register_qkv_backend(name: str, fn: Callable[..., torch.Tensor | None]) -> None:
    _FAST_QKV[name] = fn


def attention_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dims: tuple[int, int, int, int, float],
                  meta: AttnMeta, scale: float, window: int | None = None, sink: torch.Tensor | None = None,
                  backend: str = "auto") -> torch.Tensor | None:
    """Attention straight from the projection's output, where a registered kernel of `backend` ("auto": any)
    takes it: qkv [B, T, heads * qk_dim + kv_heads * (qk_dim + v_dim)], cos / sin [B or 1, T, R],
    dims = (heads, kv_heads, qk_dim, v_dim, v_scale) -> [B, heads, T, v_dim], or None (then rotate with
    ops.fused.rope_qkv and call `attention`; the result is the same up to rounding)."""
    for name, fn in _FAST_QKV.items():
        if backend in ("auto", name):
            out = fn(qkv, cos, sin, dims, meta, scale, window, sink)
            if out is not None:
                return out
    return None


def attention(q, k, v, meta: AttnMeta, scale: float, window: int | None = None,
              sink: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Dispatch. q [B, H, Tq, Dqk], k [B, Hkv, Tk, Dqk], v [B, Hkv, Tk, Dv] -> [B, H, Tq, Dv]."""
    if backend == "reference":
        return attention_reference(q, k, v, meta, scale, window, sink)
    if backend == "blocked":
        if window is None or not meta.aligned:
            return attention_reference(q, k, v, meta, scale, window, sink)
        return attention_blocked(q, k, v, meta, scale, window, sink)
    if backend == "sdpa":
        if sink is not None:
            raise ValueError("attention backend 'sdpa' cannot apply a sink; use 'auto' or 'reference'")
        return attention_sdpa(q, k, v, meta, scale, window, sink)
    if backend in _FAST:
        return _FAST[backend][1](q, k, v, meta, scale, window, sink)
    if backend != "auto":
        raise ValueError(f"unknown attention backend {backend!r}; choose from {BACKENDS + tuple(_FAST)}")
    for applies, fn in _FAST.values():
        if applies(q, meta, window, sink):
            return fn(q, k, v, meta, scale, window, sink)
    if window is not None and meta.aligned and q.shape[2] > 2 * window:
        return attention_blocked(q, k, v, meta, scale, window, sink)
    if sink is None:
        return attention_sdpa(q, k, v, meta, scale, window, sink)
    return attention_reference(q, k, v, meta, scale, window, sink)
