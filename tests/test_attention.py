"""The attention backends against the reference, and the reference against SPEC.md's formulas."""

from __future__ import annotations

import math

import pytest
import torch

from mimo_flash.ops.attention import AttnMeta, attention


def inputs(B, H, Hkv, T, D=24, Dv=16, seed=0, Tk=None):
    g = torch.Generator().manual_seed(seed)
    Tk = Tk or T
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, Tk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, Tk, Dv, generator=g, dtype=torch.float64)
    sink = torch.randn(H, generator=g, dtype=torch.float64)
    return q, k, v, sink


def plain_meta(B, T):
    pos = torch.arange(T).expand(B, T)
    return AttnMeta(pos, pos, plain=True)


def loop_attention(q, k, v, scale, window, sink):
    """SPEC.md written out one query at a time: p_ij = exp(a_ij) / (exp(sink) + sum exp(a_ij'))."""
    B, H, T, _ = q.shape
    rep = H // k.shape[1]
    out = torch.zeros(B, H, T, v.shape[-1], dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                lo = 0 if window is None else max(0, i - window + 1)
                a = (k[b, h // rep, lo:i + 1] @ q[b, h, i]) * scale
                den = a.exp().sum() + (sink[h].exp() if sink is not None else 0)
                out[b, h, i] = (a.exp() / den) @ v[b, h // rep, lo:i + 1]
    return out


@pytest.mark.parametrize("window, with_sink", [(None, False), (5, True), (5, False), (None, True)])
def test_reference_is_the_formula(window, with_sink):
    q, k, v, sink = inputs(2, 4, 2, 13)
    sink = sink if with_sink else None
    got = attention(q, k, v, plain_meta(2, 13), 0.2, window, sink, backend="reference")
    torch.testing.assert_close(got, loop_attention(q, k, v, 0.2, window, sink), rtol=1e-6, atol=1e-6)


def test_sink_equals_sigmoid_of_lse_minus_sink():
    """out_with_sink = out_without_sink * sigmoid(lse - sink): what lets LSE-returning kernels carry it."""
    q, k, v, sink = inputs(1, 4, 4, 11)
    meta = plain_meta(1, 11)
    with_sink = attention(q, k, v, meta, 0.3, 4, sink, backend="reference")
    without = attention(q, k, v, meta, 0.3, 4, None, backend="reference")
    scores = (q @ k.transpose(-1, -2)) * 0.3
    i, j = torch.arange(11)[:, None], torch.arange(11)[None]
    scores = scores.masked_fill(~((j <= i) & (i - j < 4)), -math.inf)
    lse = scores.logsumexp(-1, keepdim=True)
    torch.testing.assert_close(with_sink, without * torch.sigmoid(lse - sink.view(1, -1, 1, 1)))


@pytest.mark.parametrize("T", [1, 4, 7, 8, 21, 40])
@pytest.mark.parametrize("window", [1, 7])
def test_blocked_equals_reference(T, window):
    q, k, v, sink = inputs(2, 4, 2, T, seed=T)
    meta = plain_meta(2, T)
    ref = attention(q, k, v, meta, 0.25, window, sink, backend="reference")
    torch.testing.assert_close(attention(q, k, v, meta, 0.25, window, sink, backend="blocked"), ref)
    torch.testing.assert_close(attention(q, k, v, meta, 0.25, window, sink, backend="auto"), ref)


def packed_meta(lengths, pad=0):
    """One row holding documents of `lengths` after `pad` padding tokens (segment -2 - index)."""
    pos = torch.cat([torch.zeros(pad, dtype=torch.long)] + [torch.arange(n) for n in lengths])[None]
    seg = torch.cat([-(torch.arange(pad) + 2)] + [torch.full((n,), d) for d, n in enumerate(lengths)])[None]
    return AttnMeta(pos, pos, seg, seg, aligned=True, plain=False)


@pytest.mark.parametrize("window, with_sink", [(6, True), (None, False)])
def test_packed_documents_never_see_each_other(window, with_sink):
    lengths, pad = [5, 13, 1, 9], 3
    T = pad + sum(lengths)
    q, k, v, sink = inputs(1, 4, 2, T, seed=3)
    sink = sink if with_sink else None
    meta = packed_meta(lengths, pad)
    for backend in ("reference", "blocked", "sdpa", "auto"):
        if backend == "sdpa" and sink is not None:
            continue
        got = attention(q, k, v, meta, 0.25, window, sink, backend=backend)
        start = pad
        for n in lengths:
            s = slice(start, start + n)
            alone = attention(q[:, :, s], k[:, :, s], v[:, :, s], plain_meta(1, n), 0.25, window, sink,
                              backend="reference")
            torch.testing.assert_close(got[:, :, s], alone, msg=backend)
            start += n
        assert torch.isfinite(got).all()


def test_sdpa_matches_reference_for_full_layers():
    q, k, v, _ = inputs(2, 4, 1, 17)
    meta = plain_meta(2, 17)
    ref = attention(q, k, v, meta, 0.2, None, None, backend="reference")
    torch.testing.assert_close(attention(q, k, v, meta, 0.2, None, None, backend="sdpa"), ref)


def test_queries_against_longer_keys_use_positions():
    """Keys from a cache (Tk > Tq) with their own positions: the last 3 queries of a 10-token run."""
    q, k, v, sink = inputs(1, 2, 1, 10, seed=5)
    full = attention(q, k, v, plain_meta(1, 10), 0.3, 4, sink, backend="reference")
    pos = torch.arange(10)[None]
    meta = AttnMeta(pos[:, 7:], pos, aligned=False)
    for backend in ("reference", "auto"):
        part = attention(q[:, :, 7:], k, v, meta, 0.3, 4, sink, backend=backend)
        torch.testing.assert_close(part, full[:, :, 7:])


def test_bad_backend_names_itself():
    q, k, v, sink = inputs(1, 2, 1, 3)
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        attention(q, k, v, plain_meta(1, 3), 0.3, None, None, backend="nope")
    with pytest.raises(ValueError, match="cannot apply a sink"):
        attention(q, k, v, plain_meta(1, 3), 0.3, 2, sink, backend="sdpa")
