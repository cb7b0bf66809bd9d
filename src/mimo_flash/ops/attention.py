"""The attention op: GQA, Q/K dim != V dim, an optional sliding window and an optional sink; its reference,
its backends and the dispatch among them.

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
CUDA backends (`_FAST`, in the order "auto" tries them; none applies to CPU tensors):
    "cudnn"     - full-attention layers of plain causal batches (positions 0..T-1 in every row, no
                  segments, no sink, queries = keys): torch SDPA restricted to cuDNN with is_causal.
                  cuDNN takes Q/K 192 with V 128, which the flash backend refuses.
    "triton"    - layers whose queries are the keys (no cache), plain or with segments (packed documents,
                  padding): SWA layers (sink included), and full-attention layers that cuDNN does not take.
                  The banded Triton kernels of ops/kernels/swa_attention.py, forward and backward, visit only
                  the key tiles within the window (without one, every tile up to the query's). Without a
                  cache the model hands them the q/k/v projection's output (attention_qkv): their backward
                  writes the projection's gradient, unrotated and scaled, so RoPE's backward costs no pass of
                  its own. (Full-attention layers of packed documents went to "flex" before. In the mini
                  preset's GPU training (H100, torch 2.11) their gradients blew up, to norms of 1e11 with a
                  finite loss, a few dozen steps in, where the eager path (FlexAttention's own reference)
                  trained on: docs/BENCHMARKS.md.)
    "flex"      - everything else with at least MIN_FLEX_QUERIES queries: queries against longer keys (a cache), SWA
                  batches with positions but no segments. FlexAttention runs only the 128 x 128 tiles that the block
                  mask lists; the block mask comes from AttnMeta (causal, window, segments), GQA is native, and the
                  sink is folded in through the returned log-sum-exp, out * sigmoid(lse - sink), which is exact in
                  value and in gradient (the backward takes the gradient of lse).
                  `attention_flex` also runs on CPU (eager FlexAttention, forward only), which the tests use.
    "auto"      - the first CUDA backend that applies, else blocked (long aligned SWA), sdpa (no sink) or
                  the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention import flex_attention as _fa

from ..options import options
from .compiled import acc, compile_scoped, cuda_compiled, kernels

BLOCK = 128  # FlexAttention's tile of the block mask (queries x keys)
MIN_FLEX_QUERIES = 128  # fewer queries (decode steps) go to the generic paths (flex's decoding kernel
# refuses these head dims)
_FAR = 1 << 40  # a position no query reaches


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


@cuda_compiled
def sink_scale(out: torch.Tensor, lse: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    """Fold the sink into an attention output computed without it.

    out [B, H, T, Dv], lse [B, H, T] (log-sum-exp of each row's scores), sink [H] ->
    out * sigmoid(lse - sink): the same as a softmax whose denominator also holds exp(sink).
    """
    factor = torch.sigmoid(acc(lse) - acc(sink)[:, None])
    return (acc(out) * factor[..., None]).to(out.dtype)


# ----------------------------------------------------------------------------------------- block mask
def _block_range(x: torch.Tensor, n_blocks: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, T] -> (min, max) over each block of `block` columns, [B, n_blocks] each.

    The last block is padded with its last real value, which changes neither min nor max.
    """
    B, T = x.shape
    pad = n_blocks * block - T
    if pad:
        x = torch.cat([x, x[:, -1:].expand(B, pad)], dim=1)
    x = x.view(B, n_blocks, block)
    return x.amin(-1), x.amax(-1)


def block_tables(q_pos: torch.Tensor, k_pos: torch.Tensor, q_seg: torch.Tensor | None,
                 k_seg: torch.Tensor | None, window: int | None,
                 block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Which (query block, key block) tiles may hold an allowed pair, and which hold only allowed pairs.

    q_pos [B, Tq], k_pos [B, Tk], q_seg / k_seg [B, Tq] / [B, Tk] or None ->
    (partial [B, nq, nk] bool, full [B, nq, nk] bool), disjoint. A tile in neither holds no allowed
    pair; `full` tiles skip the mask function. Decided from each block's min/max of positions and
    segments, so it is conservative (never drops an allowed pair) for any positions and segments,
    and tight for the usual ones (positions rising within documents, documents contiguous).
    Tiles that hang over the end of the queries or keys are never `full` (the kernel masks the overhang).
    """
    Tq, Tk = q_pos.shape[1], k_pos.shape[1]
    nq, nk = -(-Tq // block), -(-Tk // block)
    qmin, qmax = (t[:, :, None] for t in _block_range(q_pos, nq, block))
    kmin, kmax = (t[:, None, :] for t in _block_range(k_pos, nk, block))
    some = kmin <= qmax  # causal: some key not after some query
    full = kmax <= qmin
    if window is not None:
        some = some & (qmin - kmax < window)
        full = full & (qmax - kmin < window)
    if q_seg is not None:
        qsmin, qsmax = (t[:, :, None] for t in _block_range(q_seg, nq, block))
        ksmin, ksmax = (t[:, None, :] for t in _block_range(k_seg, nk, block))
        some = some & (ksmin <= qsmax) & (qsmin <= ksmax)
        full = full & (qsmin == qsmax) & (ksmin == ksmax) & (qsmin == ksmin)
    edge = torch.zeros_like(full)
    if Tq % block:
        edge[:, -1, :] = True
    if Tk % block:
        edge[:, :, -1] = True
    full = full & some & ~edge
    return some & ~full, full


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tiles [B, nq, nk] bool -> (count [B, 1, nq] int32, indices [B, 1, nq, nk] int32, listed tiles first)."""
    count = tiles.sum(-1, dtype=torch.int32)
    order = torch.argsort((~tiles).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return count[:, None], order[:, None]


def _pad_cols(x: torch.Tensor, n: int, value: int) -> torch.Tensor:
    """x [B, T] -> [B, n] padded with `value`, so that the mask function never reads past the end."""
    return F.pad(x, (0, n - x.shape[1]), value=value)


def _flex_impl(q, k, v, q_pos, k_pos, q_seg, k_seg, sink, scale: float, window: int | None,
               plain: bool) -> torch.Tensor:
    """q [B, H, Tq, Dqk], k [B, Hkv, Tk, Dqk], v [B, Hkv, Tk, Dv], positions/segments as AttnMeta,
    sink [H] or None -> [B, H, Tq, Dv]. `plain`: positions are the indices (queries = keys), no segments.
    """
    Tq, Tk = q.shape[2], k.shape[2]
    partial, full = block_tables(q_pos, k_pos, q_seg, k_seg, window)
    nq, nk = partial.shape[1:]
    if plain:
        def mask_mod(b, h, qi, ki):
            m = ki <= qi
            return m & (qi - ki < window) if window is not None else m
    else:
        qp, kp = _pad_cols(q_pos, nq * BLOCK, -1), _pad_cols(k_pos, nk * BLOCK, _FAR)
        qs = ks = None
        if q_seg is not None:
            qs, ks = _pad_cols(q_seg, nq * BLOCK, -1), _pad_cols(k_seg, nk * BLOCK, -2)

        def mask_mod(b, h, qi, ki):
            a, c = qp[b, qi], kp[b, ki]
            m = c <= a
            if window is not None:
                m = m & (a - c < window)
            if qs is not None:
                m = m & (qs[b, qi] == ks[b, ki])
            return m

    mask = _fa.BlockMask.from_kv_blocks(*_ordered(partial), *_ordered(full), BLOCK, mask_mod, (Tq, Tk))
    gqa = q.shape[1] != k.shape[1]
    if hasattr(_fa, "AuxRequest"):
        out, aux = _fa.flex_attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa,
                                      return_aux=_fa.AuxRequest(lse=True))
        lse = aux.lse
    else:  # torch < 2.9
        out, lse = _fa.flex_attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa, return_lse=True)
    if sink is not None:
        out = sink_scale.plain(out, lse, sink)
    return out


_flex_compiled = None


def attention_flex(q, k, v, meta: AttnMeta, scale: float, window: int | None = None,
                   sink: torch.Tensor | None = None) -> torch.Tensor:
    """FlexAttention with the block mask of `meta`. Shapes as attention_reference.

    On CUDA the whole function (block mask, kernel, sink) runs compiled; elsewhere eagerly, where
    FlexAttention materialises the scores (forward only; a reference for the tests).
    """
    global _flex_compiled
    plain = meta.plain and meta.aligned and q.shape[2] == k.shape[2] and meta.q_seg is None
    args = (q, k, v, meta.q_pos, meta.k_pos, meta.q_seg, meta.k_seg, sink, scale, window, plain)
    if torch.compiler.is_compiling() or not q.is_cuda or not options().compile:
        return _flex_impl(*args)
    if _flex_compiled is None:
        _flex_compiled = compile_scoped(_flex_impl, fullgraph=True)
    return _flex_compiled(*args)


# ----------------------------------------------------------------------------------------- cuDNN
_cudnn_gqa: bool | None = None  # does cuDNN take enable_gqa here (decided on first use)


def attention_cudnn(q, k, v, meta: AttnMeta, scale: float, window: int | None = None,
                    sink: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention through cuDNN for plain batches (meta.plain, Tq == Tk, no window, no sink).

    Shapes as attention_reference. Grouped KV heads go in as they are where cuDNN
    accepts enable_gqa, else expanded to the query heads first.
    """
    global _cudnn_gqa
    if sink is not None or window is not None or not meta.plain or q.shape[2] != k.shape[2]:
        raise ValueError("attention backend 'cudnn' takes plain causal batches without window or sink")
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        if q.shape[1] != k.shape[1] and _cudnn_gqa is not False:
            try:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
                _cudnn_gqa = True
                return out
            except RuntimeError:
                if _cudnn_gqa:
                    raise
                _cudnn_gqa = False
        rep = q.shape[1] // k.shape[1]
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


# ----------------------------------------------------------------------------------------- Triton
def attention_triton(q, k, v, meta: AttnMeta, scale: float, window: int | None = None,
                     sink: torch.Tensor | None = None) -> torch.Tensor:
    """Banded attention (ops/kernels/swa_attention.py) for aligned batches, with a window (SWA layers) or
    without (full attention). Shapes as attention_reference.

    Plain batches pass no positions (the kernel uses the indices); others pass positions and
    segments, which must rise by at least one per token within a document (true of build_meta's
    batches: packed documents restart their positions, padding tokens are documents of their own).
    """
    if not meta.aligned or q.shape[2] != k.shape[2]:
        raise ValueError("attention backend 'triton' takes queries that are the keys (no cache)")
    tk = kernels("swa_attention")
    if tk is None or not tk.supported(q, k, v):
        return attention_flex(q, k, v, meta, scale, window, sink)
    B, T = q.shape[0], q.shape[2]
    plain = meta.plain and meta.q_seg is None
    pos = None if plain else meta.q_pos.expand(B, T).to(torch.int32).contiguous()
    seg = None if meta.q_seg is None else meta.q_seg.expand(B, T).to(torch.int32).contiguous()
    return tk.banded_swa(q, k, v, pos, seg, scale, window, sink)


def _triton_applies(q, meta: AttnMeta, window, sink) -> bool:
    if not (q.is_cuda and meta.aligned and (meta.plain or meta.q_seg is not None)):
        return False
    tk = kernels("swa_attention")
    return (tk is not None and meta.q_pos.shape[1] == meta.k_pos.shape[1] == q.shape[2]
            and tk.split_dim(q.shape[-1]) is not None and q.dtype in (torch.bfloat16, torch.float16))


def _cudnn_applies(q, meta: AttnMeta, window, sink) -> bool:
    return (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and sink is None and window is None
            and meta.plain and meta.aligned and meta.q_pos.shape[1] == meta.k_pos.shape[1]
            and q.shape[-1] <= 256 and torch.backends.cudnn.is_available())


def _flex_applies(q, meta: AttnMeta, window, sink) -> bool:
    # half precision only: compiled flex in fp32 at head dim 192 needs more shared memory than an H200 SM has
    # (278784 > 232448 bytes); "auto" sends fp32 (and fp64) to the blocked / SDPA / reference paths
    return q.is_cuda and q.shape[2] >= MIN_FLEX_QUERIES and q.dtype in (torch.bfloat16, torch.float16)


def rope_attention_triton(qkv, cos, sin, dims, meta: AttnMeta, scale: float, window: int | None = None,
                          sink: torch.Tensor | None = None) -> torch.Tensor | None:
    """RoPE's kernel then the banded SWA kernels, the gradient through RoPE and the value scale taken in theirs
    (ops/kernels/swa_attention.py banded_swa_qkv), where the "triton" backend applies and the rotary dims fit the kernels'
    split of the head dim (rope_fits); else None."""
    heads, kv_heads, qk_dim, v_dim, v_scale = dims
    B, T = qkv.shape[:2]
    if not (qkv.is_cuda and qkv.dtype in (torch.bfloat16, torch.float16) and meta.aligned
            and (meta.plain or meta.q_seg is not None) and meta.q_pos.shape[1] == meta.k_pos.shape[1] == T):
        return None
    tk = kernels("swa_attention")
    if (tk is None or not tk.rope_fits(qk_dim, cos.shape[-1]) or v_dim < 16 or v_dim & (v_dim - 1)
            or v_dim > 256 or cos.shape[1] != T):
        return None
    plain = meta.plain and meta.q_seg is None
    pos = None if plain else meta.q_pos.expand(B, T).to(torch.int32).contiguous()
    seg = None if meta.q_seg is None else meta.q_seg.expand(B, T).to(torch.int32).contiguous()
    return tk.banded_swa_qkv(qkv, cos, sin, heads, kv_heads, qk_dim, v_dim, v_scale, pos, seg, scale, window, sink)


# ----------------------------------------------------------------------------------------- dispatch
# CUDA backends, in the order "auto" tries them: name -> (applies(q, meta, window, sink) -> bool, fn).
_FAST: dict[str, tuple[Callable[..., bool], Callable[..., torch.Tensor]]] = {
    "cudnn": (_cudnn_applies, attention_cudnn),
    "triton": (_triton_applies, attention_triton),
    "flex": (_flex_applies, attention_flex),
}
BACKENDS = ("auto", "reference", "blocked", "sdpa")
# Backends that also apply RoPE and the value scale, from the q/k/v projection's output (CUDA):
# name -> fn(qkv, cos, sin, dims, meta, scale, window, sink) -> output, or None where they do not apply.
_FAST_QKV: dict[str, Callable[..., torch.Tensor | None]] = {"triton": rope_attention_triton}


def attention_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dims: tuple[int, int, int, int, float],
                  meta: AttnMeta, scale: float, window: int | None = None, sink: torch.Tensor | None = None,
                  backend: str = "auto") -> torch.Tensor | None:
    """Attention straight from the projection's output, where a registered kernel of `backend` ("auto": any)
    takes it: qkv [B, T, heads * qk_dim + kv_heads * (qk_dim + v_dim)], cos / sin [B or 1, T, R],
    dims = (heads, kv_heads, qk_dim, v_dim, v_scale) -> [B, heads, T, v_dim], or None (then rotate with
    ops.rope.rope_qkv and call `attention`; the result is the same up to rounding). "auto" declines the layers
    that the "cudnn" backend takes (plain causal full attention): cuDNN's kernel ran the released full layer's
    8192-token forward in about half the banded kernel's time (docs/BENCHMARKS.md, issue 19)."""
    if backend == "auto" and _cudnn_applies(qkv[..., :dims[2]], meta, window, sink):
        return None
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
