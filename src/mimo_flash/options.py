"""One frozen options object: which backend each op runs, and the fast-path switches.

Every run-time switch of the package lives here (no environment variable is read below this file, no
module constant is patched). Read the current options with `options()`; change them for a block with
`override(...)` (restored on exit, errors included) or for the whole process with `set_options(...)`.

    from mimo_flash.options import options, override
    with override(compile=False):        # plain PyTorch bodies everywhere in this block
        model(ids)

The op files read the fields they own (ops/attention.py `attention`, ops/moe.py `router` / `experts`,
ops/linear.py `linear`, ops/compiled.py `compile`, ops/kernels/launch.py `direct_launch`; generation/ the
decode fields). A module's own `backend` attribute (MiMoForCausalLM.set_backends) takes precedence over the
option; "auto" defers to it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class Options:
    # fused small ops on CUDA (RMSNorm, RoPE, SwiGLU, gather-sum, ...) as Triton kernels or torch.compile'd
    # bodies; False runs the plain PyTorch bodies everywhere (the definition; what the CPU runs)
    compile: bool = True
    # Triton kernels launched through the C launcher directly where the Triton version is the one
    # ops/kernels/launch.py was written for; False: every launch through Triton's own kernel[grid]
    direct_launch: bool = True
    # default backends of the ops whose modules say "auto"; "auto" lets the op choose by device, dtype, shape
    attention: str = "auto"  # ops/attention.py: auto | reference | blocked | sdpa | flex | cudnn | triton
    router: str = "auto"  # ops/moe.py: auto | reference | triton | decode (rank-based top-k, graph- and trace-safe)
    experts: str = "auto"  # ops/moe.py: auto | reference | grouped | decode (no sort, no host sync)
    linear: str = "auto"  # ops/linear.py: auto (F.linear) | reduction (fp32 multiply-and-sum, one-row decode)
    # decoding (generation/)
    decode_triton: bool = True  # batch-1 decode steps through generation/triton_step.py (CUDA, triton)
    decode_tune: bool = False  # coordinate-descent tuning of compiled one-row steps (slower on an H100)
    decode_prefetch: bool = True  # the Triton step pulls the next weights into L2 (attention, router)
    decode_pdl: bool = True  # programmatic dependent launch in the Triton step where the GPU has it
    spec_graph: bool = True  # a whole speculative step (drafts, verification, acceptance) as one CUDA graph

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            want = bool if f.type in ("bool", bool) else str
            if not isinstance(v, want):
                raise TypeError(f"option {f.name} must be a {want.__name__}, got {v!r}")


_current = Options()


def options() -> Options:
    """The options in force."""
    return _current


def _replace(changes: dict) -> Options:
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(Options)})
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; known: "
                         f"{', '.join(f.name for f in dataclasses.fields(Options))}")
    return dataclasses.replace(_current, **changes)


def set_options(**changes) -> Options:
    """Change options for the rest of the process; returns the new options."""
    global _current
    _current = _replace(changes)
    return _current


@contextlib.contextmanager
def override(**changes) -> Iterator[Options]:
    """Within the block, the given options replace the current ones (the old ones come back on exit)."""
    global _current
    old, _current = _current, _replace(changes)
    try:
        yield _current
    finally:
        _current = old
