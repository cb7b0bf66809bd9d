"""Products with FP8 block weights: fp8_linear (one weight) and fp8_experts (the routed experts).

fp8_linear backends (x [..., K], weight q [N, K] float8_e4m3fn, scale_inv [ceil(N/128), ceil(K/128)] fp32):
    "reference" - dequantize the weight per use and compute in x's dtype (F.linear). The CPU path; on an
                  fp32 model it equals the dequantized model's F.linear to the last bit.
    "w8a8"      - the W8A8 numbers, written plainly: activations quantized per token and 128-column group,
                  both operands dequantized to fp32, fp32 product. What "scaled_mm" computes (tests).
    "scaled_mm" - CUDA (Hopper): torch._scaled_mm with activations scaled per 1x128 group (quantized by one
                  Triton kernel, triton_fp8.quantize_activations_fast) and the weight per 128x128 block, fp32
                  accumulation, output in x's dtype. Prefill-sized products.
    "triton"    - CUDA (or the Triton interpreter): quant/triton_fp8.py reads the FP8 bytes with their
                  block scales, activations unquantized. For decode (1-64 rows), where scaled_mm is slower
                  than bf16 (measured on the H200: 33 us vs 23-29 us).
    "auto"      - CPU: reference. CUDA: triton up to DECODE_ROWS rows, scaled_mm above (where its shape
                  rules hold, else dequantize into x's dtype and F.linear).
fp8_experts backends (weights [E, ...] with [E, rows/128, cols/128] scales): "reference" dequantizes the
chosen experts one at a time; "triton" runs both projections as grouped Triton products over the rows
sorted by expert, reading the FP8 weights with unquantized activations (decode); "w8a8" quantizes the
activations per 1x128 group and runs both projections as grouped FP8 x FP8 tensor-core products
(triton_fp8.w8a8_grouped_gemm; prefill: torch._scaled_grouped_mm takes only row-wise weight scales, so it
cannot use the release's 128x128 blocks without requantizing them); "auto" on CUDA picks w8a8 from
W8A8_ROWS_PER_EXPERT sorted rows per expert on average, triton below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .blocks import BLOCK, GROUP, dequantize, dequantize_activations, dequantize_fast, quantize_activations

DECODE_ROWS = 64  # rows at or below which the weight-reading Triton kernel beats scaled_mm
W8A8_ROWS_PER_EXPERT = 32  # routed rows per expert (mean) from which the experts run W8A8 (not yet measured)


def _dequant(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if q.device.type == "cpu":  # table lookups in cache-sized chunks (checkpoint loading's routine)
        return dequantize(q, s, BLOCK, dtype=dtype)
    return dequantize_fast(q, s, dtype)


def linear_reference(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> [..., N]: F.linear with the weight dequantized to x's dtype (fp32 products, one rounding)."""
    return F.linear(x, _dequant(q, s, x.dtype))


