"""Mixture-of-experts ops: the sigmoid router with bias-corrected selection, and the expert compute.

Expert weights are fused: gate_up [E, 2I, D] (gate rows first, then up), down [E, D, I].

Expert backends:
    "reference" - a loop over experts, each taking the tokens routed to it (the spec in code).
    "grouped_mm" - tokens permuted into expert order once, one torch._grouped_mm per projection,
                  routing weight fused into the SwiGLU, outputs summed back by a gather (bf16 only;
                  runs wherever torch._grouped_mm does, CPU included in recent torch).
    "grouped"   - grouped_mm on CUDA when the tensors allow it (grouped_mm_supported), else the same
                  permutation and a loop over the sorted segments.
    "decode"    - no sort and no host sync (CUDA-graph safe): each chosen expert's weights read directly for a
                  few tokens, every expert on every token for many (experts_decode).
    "auto"      - the backend options().experts names ("auto" there: grouped).

Router backends (options().router): "decode" computes route()'s selection as fusible reductions (route_decode,
for traced decode steps, one expert group); otherwise the Triton kernel on CUDA where it applies, else route().
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .compiled import acc, cuda_compiled, triton_for
from .swiglu import swiglu_weighted
from ..options import options


class _RouterLogits(torch.autograd.Function):
    """logits = x @ weight^T in fp32 (x cast up: the numbers of F.linear(x.float(), weight.float())).

    Backward: weight's gradient in fp32; x's gradient in x's own precision (a bf16 activation gets a bf16
    product, as the input gradient of every other projection is; fp32 stays fp32), which spares an fp32
    [N, D] product and its cast per MoE layer.
    """

    @staticmethod
    def forward(ctx, x, weight):
        x32 = x.float()
        ctx.save_for_backward(x32, weight)
        ctx.x_dtype = x.dtype
        return F.linear(x32, weight.float())

    @staticmethod
    def backward(ctx, g):
        x32, weight = ctx.saved_tensors
        gx = g.to(ctx.x_dtype) @ weight.to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        gw = (g.t() @ x32).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return gx, gw


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
          norm_topk_prob: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid router. x [N, D], weight [E, D], bias [E] (selection only).

    Returns (indices [N, k] long, weights [N, k] fp32, scores [N, E] fp32).
    """
    with torch.autocast(x.device.type, enabled=False):  # fp32 even inside a bf16 autocast region
        logits = _RouterLogits.apply(x, weight)
    scores = logits.sigmoid()
    choice = scores + bias.float()
    N, E = choice.shape
    if n_group > 1:
        grouped = choice.view(N, n_group, E // n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [N, G]
        keep = group_scores.topk(topk_group, dim=-1, sorted=False).indices
        gmask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        choice = choice.masked_fill(~gmask.repeat_interleave(E // n_group, dim=1), float("-inf"))
    idx = choice.topk(top_k, dim=-1, sorted=False).indices
    w = scores.gather(1, idx)
    if norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return idx, w * scaling, scores


def router(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
           norm_topk_prob: bool, scaling: float, count: bool = False, present: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """route()'s (indices, weights), plus the tokens per expert [E] when count (else None). present [N] bool or
    None (all): the weights of the tokens that are not there are 0 (their choices are made and counted as any
    token's); the routed decode kernels then read no expert for them.

    On CUDA with bf16 x and one expert group: ops/kernels/router.py (the logits one cuBLAS product of the weight's
    three bf16 parts, then one kernel for the choice; one kernel and two products back), the logits still the
    fp32 product; the chosen set equals route()'s up to exact ties of score + bias.
    """
    E = weight.shape[0]
    if options().router == "decode" and n_group == 1:
        return route_decode(x, weight, bias, top_k, norm_topk_prob, scaling, count, present)
    tk = triton_for(x, "router")
    if tk is not None and n_group == 1 and tk.router_supported(x, E, top_k):
        idx, w, counts = tk.route(x, weight, bias, top_k, norm_topk_prob, scaling, count)
        counts = counts if count else None
    else:
        idx, w, _ = route(x, weight, bias, top_k, n_group, topk_group, norm_topk_prob, scaling)
        counts = expert_counts(idx.detach(), E) if count else None
    return idx, w if present is None else w * present[:, None], counts


# route_decode's logits: a reduction fused into the norm before it up to this many multiply-adds (rows x experts x
# width), else one fp32 cuBLAS product. bench/router.py --decode, H100 (docs/BENCHMARKS.md): at the mini preset's
# 1024 x 64, 64 rows fused 9.4 us against 12.3, 128 rows 13.8 against 13.5; at the released 4096 x 256, 64 rows
# 47.4 against 19.0
ROUTER_FUSED_MACS = 1 << 23


def route_decode(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int, norm_topk_prob: bool,
                 scaling: float, count: bool = False, present: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The router for traced decode steps (one expert group): route()'s selection and weights in a few kernels
    instead of a GEMV call plus a top-k kernel.

    x [N, D], weight [E, D], bias [E], present [N] bool or None -> (indices [N, k], weights [N, k] fp32, tokens
    per expert [E] when count else None), as router() (the choice kernel writes the absent tokens' zero weights). The logits are route()'s fp32 product: up to ROUTER_FUSED_MACS multiply-adds a
    reduction that the compiled step fuses into the norm before it, above one product (the product is what makes
    inductor suggest TF32, which would change the logits and so the chosen experts). On CUDA the choice is one Triton kernel
    (kernels/router.py choose_topk: at 128 rows the ranks below took 6.1 us against 1.6 at 64); elsewhere the
    top-k comes from ranks: expert e is picked when fewer than k experts beat it (higher score, or equal score
    and lower index), best first, as the kernel picks.
    """
    N, E = x.shape[0], weight.shape[0]
    if N * E * x.shape[1] > ROUTER_FUSED_MACS:
        logits = F.linear(x.float(), weight.float())
    else:
        logits = (x.float()[:, None, :] * weight.float()).sum(-1)  # [N, E]
    if x.is_cuda:
        from .kernels.router import choose_supported, choose_topk
        if choose_supported(E, top_k):
            idx, w = choose_topk(logits, bias, top_k, norm_topk_prob, scaling, present)
            return idx, w, expert_counts(idx, E) if count else None
    scores = logits.sigmoid()
    choice = scores + bias.float()
    ar = torch.arange(E, device=x.device)
    beats = (choice[:, None, :] > choice[:, :, None]) | (
        (choice[:, None, :] == choice[:, :, None]) & (ar[None, None, :] < ar[None, :, None]))  # [N, e, e']
    rank = beats.sum(-1)  # [N, E]: experts ahead of e
    onehot = rank[:, :, None] == torch.arange(top_k, device=x.device)  # [N, E, k]
    idx = (onehot * ar[None, :, None]).sum(1)  # [N, k], best first
    w = scores.gather(1, idx)
    if norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    w = w * scaling if present is None else w * scaling * present[:, None]
    return idx, w, expert_counts(idx, E) if count else None


def _expert_ffn(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert's SwiGLU. x [n, D], gate_up [2I, D], down [D, I] -> [n, D]."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


def experts_reference(x, idx, w, gate_up, down):
    """x [N, D], idx [N, k], w [N, k] fp32, gate_up [E, 2I, D], down [E, D, I] -> [N, D]."""
    out = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        tok, slot = torch.where(idx == e)
        if tok.numel() == 0:
            continue
        y = _expert_ffn(x[tok], gate_up[e], down[e]) * w[tok, slot, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


def expert_counts(idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """idx [N, k] -> tokens routed to each expert [E] (long). Unlike torch.bincount on CUDA, this
    never waits for the GPU (bincount reads the largest index back to size its output)."""
    flat = idx.reshape(-1)
    return flat.new_zeros(num_experts).scatter_add_(0, flat, torch.ones_like(flat))


def sort_by_expert(idx: torch.Tensor, num_experts: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """idx [N, k] -> (order [N*k]: the flattened (token, slot) pairs sorted by expert, stably; inv [N*k]: the
    place of each pair in that order; counts [E]; tok [N*k]: the token of each sorted pair, order // k;
    offsets [E] int32: the running sum of counts). On CUDA a counting sort in three Triton kernels."""
    tk = triton_for(idx, "moe")
    if tk is not None:
        return tk.sort_by_expert(idx, num_experts)
    order = torch.argsort(idx.reshape(-1), stable=True)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    counts = expert_counts(idx, num_experts)
    return order, inv, counts, order // idx.shape[1], counts.cumsum(0).to(torch.int32)


def gather_sum(y: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
    """y [P, D], index [N * k] -> out [N, D], out[n] = sum_s y[index[n * k + s]], summed in fp32
    (a Triton kernel on CUDA: each output row reads its k rows once)."""
    tk = triton_for(y, "moe")
    if tk is not None:
        return tk.gather_sum(y, index, k)
    return _gather_sum(y, index, k)


@cuda_compiled
def _gather_sum(y: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
    return acc(y[index].view(-1, k, y.shape[-1])).sum(1).to(y.dtype)


class _Dispatch(torch.autograd.Function):
    """Copy each token to its k (token, slot) pairs, the pairs in expert order.

    forward: x [N, D], tok [P] (token of each sorted pair), inv [P] (sorted place of pair n*k+s), k
             -> xs [P, D] = x[tok] (gather_sum with one row per output: the same row copy kernel)
    backward: g_x[n] = sum_s g_xs[inv[n*k + s]], a gather and a sum (no atomics); this is _Combine's forward.
    """

    @staticmethod
    def forward(ctx, x, tok, inv, k):
        ctx.save_for_backward(tok, inv)
        ctx.k = k
        return gather_sum(x.contiguous(), tok, 1)

    @staticmethod
    def backward(ctx, g):
        tok, inv = ctx.saved_tensors
        return gather_sum(g.contiguous(), inv, ctx.k), None, None, None


class _Combine(torch.autograd.Function):
    """Sum each token's k expert outputs (already weighted) back in token order.

    forward: ys [P, D] in expert order, tok [P], inv [P], k -> out [N, D], out[n] = sum_s ys[inv[n*k + s]]
    backward: g_ys = g_out[tok]; this is _Dispatch's forward.
    """

    @staticmethod
    def forward(ctx, ys, tok, inv, k):
        ctx.save_for_backward(tok)
        return gather_sum(ys, inv, k)

    @staticmethod
    def backward(ctx, g):
        (tok,) = ctx.saved_tensors
        return gather_sum(g.contiguous(), tok, 1), None, None, None


def dispatch(x: torch.Tensor, tok: torch.Tensor, inv: torch.Tensor, k: int) -> torch.Tensor:
    """x [N, D] -> [N*k, D]: each token copied to its (token, slot) pairs in expert order (tok, inv from
    sort_by_expert); differentiable (the backward is combine's gather)."""
    return _Dispatch.apply(x, tok, inv, k)


def combine(ys: torch.Tensor, tok: torch.Tensor, inv: torch.Tensor, k: int) -> torch.Tensor:
    """ys [N*k, D] in expert order -> [N, D]: each token's k rows summed (in fp32); differentiable."""
    return _Combine.apply(ys, tok, inv, k)


def grouped_mm_supported(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """Can torch._grouped_mm take these: bf16 everywhere, last dims contiguous, every row stride
    (D, 2I, I) a multiple of 16 bytes, weights 16-byte aligned."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if any(t.dtype != torch.bfloat16 for t in (x, gate_up, down)):
        return False
    D, I = down.shape[1], down.shape[2]
    if D % 8 or I % 8 or gate_up.stride(-1) != 1 or down.stride(-1) != 1:
        return False
    if torch.compiler.is_compiling():  # (a traced tensor has no address to check; parameters are aligned)
        return True
    return all(t.data_ptr() % 16 == 0 for t in (gate_up, down))


def experts_grouped_mm(x, idx, w, gate_up, down):
    """Same contract as experts_reference, through torch._grouped_mm (bf16; see grouped_mm_supported).

    Tokens are permuted into expert order once (P = N*k rows), both projections are one grouped GEMM
    each over the per-expert row ranges (offsets = cumulative counts, empty experts allowed), the
    routing weight is fused into the SwiGLU, and the k outputs of each token are summed in fp32 by a
    gather (the backward is a gather too).
    """
    k = idx.shape[1]
    order, inv, _, tok, offs = sort_by_expert(idx, gate_up.shape[0])
    xs = _Dispatch.apply(x, tok, inv, k)  # [P, D]
    h = torch._grouped_mm(xs, gate_up.transpose(-2, -1), offs=offs)  # [P, 2I]
    a = swiglu_weighted(h, w.reshape(-1).float(), order)  # [P, I], row r weighted by w[order[r]]
    ys = torch._grouped_mm(a, down.transpose(-2, -1), offs=offs)  # [P, D]
    return _Combine.apply(ys, tok, inv, k)


def experts_grouped(x, idx, w, gate_up, down):
    """Same contract as experts_reference: grouped GEMMs on CUDA where torch._grouped_mm takes the
    tensors, else one permutation and a loop over the sorted segments."""
    if x.is_cuda and grouped_mm_supported(x, gate_up, down):
        return experts_grouped_mm(x, idx, w, gate_up, down)
    order, _, counts, tok, _ = sort_by_expert(idx, gate_up.shape[0])
    xs = x[tok]  # [N*k, D] grouped by expert
    ys = torch.empty_like(xs)
    start = 0
    for e, c in enumerate(counts.tolist()):
        if c:
            ys[start:start + c] = _expert_ffn(xs[start:start + c], gate_up[e], down[e])
        start += c
    ys = ys * w.reshape(-1)[order, None]
    out = torch.zeros_like(x)
    out.index_add_(0, tok, ys.to(out.dtype))
    return out


DECODE_EXPERTS = ("dense", "fused", "routed", "grouped_mm", "triton")  # options().decode_experts


def experts_decode(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, gate_up: torch.Tensor,
                   down: torch.Tensor) -> torch.Tensor:
    """Expert compute for a few tokens without sorting on the host or host syncs (CUDA-graph safe).

    x [N, D], idx [N, k], w [N, k] fp32, gate_up [E, 2I, D], down [E, D, I] -> [N, D].
    When N * k <= E / 2 each (token, slot) pair reads its expert's weights directly (batch-1 decode reads
    only the chosen experts); otherwise options().decode_experts: "dense" runs every expert on every token and
    the routing weights (zero for experts not chosen) combine them (large batches touch every expert anyway);
    "fused" is the same arithmetic in two Triton kernels (ops/kernels/decode_experts.py's dense_experts: CUDA, or
    Triton's interpreter; elsewhere "dense") that write no [E, N, 2I] or [E, N, D] tensor and skip experts no token
    chose; "routed" runs each expert on the tokens that chose it only, in three Triton kernels (routed_experts, the
    same file: the same bytes, k/E of the arithmetic; where "fused" would not run, "dense");
    "grouped_mm" and "triton" sort the pairs by expert on the device and run one grouped product per projection
    (experts_sorted: the same bytes, k/E of the arithmetic).
    """
    N, k = idx.shape
    E = gate_up.shape[0]
    mode = options().decode_experts
    if mode not in DECODE_EXPERTS:
        raise ValueError(f"option decode_experts must be one of {DECODE_EXPERTS}, got {mode!r}")
    if N * k * 2 > E and mode == "triton":
        return experts_sorted(x, idx, w, gate_up, down, "triton")
    if N * k * 2 > E and mode == "grouped_mm" and hasattr(torch, "_grouped_mm") and \
            (not x.is_cuda or grouped_mm_supported(x, gate_up, down)):
        return experts_sorted(x, idx, w, gate_up, down)
    if N * k * 2 <= E:
        flat = idx.reshape(-1)
        xk = x[:, None, :].expand(N, k, x.shape[-1]).reshape(N * k, -1)
        if torch.compiler.is_compiling():  # a fused gather-multiply-reduce: each chosen weight read once
            h = (gate_up[flat].float() * xk[:, None, :].float()).sum(-1).to(x.dtype)
            gate, up = h.chunk(2, dim=-1)
            a = (F.silu(gate.float()) * up.float()).to(x.dtype)
            y = (down[flat].float() * a[:, None, :].float()).sum(-1)
        else:
            h = torch.bmm(gate_up[flat], xk[:, :, None])[..., 0]
            gate, up = h.chunk(2, dim=-1)
            a = F.silu(gate) * up
            y = torch.bmm(down[flat], a[:, :, None])[..., 0].float()
        y = y.to(x.dtype).float().view(N, k, -1)
        return (y * w[..., None]).sum(1).to(x.dtype)
    wd = torch.zeros(N, E, device=x.device, dtype=torch.float32).scatter(1, idx, w.float())
    if mode in ("fused", "routed") and gate_up.dtype == down.dtype == x.dtype:
        from .kernels.launch import STATIC_LOOPS
        if x.is_cuda or STATIC_LOOPS:  # (on the CPU without Triton's interpreter: the body below)
            from .kernels.decode_experts import dense_experts, routed_experts
            if mode == "routed":
                return routed_experts(x.contiguous(), idx, w, gate_up, down)
            return dense_experts(x.contiguous(), wd, gate_up, down)
    h = torch.matmul(x[None], gate_up.transpose(1, 2))  # [E, N, 2I]
    gate, up = h.chunk(2, dim=-1)
    y = torch.matmul(F.silu(gate) * up, down.transpose(1, 2))  # [E, N, D]
    return (y.float() * wd.t()[..., None]).sum(0).to(x.dtype)


def experts_sorted(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, gate_up: torch.Tensor,
                   down: torch.Tensor, product: str = "grouped_mm") -> torch.Tensor:
    """experts_grouped_mm in device ops only (a stable argsort for the expert order, a gather, index_add_ for the
    sum in fp32): traceable by torch.compile, no host sync (CUDA-graph safe). Same contract as
    experts_reference. product: "grouped_mm" (torch._grouped_mm) or "triton" (ops/kernels/moe.py's grouped_gemm:
    CUDA, or Triton's interpreter)."""
    N, k = idx.shape
    E = gate_up.shape[0]
    order = torch.argsort(idx.reshape(-1), stable=True)
    counts = expert_counts(idx, E)
    tok = order // k
    if product == "triton":
        from .kernels.moe import grouped_gemm

        def mm(rows, weight):
            return grouped_gemm(rows.contiguous(), weight, counts)
    else:
        offs = counts.cumsum(0).to(torch.int32)

        def mm(rows, weight):
            return torch._grouped_mm(rows, weight.transpose(-2, -1), offs=offs)
    h = mm(x[tok], gate_up)  # [N*k, 2I]
    gate, up = h.float().chunk(2, dim=-1)
    a = (F.silu(gate) * up * w.reshape(-1)[order, None].float()).to(x.dtype)  # routing weight before down
    y = mm(a, down)  # [N*k, D]
    return torch.zeros(N, x.shape[-1], device=x.device, dtype=torch.float32).index_add_(0, tok, y.float()).to(x.dtype)


EXPERT_BACKENDS = {"reference": experts_reference, "grouped": experts_grouped, "grouped_mm": experts_grouped_mm,
                   "decode": experts_decode, "auto": experts_grouped}


def experts(x, idx, w, gate_up, down, backend: str = "auto") -> torch.Tensor:
    """Dispatch; see experts_reference for shapes. backend "auto" defers to options().experts."""
    if backend == "auto":
        backend = options().experts
    try:
        fn = EXPERT_BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown expert backend {backend!r}; choose from {tuple(EXPERT_BACKENDS)}") from None
    return fn(x, idx, w, gate_up, down)
