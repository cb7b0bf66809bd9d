"""The projection op: y = x @ weight^T (no bias), with the backend chosen by `options().linear`.

Backends:
    "gemm"      - F.linear (a GEMM library call), whatever the option says.
    "auto"      - the backend options().linear names ("auto" there: gemm).
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


LINEAR_BACKENDS = {"gemm": F.linear, "reduction": linear_reduction, "auto": F.linear}


def linear(x: torch.Tensor, weight: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """x [..., in], weight [out, in] -> [..., out]; backend "auto" defers to options().linear."""
    if backend == "auto":
        backend = options().linear
    try:
        fn = LINEAR_BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown linear backend {backend!r}; choose from {tuple(LINEAR_BACKENDS)}") from None
    return fn(x, weight)