def linear_w8a8(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype: activations quantized per 1x128 group, fp32 product of the two
    dequantized operands."""
    xd = dequantize_activations(*quantize_activations(x, GROUP), GROUP)
    return F.linear(xd, _dequant(q, s, torch.float32)).to(x.dtype)


def scaled_mm_supported(x: torch.Tensor, q: torch.Tensor) -> bool:
    """torch._scaled_mm's block-scaled recipe: CUDA compute capability 9.x, K a multiple of 128, N of 16."""
    if not (x.is_cuda and hasattr(torch, "_scaled_mm")):
        return False
    N, K = q.shape
    return torch.cuda.get_device_capability(x.device)[0] == 9 and K % 128 == 0 and N % 16 == 0


def linear_scaled_mm(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype through torch._scaled_mm (1x128 activation groups x 128x128 weight
    blocks). scale_a [M, K/128] must be outer-dim-major (column-major); scale_b is the weight scale grid
    transposed, [K/128, N/128]; the weight operand is q^T, column-major as _scaled_mm wants."""
    lead, K = x.shape[:-1], x.shape[-1]
    from .triton_fp8 import quantize_activations_fast

    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    pad = -M % 4  # (rows padded to a multiple of 4: cuBLASLt refused the scales of M = 129 on the H200)
    xq, xs = quantize_activations_fast(F.pad(x2, (0, 0, 0, pad)) if pad else x2.contiguous())
    y = torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=s.t(), out_dtype=x.dtype)
    return (y[:M] if pad else y).view(*lead, q.shape[0])


def linear_triton(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> [..., N]: the Triton kernel that reads the FP8 bytes (activations unquantized)."""
    from .triton_fp8 import fp8_gemm

    lead, K = x.shape[:-1], x.shape[-1]
    return fp8_gemm(x.reshape(-1, K).contiguous(), q, s).view(*lead, q.shape[0])


def linear_auto(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    if not x.is_cuda:
        return linear_reference(x, q, s)
    rows = x.numel() // x.shape[-1]
    if rows <= DECODE_ROWS:
        return linear_triton(x, q, s)
    if scaled_mm_supported(x, q):
        return linear_scaled_mm(x, q, s)
    return linear_reference(x, q, s)


LINEAR_BACKENDS = {"reference": linear_reference, "w8a8": linear_w8a8, "scaled_mm": linear_scaled_mm,
                   "triton": linear_triton, "auto": linear_auto}


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """y = x @ W^T with W = weight * scale_inv per 128x128 block.

    x [..., K] (bf16 / fp16 / fp32), weight [N, K] float8_e4m3fn, scale_inv [ceil(N/128), ceil(K/128)] fp32
    -> [..., N] in x's dtype. Backends: see the module docstring.
    """
    try:
        fn = LINEAR_BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown fp8_linear backend {backend!r}; choose from {tuple(LINEAR_BACKENDS)}") from None
    return fn(x, weight, scale_inv)


# ---------------------------------------------------------------------------------------------- experts
def experts_reference(x, idx, w, gate_up, gate_up_scale, down, down_scale):
    """x [N, D], idx [N, k], w [N, k] fp32, gate_up [E, 2I, D] fp8 + scale [E, 2I/128, D/128], down [E, D, I]
    fp8 + scale [E, D/128, I/128] -> [N, D]: each chosen expert dequantized to x's dtype, then its SwiGLU."""
    out = torch.zeros_like(x)
    for e in idx.unique().tolist():
        tok, slot = torch.where(idx == e)
        gu = _dequant(gate_up[e], gate_up_scale[e], x.dtype)
        dn = _dequant(down[e], down_scale[e], x.dtype)
        g, u = F.linear(x[tok], gu).chunk(2, dim=-1)
        y = F.linear(F.silu(g) * u, dn) * w[tok, slot, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


def experts_triton(x, idx, w, gate_up, gate_up_scale, down, down_scale):
    """experts_reference's contract: rows sorted by expert once, both projections grouped Triton products
    reading the FP8 bytes, the SwiGLU and routing weight in between, outputs summed back per token.
    Pairs of routing weight 0 (the tokens that are not there: ops/moe.router's present mask, e.g. a batch's
    finished rows) sort into a bucket after the last expert that neither product reads, so an expert that only
    such tokens chose is never loaded; their rows, left unwritten, are zeroed before the sum."""
    from ..ops.kernels.moe import grouped_gemm
    from ..ops.moe import gather_sum, sort_by_expert

    E, k = gate_up.shape[0], idx.shape[1]
    live = w != 0
    order, inv, counts, tok, _ = sort_by_expert(torch.where(live, idx, E), E + 1)
    counts = counts[:E]  # the live rows come first, in expert order
    xs = x[tok].contiguous()  # [N*k, D]
    h = grouped_gemm(xs, gate_up, counts, scale=gate_up_scale)  # [N*k, 2I]
    g, u = h.float().chunk(2, dim=-1)
    a = (F.silu(g) * u * w.reshape(-1)[order, None].float()).to(x.dtype)
    ys = grouped_gemm(a.contiguous(), down, counts, scale=down_scale)  # [N*k, D]
    ys = torch.where(live.reshape(-1)[order, None], ys, 0)
    return gather_sum(ys, inv, k)  # each token's outputs summed in fp32


def experts_w8a8(x, idx, w, gate_up, gate_up_scale, down, down_scale, tile: dict | None = None):
    """experts_reference's contract, W8A8: rows sorted by expert once, each token quantized per 1x128 group and
    written to its sorted rows (no gathered copy), both projections grouped FP8 x FP8 Triton products (fp32
    sums), the SwiGLU and routing weight in between (rounded to x's dtype and quantized for the down projection in
    the same pass), each token's outputs summed back in fp32 (ops/moe.py's gather_sum). tile:
    triton_fp8.W8A8_TILE's keys."""
    from ..ops.moe import gather_sum, sort_by_expert
    from .triton_fp8 import quantize_dispatch, swiglu_quantize, w8a8_grouped_gemm

    E, k = gate_up.shape[0], idx.shape[1]
    order, inv, counts, _, _ = sort_by_expert(idx, E)
    xq, xs = quantize_dispatch(x.contiguous(), inv, k)  # [N*k, D] in expert order
    h = w8a8_grouped_gemm(xq, xs, gate_up, gate_up_scale, counts, x.dtype, tile)  # [N*k, 2I]
    aq, as_ = swiglu_quantize(h, w.reshape(-1)[order].float())  # silu(gate) * up * weight, quantized: one pass
    ys = w8a8_grouped_gemm(aq, as_, down, down_scale, counts, x.dtype, tile)  # [N*k, D]
    return gather_sum(ys, inv, k)


def experts_auto(*args):
    x, idx, gate_up = args[0], args[1], args[3]
    if not x.is_cuda:
        return experts_reference(*args)
    if idx.numel() >= W8A8_ROWS_PER_EXPERT * gate_up.shape[0] and x.shape[1] % 16 == 0 and gate_up.shape[1] % 32 == 0:
        return experts_w8a8(*args)  # (TMA's rows: D and I multiples of 16 bytes)
    return experts_triton(*args)


EXPERT_BACKENDS = {"reference": experts_reference, "triton": experts_triton, "w8a8": experts_w8a8,
                   "auto": experts_auto}


def fp8_experts(x, idx, w, gate_up, gate_up_scale, down, down_scale, backend: str = "auto") -> torch.Tensor:
    """Routed experts with FP8 block weights; see experts_reference for shapes."""
    try:
        fn = EXPERT_BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown fp8_experts backend {backend!r}; choose from {tuple(EXPERT_BACKENDS)}") from None
    return fn(x, idx, w, gate_up, gate_up_scale, down, down_scale)
