"""Which body an op runs on CUDA, and torch.compile with a recompile limit of its own.

An op's plain PyTorch body is its definition (and what the CPU runs). On CUDA, with options().compile (the
default), an op runs either its Triton kernels (ops/kernels/<op>.py, through `triton_for`) or its body
through torch.compile (`cuda_compiled`), which turns it and its backward into one or two fused kernels.
With compile=False the plain bodies run everywhere. Inside an outer torch.compile the plain body runs, so
that the outer graph inlines it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
from types import ModuleType
from typing import Callable, Iterator

import torch

from ..options import options

# Compiled variants (shapes, dtypes) one function may keep, not dynamo's default 8: the small ops see many
# shapes (prefill chunks, decode, verification, batch sizes, layer types), and with fullgraph=True hitting the
# limit is an error, not a fallback.
RECOMPILE_LIMIT = 256

_KERNELS: dict[str, ModuleType | None] = {}


def kernels(name: str) -> ModuleType | None:
    """The kernel file ops/kernels/<name>.py (or the module of that dotted name, e.g.
    "mimo_flash.training.kernels") where triton imports, else None."""
    if name not in _KERNELS:
        try:
            _KERNELS[name] = importlib.import_module(name if "." in name else f"{__package__}.kernels.{name}")
        except ImportError:
            _KERNELS[name] = None
    return _KERNELS[name]


def triton_for(x: torch.Tensor, name: str) -> ModuleType | None:
    """The kernel file `name` for a CUDA tensor outside torch.compile with options().compile, else None (then the
    plain or compiled body runs)."""
    if not x.is_cuda or torch.compiler.is_compiling() or not options().compile:
        return None
    return kernels(name)


def _limit_name() -> str:
    import torch._dynamo

    return "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


@contextlib.contextmanager
def recompile_limit(n: int = RECOMPILE_LIMIT) -> Iterator[None]:
    """Within the block dynamo keeps up to n variants of a function (at least its own setting); restored on exit."""
    import torch._dynamo

    name = _limit_name()
    old = getattr(torch._dynamo.config, name)
    setattr(torch._dynamo.config, name, max(old, n))
    try:
        yield
    finally:
        setattr(torch._dynamo.config, name, old)


def compile_scoped(fn: Callable, limit: int = RECOMPILE_LIMIT, **kwargs) -> Callable:
    """torch.compile(fn, **kwargs) that may keep `limit` compiled variants, without changing dynamo's limit for
    other functions: through torch.compile's own recompile_limit where torch has it, else by raising dynamo's
    limit only while the compiled function runs (which is when dynamo compiles and checks the limit)."""
    if "recompile_limit" in inspect.signature(torch.compile).parameters:
        return torch.compile(fn, recompile_limit=limit, **kwargs)
    compiled = torch.compile(fn, **kwargs)

    @functools.wraps(fn)
    def call(*args, **kw):
        with recompile_limit(limit):
            return compiled(*args, **kw)

    return call


def cuda_compiled(fn: Callable) -> Callable:
    """Wrap fn so that calls whose first tensor argument is on CUDA run torch.compile(fn) (with options().compile,
    outside an outer compile); `wrapper.plain` is fn."""
    compiled = None

    @functools.wraps(fn)
    def wrapper(*args):
        nonlocal compiled
        if torch.compiler.is_compiling() or not args[0].is_cuda or not options().compile:
            return fn(*args)
        if compiled is None:
            compiled = compile_scoped(fn, fullgraph=True)
        return compiled(*args)

    wrapper.plain = fn
    return wrapper


def acc(x: torch.Tensor) -> torch.Tensor:
    """Half precisions up to fp32; fp32 and fp64 stay."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
