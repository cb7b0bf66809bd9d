"""The FP8 block format of the release: weight blocks, activation groups, (de)quantization.

A quantized weight w [..., R, C] is q = float8_e4m3fn [..., R, C] plus
scale_inv = float32 [..., ceil(R / br), ceil(C / bc)] with one value per (br x bc) block (128 x 128 in the
release):
    w[r, c] = q[r, c] * scale_inv[r // br, c // bc]
Edge blocks are partial. Leading dimensions (fused experts) have one scale grid each.
Activations (W8A8 "dynamic" scheme) are quantized per token and 128-column group:
    x[m, k] = xq[m, k] * x_scale[m, k // 128]
checkpoint/ reads and writes these tensors; quant/ computes with them.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_SUFFIX = "_scale_inv"  # checkpoint name of a weight's scale: <name>_scale_inv
BLOCK = (128, 128)  # the release's weight block; the GEMM backends need it (fp8_linear)
GROUP = 128  # activation group: one scale per token and GROUP columns


def scale_grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """Weight shape [..., R, C] -> the scale shape [..., ceil(R / br), ceil(C / bc)] it needs."""
    *lead, R, C = shape
    return (*lead, math.ceil(R / block[0]), math.ceil(C / block[1]))


_TABLES: dict[torch.device, torch.Tensor] = {}
CHUNK = 1 << 15  # elements per step on CPU: temporaries stay in cache, and at torch's grain size no
                 # intra-op threads are involved (they only add overhead for this streaming work)


def _table(device: torch.device) -> torch.Tensor:
    """The 256 float8_e4m3fn values as fp32 [256], indexed by their bit pattern."""
    if device not in _TABLES:
        _TABLES[device] = torch.arange(256, dtype=torch.uint8).view(FP8).float().to(device)
    return _TABLES[device]


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], out: torch.Tensor | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q [..., R, C] float8, scale_inv [..., >= ceil(R/br), >= ceil(C/bc)] -> out [..., R, C].

    out[r, c] = fp32(q[r, c]) * scale_inv[r // br, c // bc], rounded once to out's dtype. Extra
    trailing scale rows/cols are ignored (check_scale decides whether that is allowed). `out` is
    allocated with `dtype` if None; it may be a view (e.g. one expert's rows of a fused tensor).
    FP8 -> fp32 goes through a 256-entry table (exact, and ~4x faster than torch's conversion on CPU),
    a few rows at a time so that the temporaries stay small.
    """
    if out is None:
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
    *lead, R, C = q.shape
    br, bc = block
    q, scale_inv = q.to(out.device), scale_inv.to(out.device)
    table = _table(out.device)
    step = max(1, min(br, CHUNK // max(C, 1))) if out.device.type == "cpu" else br
    for idx in itertools.product(*(range(n) for n in lead)):
        bits, si, oi = q[idx].view(torch.uint8), scale_inv[idx].float(), out[idx]
        for i, r0 in enumerate(range(0, R, br)):
            r_end = min(r0 + br, R)
            row_scale = si[i].repeat_interleave(bc)[:C]  # [C]
            for a in range(r0, r_end, step):
                b = min(a + step, r_end)
                v = torch.index_select(table, 0, bits[a:b].reshape(-1).long()).view(b - a, C)
                oi[a:b] = v.mul_(row_scale)
    return out


def quantize(w: torch.Tensor, block: tuple[int, int], name: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., R, C] float -> (q [..., R, C] float8_e4m3fn, scale_inv [..., ceil(R/br), ceil(C/bc)] fp32).

    scale_inv = amax(|block|) / 448, so each block's largest value maps to +-448; an all-zero block
    gets scale 1 (it round-trips to zeros). Raises ValueError naming `name` on non-finite values.
    Runs on w's device, one leading index (expert) at a time: the temporaries are one [R, C] fp32 matrix.
    """
    *lead, R, C = w.shape
    br, bc = block
    r, c = math.ceil(R / br), math.ceil(C / bc)
    q = torch.empty(w.shape, dtype=FP8, device=w.device)
    scale = torch.empty((*lead, r, c), dtype=torch.float32, device=w.device)
    for idx in itertools.product(*(range(n) for n in lead)):
        wi = F.pad(w[idx].float(), (0, c * bc - C, 0, r * br - R)).view(r, br, c, bc)
        amax = wi.abs().amax(dim=(1, 3))  # [r, c]
        if not torch.isfinite(amax).all():
            raise ValueError(f"{name} has non-finite values (NaN or Inf); cannot quantize it")
        s = torch.where(amax > 0, (amax / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny), 1.0)
        qi = (wi / s.view(r, 1, c, 1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        q[idx] = qi.view(r * br, c * bc)[:R, :C]
        scale[idx] = s
    return q, scale


def quantize_activations(x: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] float -> (xq [..., K] float8_e4m3fn, scale [..., ceil(K / group)] fp32), per token and group.

    scale = amax(|group|) * fp32(1 / 448) (an all-zero group gets 1), so x ~= xq * scale[..., k // group]. The
    "dynamic" activation scheme of the release: computed on the fly for every product.
    """
    *lead, K = x.shape
    g = math.ceil(K / group)
    xp = F.pad(x.float(), (0, g * group - K)).view(*lead, g, group)
    amax = xp.abs().amax(-1)
    # (times the fp32 reciprocal, not a division: torch's CUDA division by a scalar multiplies by it, its CPU one
    # divides, so this is the one formula that gives the same scales everywhere, the Triton kernel's included)
    s = torch.where(amax > 0, (amax * (1.0 / FP8_MAX)).clamp_min(torch.finfo(torch.float32).tiny),
                    torch.ones_like(amax))
    xq = (xp / s[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(*lead, g * group)[..., :K]
    return xq, s


def dequantize_activations(xq: torch.Tensor, scale: torch.Tensor, group: int = GROUP,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """quantize_activations' inverse: xq [..., K], scale [..., ceil(K / group)] -> [..., K] in dtype."""
    K = xq.shape[-1]
    return (xq.float() * scale.repeat_interleave(group, -1)[..., :K]).to(dtype)


def expand_scale(scale_inv: torch.Tensor, shape: tuple[int, ...], block: tuple[int, int] = BLOCK) -> torch.Tensor:
    """scale_inv [..., >= ceil(R/br), >= ceil(C/bc)] -> the per-element scale [..., R, C] (a temporary)."""
    *_, R, C = shape
    return scale_inv.repeat_interleave(block[0], -2)[..., :R, :].repeat_interleave(block[1], -1)[..., :C]


def dequantize_fast(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype,
                    block: tuple[int, int] = BLOCK) -> torch.Tensor:
    """dequantize() in a few whole-tensor ops (for GPUs, where the table loop is slow): same numbers
    (fp32 product, rounded once to dtype). q [..., R, C], scale_inv [..., ceil(R/br), ceil(C/bc)] -> [..., R, C]."""
    return (q.float() * expand_scale(scale_inv.float(), tuple(q.shape), block)).to(dtype)


def trim_scale(scale_inv: torch.Tensor, shape: tuple[int, ...], block: tuple[int, int] = BLOCK) -> torch.Tensor:
    """The standard ceil grid of a scale that may carry extra trailing rows/cols (the k_proj trap)."""
    *_, r, c = scale_grid(shape, block)
    return scale_inv[..., :r, :c]


def dequantize_box(q: torch.Tensor, scale_inv: torch.Tensor, index: tuple, block: tuple[int, int],
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q[index] dequantized: index is one slice per dim of q [..., R, C] (step 1, concrete); the blocks that
    cover the last two dims' slices are read whole with their scales (a slice starting inside a block needs
    that block's scale), dequantized, then cut. -> [selected shape] in dtype."""
    *lead, rows, cols = index
    br, bc = block
    r0, r1 = rows.start // br * br, min(q.shape[-2], math.ceil(rows.stop / br) * br)
    c0, c1 = cols.start // bc * bc, min(q.shape[-1], math.ceil(cols.stop / bc) * bc)
    part = q[(*lead, slice(r0, r1), slice(c0, c1))]
    sc = scale_inv[(*lead, slice(r0 // br, math.ceil(r1 / br)), slice(c0 // bc, math.ceil(c1 / bc)))]
    return dequantize(part, sc, block, dtype=dtype)[..., rows.start - r0:rows.stop - r0, cols.start - c0:cols.stop - c0]


def block_aligned(src: tuple, dst: tuple, src_shape: tuple[int, ...], dst_shape: tuple[int, ...],
                  block: tuple[int, int]) -> bool:
    """Whether dst[dst box] = src[src box] (one concrete slice per dim each; only the last two dims are
    checked) can copy the FP8 bytes and the scale rows/cols as they are: both boxes start on a block
    boundary in both dims, and each extent is whole blocks or runs to the end of both tensors (an edge
    block, partial in both)."""
    for s, d, sn, dn, b in zip(src[-2:], dst[-2:], src_shape[-2:], dst_shape[-2:], block, strict=True):
        n = s.stop - s.start
        if s.start % b or d.start % b or not (n % b == 0 or (s.stop == sn and d.stop == dn)):
            return False
    return True


def block_box(box: tuple, block: tuple[int, int]) -> tuple:
    """A block-aligned box of a weight (one concrete slice per dim) -> the box of its scale grid."""
    *lead, rows, cols = box
    return (*lead, slice(rows.start // block[0], math.ceil(rows.stop / block[0])),
            slice(cols.start // block[1], math.ceil(cols.stop / block[1])))
