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
class TritonStepTuning:
    """Block shapes and launch settings of the batch-1 Triton decode step (generation/triton_step.py),
    chosen by measurement on an H100/H200 (bench/decode.py --sweep takes these field names)."""

    min_programs: int = 264  # a GEMV's row blocks shrink until it has about this many programs (2 per SM)
    tile: int = 4096  # elements of a GEMV program's weight tile
    max_k: int = 1024  # widest K block of a GEMV (with PDL the first block loads while the previous kernel ends)
    num_warps: int = 8  # GEMVs of 16M weights or more (lm_head)
    small_gemv_warps: int = 4  # smaller GEMVs (q/k/v, o_proj on the mini preset: measured faster)
    expert_warps: int = 8  # router, gate/up, down
    gate_up_tile: int = 2048  # gate/up: weight elements per program and matrix (gate, up)
    attn_warps: int = 4
    max_splits: int = 16  # key splits per kv head in decode attention
    pf_chunk: int = 32768  # elements per prefetch program
    lm_head_tile: int = 16384  # lm_head: fewer programs, so the last one's argmax over theirs is shorter
    lm_head_prefetch: int = 4 << 20  # lm_head elements pulled into L2 during the last layer
    down_early: bool = True  # the down kernel loads its weights before its PDL wait (gate/up lets it start late)
    down_tile: int = 4096  # down: weight elements per program (all chosen experts' rows)
    fp8_tile: int = 4  # FP8 weights: tiles and max_k this many times as many elements (1 / 2 / 4: 1.55 / 1.46 / 1.28 ms)

    def __post_init__(self) -> None:
        _check_types(self)


def _check_types(obj) -> None:
    kinds = {"bool": bool, "str": str, "int": int, "float": (int, float), "TritonStepTuning": TritonStepTuning}
    for f in dataclasses.fields(obj):
        v, want = getattr(obj, f.name), kinds.get(f.type if isinstance(f.type, str) else f.type.__name__)
        if want is None:
            continue
        if not isinstance(v, want) or (want is int and isinstance(v, bool)):
            raise TypeError(f"option {f.name} must be a {f.type}, got {v!r}")


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
    # the decode backend with more than E/2 (token, expert) pairs (batched decode, verification): "routed" (the
    # default) each expert on the tokens that chose it only, in three Triton kernels (CUDA; elsewhere "dense"; on an
    # H100 at the mini preset's sizes as fast as "fused" at 32 and 64 tokens, 13% faster at 128, 31% at 256:
    # docs/BENCHMARKS.md); "fused" every expert on every token in two Triton kernels that skip experts no token
    # chose (CUDA; elsewhere "dense"; at batch 64 on an H100 faster than "dense" in plain and K = 1 steps); "dense"
    # the same through cuBLAS, the routing weights (zero where not chosen) combining them; "grouped_mm"
    # torch._grouped_mm over the pairs sorted by expert (argsort; traceable, no host sync; at batch 64 its plain
    # step was slower on the H200: 29,866 against 37,829 decode tok/s, docs/BENCHMARKS.md); "triton"
    # ops/kernels/moe.py's grouped kernel over the sorted pairs (each chosen expert's weights read once per 16 of its
    # pairs; slower than "dense" at batch 64)
    decode_experts: str = "routed"
    # generation/attention.py: "auto" (CUDA: the Triton kernel for steps of several tokens a row and one-token steps
    # of TRITON_ROWS rows or more, the torch body for smaller one-token steps; measured, docs/BENCHMARKS.md) |
    # "torch" | "triton" (CUDA: each row's keys read up to its own position; graphed steps of several rows then need
    # no cache bucket, runner.graph_bucket)
    cache_attention: str = "auto"
    linear: str = "auto"  # ops/linear.py: auto | gemm (F.linear) | reduction (fp32 multiply-and-sum, one-row decode)
    fp8_linear: str = "auto"  # quant/gemm.py: auto | reference | w8a8 | scaled_mm | triton (FP8Linear modules)
    fp8_experts: str = "auto"  # quant/gemm.py: auto | reference | triton | w8a8 (FP8Experts modules)
    # decoding (generation/)
    # batch-1 decode steps through generation/triton_step.py: "auto" (CUDA, where triton imports) | "always"
    # (also on CPU: Triton's interpreter, tests) | "off"
    decode_triton: str = "auto"
    decode_tune: bool = False  # coordinate-descent tuning of compiled one-row steps (slower on an H100)
    decode_prefetch: bool = True  # the Triton step pulls the next weights into L2 (attention, router)
    decode_pdl: bool = True  # programmatic dependent launch in the Triton step where the GPU has it
    # batch-1 speculative verification through the Triton step (TritonStep.verify). Off: it agrees with the eager
    # forward (H200, bf16 and FP8, within 1% once routing has no near-ties), but its per-token router and expert
    # kernels make it slower than the compiled verification there (mini: speculative step 1.44 against 1.28 ms
    # at K = 1, 1.87 against 1.66 ms at K = 2)
    decode_triton_verify: bool = False
    spec_graph: bool = True  # a whole speculative step (drafts, verification, acceptance) as one CUDA graph
    triton_step: TritonStepTuning = TritonStepTuning()  # the Triton step's block shapes (read when it is built)

    def __post_init__(self) -> None:
        _check_types(self)


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
