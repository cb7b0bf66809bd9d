"""The projection op: y = x @ weight^T (no bias), with the backend chosen by `options().linear`.

Backends:
    "auto"      - F.linear (a GEMM library call).
    "reduction" - the product as an fp32 multiply-and-sum over the input dim. Inside torch.compile this
                  becomes one bandwidth-bound reduction kernel, faster than a GEMM call for a single row
                  (the one-row decode steps of generation/runner.py trace with it); same numbers up to the
                  order of the fp32 sum, rounded to x's dtype once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..options import options


def linear_reduction(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in], weight [out, in] -> [..., out] in x's dtype (fp32 accumulation)."""
    return (x.float()[..., None, :] * weight.float()).sum(-1).to(x.dtype)


LINEAR_BACKENDS = {"auto": F.linear, "reduction": linear_reduction}


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in], weight [out, in] -> [..., out] through the backend `options().linear` names."""
    name = options().linear
    try:
        fn = LINEAR_BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown linear backend {name!r} (option linear); choose from {tuple(LINEAR_BACKENDS)}") \
            from None
    return fn(x, weight)
