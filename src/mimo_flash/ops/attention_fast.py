"""Fast attention on CUDA, registered with ops.attention so that backend "auto" picks it there.

    "cudnn" - full-attention layers of plain causal batches (positions 0..T-1 in every row, no
              segments, no sink, queries = keys): torch SDPA restricted to cuDNN with is_causal.
              cuDNN takes Q/K 192 with V 128, which the flash backend refuses.
    "triton" - SWA layers (sink included) whose queries are the keys (no cache), plain or with
              segments (packed documents, padding): the banded Triton kernel of ops/triton_kernels.py,
              forward and backward, which visits only the key tiles within the window. Without a cache
              the model hands it the q/k/v projection's output (ops.attention.attention_qkv): its
              backward kernels write the projection's gradient, unrotated and scaled, so RoPE's
              backward costs no pass of its own.
    "flex"  - everything else with at least MIN_FLEX_QUERIES queries: full-attention layers of packed
              documents or padded batches, queries against longer keys (a cache), SWA batches with
              positions but no segments.
              FlexAttention runs only the 128 x 128 tiles that the block mask lists; the block
              mask comes from AttnMeta (causal, window, segments), GQA is native, and the sink is
              folded in through the returned log-sum-exp, out * sigmoid(lse - sink), which is exact
              in value and in gradient (the backward takes the gradient of lse).

CPU behaviour is unchanged: neither backend applies to CPU tensors under "auto". `attention_flex`
also runs on CPU (eager FlexAttention, forward only), which the CPU tests use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention import flex_attention as _fa

from .attention import AttnMeta, register_backend, register_qkv_backend
from .fused import COMPILE, sink_scale, triton_kernels

BLOCK = 128  # FlexAttention's tile of the block mask (queries x keys)
MIN_FLEX_QUERIES = 128  # fewer queries (decode steps) go to the generic paths (flex's decoding kernel
# refuses these head dims)
_FAR = 1 << 40  # a position no query reaches


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
    """FlexAttention with the block mask of `meta`. Shapes as ops.attention.attention_reference.

    On CUDA the whole function (block mask, kernel, sink) runs compiled; elsewhere eagerly, where
    FlexAttention materialises the scores (forward only; a reference for the tests).
    """
    global _flex_compiled
    plain = meta.plain and meta.aligned and q.shape[2] == k.shape[2] and meta.q_seg is None
    args = (q, k, v, meta.q_pos, meta.k_pos, meta.q_seg, meta.k_seg, sink, scale, window, plain)
    if not (q.is_cuda and COMPILE) or torch.compiler.is_compiling():
        return _flex_impl(*args)
    if _flex_compiled is None:
        _flex_compiled = torch.compile(_flex_impl, fullgraph=True)
    return _flex_compiled(*args)


# ----------------------------------------------------------------------------------------- cuDNN
_cudnn_gqa: bool | None = None  # does cuDNN take enable_gqa here (decided on first use)


def attention_cudnn(q, k, v, meta: AttnMeta, scale: float, window: int | None = None,
                    sink: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention through cuDNN for plain batches (meta.plain, Tq == Tk, no window, no sink).

    Shapes as ops.attention.attention_reference. Grouped KV heads go in as they are where cuDNN
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
    """Banded SWA (ops/triton_kernels.py) for aligned batches. Shapes as attention_reference.

    Plain batches pass no positions (the kernel uses the indices); others pass positions and
    segments, which must rise by at least one per token within a document (true of build_meta's
    batches: packed documents restart their positions, padding tokens are documents of their own).
    """
    if window is None or not meta.aligned or q.shape[2] != k.shape[2]:
        raise ValueError("attention backend 'triton' takes sliding-window layers with queries = keys")
    tk = triton_kernels()
    if tk is None or not tk.supported(q, k, v):
        return attention_flex(q, k, v, meta, scale, window, sink)
    B, T = q.shape[0], q.shape[2]
    plain = meta.plain and meta.q_seg is None
    pos = None if plain else meta.q_pos.expand(B, T).to(torch.int32).contiguous()
    seg = None if meta.q_seg is None else meta.q_seg.expand(B, T).to(torch.int32).contiguous()
    return tk.banded_swa(q, k, v, pos, seg, scale, window, sink)


def _triton_applies(q, meta: AttnMeta, window, sink) -> bool:
    if not (q.is_cuda and window is not None and meta.aligned and (meta.plain or meta.q_seg is not None)):
        return False
    tk = triton_kernels()
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
    (ops.triton_kernels.banded_swa_qkv), where the "triton" backend applies and the rotary dims fit the kernels'
    split of the head dim (rope_fits); else None."""
    heads, kv_heads, qk_dim, v_dim, v_scale = dims
    B, T = qkv.shape[:2]
    if not (qkv.is_cuda and qkv.dtype in (torch.bfloat16, torch.float16) and window is not None and meta.aligned
            and (meta.plain or meta.q_seg is not None) and meta.q_pos.shape[1] == meta.k_pos.shape[1] == T):
        return None
    tk = triton_kernels()
    if (tk is None or not tk.rope_fits(qk_dim, cos.shape[-1]) or v_dim < 16 or v_dim & (v_dim - 1)
            or v_dim > 256 or cos.shape[1] != T):
        return None
    plain = meta.plain and meta.q_seg is None
    pos = None if plain else meta.q_pos.expand(B, T).to(torch.int32).contiguous()
    seg = None if meta.q_seg is None else meta.q_seg.expand(B, T).to(torch.int32).contiguous()
    return tk.banded_swa_qkv(qkv, cos, sin, heads, kv_heads, qk_dim, v_dim, v_scale, pos, seg, scale, window, sink)


register_backend("cudnn", _cudnn_applies, attention_cudnn)
register_backend("triton", _triton_applies, attention_triton)
register_backend("flex", _flex_applies, attention_flex)
register_qkv_backend("triton", rope_attention_triton)
