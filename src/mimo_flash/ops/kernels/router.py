"""The sigmoid router in Triton kernels (ops/moe.py router on CUDA, bf16 tokens, one expert group)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import last_dim_contiguous, launcher


# The sigmoid router. fp32 logits from bf16 tokens without an fp32 copy of them: the fp32 weight is split into
# three bf16 parts (hi + mid + lo == weight, exactly), so every product x * part is exact in fp32 and the three
# bf16 tensor-core products sum to the fp32 product (up to the order of the fp32 additions): the weight is
# split once per call and the three products are one cuBLAS product with fp32 output. (One kernel that split
# the weight as each program read it took 309 against 187 us for 8192 tokens on the H100, 176 against 100 us
# for 64.) Then sigmoid, top-k of score + bias by k argmax passes (ties to the lower expert), the chosen scores
# normalised and scaled, and (training) the per-expert token counts. The backward: one kernel, two products.
@triton.jit
def _split3(w, DT: tl.constexpr = tl.bfloat16):
    """fp32 -> three DT (bf16) tensors whose fp32 sum is w (DT fp32: w, 0, 0)."""
    hi = w.to(DT)
    r = w - hi.to(tl.float32)
    mid = r.to(DT)
    return hi, mid, (r - mid.to(tl.float32)).to(DT)


@launcher
@triton.jit
def _split_kernel(W, W3, n, BLOCK: tl.constexpr):
    """The fp32 weight [E, D] -> its three bf16 parts [3, E, D] (hi, mid, lo)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    hi, mid, lo = _split3(tl.load(W + offs, mask=mask, other=0.0), W3.dtype.element_ty)
    tl.store(W3 + offs, hi, mask=mask)
    tl.store(W3 + n + offs, mid, mask=mask)
    tl.store(W3 + 2 * n + offs, lo, mask=mask)


@triton.jit  # (launched through Triton's own path by choose_topk, which compiled decode steps trace)
def _router_choose_kernel(L, BIAS, IDX, WT, SEL, COUNTS, PRESENT, N, scaling, E: tl.constexpr, K: tl.constexpr,
                          KP: tl.constexpr, NORM: tl.constexpr, COUNT: tl.constexpr, BLOCK_N: tl.constexpr,
                          PARTS: tl.constexpr = 3, HAS_PRESENT: tl.constexpr = False):
    """The PARTS fp32 products L [N, PARTS * E] (the three parts', or the logits themselves) summed into the
    logits, then each row's top-k ids (best first, ties to the lower expert), weights and sigmoid scores (and
    the counts). HAS_PRESENT: PRESENT [N] bool, the rows whose weights are kept (the others' are 0)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    cols = tl.arange(0, E)
    p = L + rows.to(tl.int64)[:, None] * (PARTS * E) + cols[None, :]
    acc = tl.load(p, mask=rmask[:, None], other=0.0)
    for j in tl.static_range(1, PARTS):
        acc += tl.load(p + j * E, mask=rmask[:, None], other=0.0)
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
    wt = wt * scaling
    if HAS_PRESENT:
        wt = tl.where(tl.load(PRESENT + rows, mask=rmask, other=0).to(tl.int1)[:, None], wt, 0.0)
    tl.store(WT + out, wt, mask=omask)
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


_choose = launcher(_router_choose_kernel)  # (the autograd router's launches: less host time a call)


def router_supported(x: torch.Tensor, num_experts: int, top_k: int) -> bool:
    """bf16 tokens, a power-of-two expert count of 16..256, top_k <= 16."""
    return x.dtype == torch.bfloat16 and choose_supported(num_experts, top_k)


def choose_supported(num_experts: int, top_k: int) -> bool:
    """The choice kernel's shapes: a power-of-two expert count of 16..256, top_k <= 16."""
    return 16 <= num_experts <= 256 and num_experts & (num_experts - 1) == 0 and 1 <= top_k <= min(16, num_experts)


ROUTER_PROGRAMS = 264  # (2 per SM of an H100): the grid that _router_meta cuts the rows per program for


def _router_meta(N: int, E: int, K: int, norm: bool) -> tuple[int, dict]:
    """(grid, meta): up to 64 rows a program (32 for more than 128 experts), fewer while the grid would have
    fewer than ROUTER_PROGRAMS programs: a program's K argmax passes run one after the other, so a decode step's
    64 rows in one program took 17.6 us (H100) where the ranks took 1.6."""
    block_n = min(64 if E <= 128 else 32, triton.next_power_of_2(triton.cdiv(max(N, 1), ROUTER_PROGRAMS)))
    warps = max(1, min(4 if E <= 64 else 8, block_n * E // 256))
    return triton.cdiv(N, block_n), dict(E=E, K=K, KP=max(2, triton.next_power_of_2(K)), NORM=norm,
                                         BLOCK_N=block_n, num_warps=warps)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bf16 a @ b with the fp32 sums (cuBLAS's out_dtype; elsewhere the same numbers through fp32 inputs)."""
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return a.float() @ b.float()


class _Router(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, top_k: int, norm: bool, scaling: float, count: bool):
        x = last_dim_contiguous(x)
        N, D = x.shape
        E = weight.shape[0]
        grid, meta = _router_meta(N, E, top_k, norm)
        idx = torch.empty(N, top_k, device=x.device, dtype=torch.long)
        w = torch.empty(N, top_k, device=x.device, dtype=torch.float32)
        sel = torch.empty_like(w)
        counts = torch.zeros(E if count else 1, device=x.device, dtype=torch.int64)
        if N:  # the three parts' products in one cuBLAS product, then one kernel sums them and chooses
            w3 = torch.empty(3, E, D, device=x.device, dtype=x.dtype)
            _split_kernel[(triton.cdiv(E * D, 1024),)](weight.float().contiguous(), w3, E * D, BLOCK=1024)
            logits3 = _mm_fp32(x, w3.view(3 * E, D).t())  # [N, 3E]
            _choose[(grid,)](logits3, bias.float().contiguous(), idx, w, sel, counts, counts, N, float(scaling),
                             COUNT=count, **meta)
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


def choose_topk(logits: torch.Tensor, bias: torch.Tensor, top_k: int, norm: bool, scaling: float,
                present: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits [N, E] (see choose_supported) -> (indices [N, k] long, best first, ties to the lower expert;
    weights [N, k] fp32): ops.moe.route_decode's choice in one kernel (sigmoid, the top k of score + bias,
    the chosen scores normalised and scaled; 0 for the rows that present [N] bool, if given, says are not there).
    Launched through Triton's own path, which torch.compile traces: compiled decode steps call it."""
    N, E = logits.shape
    grid, meta = _router_meta(N, E, top_k, norm)
    idx = torch.empty(N, top_k, device=logits.device, dtype=torch.long)
    w = torch.empty(N, top_k, device=logits.device, dtype=torch.float32)
    sel = torch.empty_like(w)
    counts = torch.zeros(1, device=logits.device, dtype=torch.int64)
    if N:
        _router_choose_kernel[(grid,)](logits.float().contiguous(), bias.float().contiguous(), idx, w, sel, counts,
                                       counts if present is None else present.contiguous(), N, float(scaling),
                                       COUNT=False, PARTS=1, HAS_PRESENT=present is not None, **meta)
    return idx, w


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int, norm: bool, scaling: float,
          count: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ops.moe.route with one expert group, bf16 x [N, D], weight [E, D] fp32 (see router_supported) ->
    (indices [N, k] long, weights [N, k] fp32, tokens per expert [E] long (zeros [1] unless count))."""
    return _Router.apply(x, weight, bias, top_k, norm, scaling, count)
