"""Forwards of the main model and of the MTP layers over a KVCache, eager or as CUDA graphs.

`Runner` runs everything eagerly (CPU, GPU prefill). `GraphRunner` (CUDA) captures the fixed-shape calls
of decoding (one token per row, verification of K + 1 tokens, the MTP layers' re-runs) into CUDA graphs,
optionally through torch.compile, as gpt-fast does: one graph per (kind, batch, tokens, cache bucket).
Full-attention layers read only the cache slots [0, bucket), bucket = the next power of two (>= 256) above
the longest row, capped at the cache size; SWA and MTP layers read their ring.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import types

import torch
import torch.nn as nn

from ..model.attention import Attention
from ..model.layers import MLP
from ..model.moe import Experts, Router
from ..ops.compiled import compile_scoped
from ..ops.swiglu import silu_mul
from ..ops import moe as moe_ops
from .cache import MAIN, KVCache, mtp_group


def experts_decode(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, gate_up: torch.Tensor,
                   down: torch.Tensor) -> torch.Tensor:
    """Expert compute for a few tokens without sorting or host syncs (CUDA-graph safe).

    x [N, D], idx [N, k], w [N, k] fp32, gate_up [E, 2I, D], down [E, D, I] -> [N, D].
    When N * k <= E / 2 each (token, slot) pair reads its expert's weights directly (batch-1 decode reads
    only the chosen experts); otherwise every expert runs on every token and the routing weights (zero
    for experts not chosen) combine them (large batches touch every expert anyway).
    """
    N, k = idx.shape
    E = gate_up.shape[0]
    if N * k * 2 <= E:
        flat = idx.reshape(-1)
        xk = x[:, None, :].expand(N, k, x.shape[-1]).reshape(N * k, -1)
        if torch.compiler.is_compiling():  # a fused gather-multiply-reduce: each chosen weight read once
            h = (gate_up[flat].float() * xk[:, None, :].float()).sum(-1).to(x.dtype)
            gate, up = h.chunk(2, dim=-1)
            a = (torch.nn.functional.silu(gate.float()) * up.float()).to(x.dtype)
            y = (down[flat].float() * a[:, None, :].float()).sum(-1)
        else:
            h = torch.bmm(gate_up[flat], xk[:, :, None])[..., 0]
            gate, up = h.chunk(2, dim=-1)
            a = torch.nn.functional.silu(gate) * up
            y = torch.bmm(down[flat], a[:, :, None])[..., 0].float()
        y = y.to(x.dtype).float().view(N, k, -1)
        return (y * w[..., None]).sum(1).to(x.dtype)
    h = torch.matmul(x[None], gate_up.transpose(1, 2))  # [E, N, 2I]
    gate, up = h.chunk(2, dim=-1)
    y = torch.matmul(torch.nn.functional.silu(gate) * up, down.transpose(1, 2))  # [E, N, D]
    wd = torch.zeros(N, E, device=x.device, dtype=torch.float32).scatter(1, idx, w.float())
    return (y.float() * wd.t()[..., None]).sum(0).to(x.dtype)


moe_ops.EXPERT_BACKENDS.setdefault("decode", experts_decode)


@contextlib.contextmanager
def expert_backend(model, name: str):
    """Temporarily run every Experts module of `model` with backend `name`."""
    mods = [m for m in model.modules() if isinstance(m, Experts)]
    old = [m.backend for m in mods]
    for m in mods:
        m.backend = name
    try:
        yield
    finally:
        for m, b in zip(mods, old):
            m.backend = b


def _linear_as_reduction(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """x [..., in] -> [..., out]: the product as a multiply-and-sum that torch.compile turns into one
    bandwidth-bound reduction kernel (for a single row it beats a GEMM library call); fp32 accumulation."""
    y = (x.float()[..., None, :] * self.weight.float()).sum(-1).to(x.dtype)
    return y if self.bias is None else y + self.bias


@contextlib.contextmanager
def _forwards_replaced(mods, fn):
    """Within the block, each module in `mods` runs `fn` (bound to it) as its forward."""
    for m in mods:
        m.forward = types.MethodType(fn, m)
    try:
        yield
    finally:
        for m in mods:
            del m.forward


def linears_as_reductions(model):
    """While tracing a one-token step: every nn.Linear but lm_head (already bandwidth-bound) as a reduction."""
    mods = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not model.lm_head]
    return _forwards_replaced(mods, _linear_as_reduction)


def route_decode(self: Router, x: torch.Tensor, count: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Router.forward for traced decode steps (n_group == 1): same selection and weights as ops.moe.route,
    written as fusible reductions instead of a GEMV call plus a top-k kernel.

    x [N, D] -> (indices [N, k], weights [N, k] fp32, tokens per expert [E] when count else None), as
    Router.forward. The top-k comes from ranks: expert e is picked when fewer than k experts beat it
    (higher score, or equal score and lower index).
    """
    scores = (x.float()[:, None, :] * self.weight.float()).sum(-1).sigmoid()  # [N, E]
    choice = scores + self.e_score_correction_bias.float()
    E = choice.shape[-1]
    ar = torch.arange(E, device=x.device)
    beats = (choice[:, None, :] > choice[:, :, None]) | (
        (choice[:, None, :] == choice[:, :, None]) & (ar[None, None, :] < ar[None, :, None]))  # [N, e, e']
    rank = beats.sum(-1)  # [N, E]: experts ahead of e
    onehot = rank[:, :, None] == torch.arange(self.top_k, device=x.device)  # [N, E, k]
    idx = (onehot * ar[None, :, None]).sum(1)  # [N, k], best first
    w = scores.gather(1, idx)
    if self.norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return idx, w * self.scaling, moe_ops.expert_counts(idx, E) if count else None


def routers_for_decode(model):
    """While tracing a decode step: routers without group limits use route_decode."""
    return _forwards_replaced([m for m in model.modules() if isinstance(m, Router) and m.n_group == 1],
                              route_decode)


# ---------------------------------------------------------------------------- fused decode projections
FUSED = {Attention: ("q_proj", "k_proj", "v_proj"), MLP: ("gate_proj", "up_proj")}


def prepare_fused(model) -> bool:
    """Give every Attention a fused [q; k; v] weight and every dense MLP a fused [gate; up] weight
    (module attribute `_mf_fused`, not a parameter: names, state_dict and checkpoints are unchanged).

    A copy, not views: parameters that share one storage would make safetensors refuse to save the model.
    Rebuilt when a source weight changed (pointer, in-place version, dtype). Returns True if any was rebuilt
    (CUDA graphs that read the old copies must then be dropped)."""
    changed = False
    for m in model.modules():
        names = FUSED.get(type(m))
        if names is None:
            continue
        ws = [getattr(m, n).weight for n in names]
        key = tuple((w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape)) for w in ws)
        old = m.__dict__.get("_mf_fused")
        if old is None or old[0] != key:
            with torch.no_grad():
                m.__dict__["_mf_fused"] = (key, torch.cat([w.detach() for w in ws], 0))
            changed = True
    return changed


def _proj(x: torch.Tensor, w: torch.Tensor, reduce: bool) -> torch.Tensor:
    if reduce:  # as _linear_as_reduction: one bandwidth-bound fp32 reduction kernel for a single row
        return (x.float()[..., None, :] * w.float()).sum(-1).to(x.dtype)
    return torch.nn.functional.linear(x, w)


def _attention_fused_forward(reduce: bool):
    def forward(self: Attention, x, rope, meta, cache=None):
        """Attention.forward with q, k and v from one product over the fused weight (same math)."""
        return self.attend(_proj(x, self._mf_fused[1], reduce), rope, meta, cache)
    return forward


def _mlp_fused_forward(reduce: bool):
    def forward(self: MLP, x):
        """MLP.forward with gate and up from one product over the fused weight."""
        h = _proj(x, self._mf_fused[1], reduce)
        i = h.shape[-1] // 2
        return self.down_proj(silu_mul(h[..., :i], h[..., i:]))
    return forward


@contextlib.contextmanager
def fused_projections(model, reduce: bool):
    """While tracing / capturing a step: Attention and dense MLP forwards over the fused weights
    (prepare_fused must have run). reduce: one-row steps, products as fp32 reductions."""
    makers = {Attention: _attention_fused_forward(reduce), MLP: _mlp_fused_forward(reduce)}
    mods = [m for m in model.modules() if type(m) in makers and "_mf_fused" in m.__dict__]
    for m in mods:
        m.forward = types.MethodType(makers[type(m)], m)
    try:
        yield
    finally:
        for m in mods:
            del m.forward


class Runner:
    """Eager forwards over `cache`. Positions index precomputed RoPE tables of `max_length` rows."""

    def __init__(self, model, cache: KVCache, max_length: int) -> None:
        self.model, self.cache = model, cache
        pos = torch.arange(max_length, device=model.device)[None]
        self.rope_tables = model.model.ropes(pos, model.dtype)  # {swa: (cos, sin) [1, S, rotary]}

    def ropes(self, pos: torch.Tensor) -> dict:
        """pos [B, T] -> {swa: (cos, sin) [B, T, rotary]}."""
        return {swa: (c[0][pos], s[0][pos]) for swa, (c, s) in self.rope_tables.items()}

    def main(self, ids, pos, valid, kv_len: int, logits: str = "all", graph: bool = False):
        """Main model over new tokens. ids, pos [B, T] long; valid [B, T] bool or None (all valid);
        kv_len: host bound on max(pos) + 1. logits: "all" -> [B, T, V], "last" -> [B, 1, V], "none" -> None.
        graph: a decode-shaped call that a GraphRunner may replay as a CUDA graph (ignored here).
        Returns (logits, hidden [B, T, D] after model.norm)."""
        return self._main(ids, pos.clamp_min(0), valid, kv_len, logits)

    def _main(self, ids, pos, valid, kv_len, logits):
        meta = self.cache.step(MAIN, pos, valid, kv_len)
        h = self.model.model(ids, meta, self.cache, ropes=self.ropes(pos))
        if logits == "none":
            return None, h
        return self.model.lm_head(h[:, -1:] if logits == "last" else h), h

    def mtp(self, k: int, ids, h_prev, pos, valid, graph: bool = False):
        """MTP layer k. ids, pos [B, T]; h_prev [B, T, D]; valid [B, T] or None ->
        (logits of the last column [B, 1, V], block output [B, T, D])."""
        return self._mtp(k, ids, h_prev, pos.clamp_min(0), valid)

    def _mtp(self, k, ids, h_prev, pos, valid):
        meta = self.cache.step(mtp_group(k), pos, valid, 0)
        return self.model.mtp_step(k, ids, h_prev, meta, self.cache, ropes=self.ropes(pos), logits_to_keep=1)


def kv_bucket(kv_len: int, size: int) -> int:
    """Smallest power of two >= max(kv_len, 256), capped at the cache size."""
    b = 256
    while b < kv_len:
        b *= 2
    return min(b, size)


class GraphRunner(Runner):
    """Runner whose decode-shaped calls replay CUDA graphs (optionally of torch.compile'd code).
    On CPU it only compiles (no graphs), which lets tests trace the same code.

    Graphs are captured on first use of a shape; inputs are copied into static tensors, and the outputs
    are static tensors that the next replay overwrites (callers consume them at once). Capturing runs the
    step a few times first: cache writes are idempotent (same tokens, same slots), so this is harmless.

    fuse: traced steps compute q/k/v (and a dense MLP's gate/up) with one product over a fused copy of
    the weights (prepare_fused). tune: one-row main steps compile with inductor's coordinate-descent
    tuning of block sizes (GEMV-like reductions). fuse defaults on (MIMO_FLASH_DECODE_FUSE=0 turns it off);
    tune defaults off (MIMO_FLASH_DECODE_TUNE=1): on an H100 it made the decode-attention kernel 3.5x slower
    and the batch-1 step no faster (730 vs 717 us). If tracing or capturing with either fails, the step
    falls back to the plain path and says so in `notes`.
    triton: one-token steps of a single sequence run the Triton kernels of generation/triton_step.py
    instead (76 kernels per step instead of 207 on the mini preset); default on where triton imports and the cache
    is on CUDA (MIMO_FLASH_DECODE_TRITON=0 turns it off); True forces it (Triton's CPU interpreter, tests).
    `run_step` captures a whole caller-defined step (speculative decoding: drafts + verification + accept)
    whose model calls run inline (compiled, no nested graphs) inside one graph.
    """

    def __init__(self, model, cache: KVCache, max_length: int, compile: bool = False,
                 max_graph_tokens: int = 16, fuse: bool | None = None, tune: bool | None = None,
                 triton: bool | None = None) -> None:
        super().__init__(model, cache, max_length)
        self.compile = compile
        self.max_graph_tokens = max_graph_tokens
        self.fuse = os.environ.get("MIMO_FLASH_DECODE_FUSE", "1") != "0" if fuse is None else fuse
        self.tune = os.environ.get("MIMO_FLASH_DECODE_TUNE", "0") == "1" if tune is None else tune
        if triton is None:
            triton = (os.environ.get("MIMO_FLASH_DECODE_TRITON", "1") != "0" and cache.device.type == "cuda"
                      and importlib.util.find_spec("triton") is not None)
        from .triton_step import unsupported
        self.triton = bool(triton) and cache.B == 1 and unsupported(model, cache, check_fused=False) is None
        self.graphs: dict = {}
        self.fns: dict = {}  # key -> (compiled) step function
        self.notes: list[str] = []
        self.pool = None
        self.capture_seconds = 0.0
        self._inline = False
        self._triton_step = None
        self.refresh()

    def refresh(self) -> None:
        """Before a generate() call: rebuild stale fused weights; graphs that read the old ones are dropped."""
        if (self.fuse or self.triton) and prepare_fused(self.model):
            self.graphs.clear()
            self.fns.clear()
            self._triton_step = None

    def _tracing(self, rows: int):
        """Module swaps active while a step is traced / captured: decode experts; one-row GEMVs as reductions;
        fused projections."""
        stack = contextlib.ExitStack()
        stack.enter_context(expert_backend(self.model, "decode"))
        if self.compile:
            stack.enter_context(routers_for_decode(self.model))
        if self.compile and rows == 1:
            stack.enter_context(linears_as_reductions(self.model))
        if self.fuse:
            stack.enter_context(fused_projections(self.model, reduce=self.compile and rows == 1))
        return stack

    def _fn(self, key, fn, tune: bool):
        if key not in self.fns:
            f = fn
            if self.compile:
                opts = {"coordinate_descent_tuning": True} if tune else None
                f = compile_scoped(fn, fullgraph=True, dynamic=False, options=opts)
            self.fns[key] = f
        return self.fns[key]

    def _wants_tune(self, key, rows: int) -> bool:
        return self.tune and self.compile and self.cache.device.type == "cuda" and key[0] == "main" and rows == 1

    def _run(self, key, fn, inputs: dict, rows: int | None = None):
        rows = inputs["ids"].numel() if rows is None else rows
        if self._inline:  # inside a whole-step capture: the caller holds the tracing context
            return self._fn(key, fn, False)(**inputs)
        while True:
            tune = self._wants_tune(key, rows)
            try:
                return self._run_once(key, fn, inputs, rows, tune)
            except Exception as e:  # a new path failed: fall back to the plain one and say so
                self.graphs.pop(key, None)
                self.fns.pop(key, None)
                if tune:
                    self.tune = False
                    what = "coordinate-descent tuning"
                elif self.fuse:
                    self.fuse = False
                    self.graphs.clear()
                    self.fns.clear()
                    what = "fused projections"
                else:
                    raise
                msg = f"{key}: {what} failed ({type(e).__name__}: {str(e)[:200]}); falling back"
                self.notes.append(msg)
                import warnings
                warnings.warn(msg)

    def _run_once(self, key, fn, inputs: dict, rows: int, tune: bool):
        if self.cache.device.type != "cuda":  # no CUDA graphs: torch.compile only (tests the traced code on CPU)
            with self._tracing(rows):
                return self._fn(key, fn, tune)(**inputs)
        return self._replay(key, lambda: self._fn(key, fn, tune), inputs, rows)

    def run_step(self, key, fn, inputs: dict, rows: int = 2):
        """Run fn(**inputs) -> outputs as one CUDA graph (on CPU: directly), its model calls inline.
        fn must be idempotent for the same inputs and cache state (warm-up runs it several times)."""
        self._inline = True
        try:
            if self.cache.device.type != "cuda":
                with self._tracing(rows):
                    return fn(**inputs)
            return self._replay(key, lambda: fn, inputs, rows)
        finally:
            self._inline = False

    def _replay(self, key, make_fn, inputs: dict, rows: int):
        """Capture make_fn()(**inputs) as a CUDA graph once per key (3 warm-up runs on a side stream;
        the graphs share one memory pool), then copy the inputs into its static buffers and replay it."""
        if key not in self.graphs:
            import time
            t0 = time.perf_counter()
            static = {n: t.clone() for n, t in inputs.items()}
            f = make_fn()
            with self._tracing(rows):
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(3):
                        f(**static)
                torch.cuda.current_stream().wait_stream(s)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self.pool):
                    out = f(**static)
                if self.pool is None:
                    self.pool = g.pool()
            self.graphs[key] = (g, static, out)
            torch.cuda.synchronize()
            self.capture_seconds += time.perf_counter() - t0
        g, static, out = self.graphs[key]
        names = list(inputs)
        torch._foreach_copy_([static[n] for n in names], [inputs[n] for n in names])
        g.replay()
        return out

    def main(self, ids, pos, valid, kv_len: int, logits: str = "all", graph: bool = False):
        B, T = ids.shape
        if not graph or T > self.max_graph_tokens:  # prefill stays eager
            return super().main(ids, pos, valid, kv_len, logits)
        bucket = kv_bucket(kv_len, self.cache.S)
        if self.triton and B * T == 1 and valid is None:
            out = self._main_triton(ids, pos, kv_len, bucket)
            if out is not None:
                return (None, out[1]) if logits == "none" else out
        key = ("main", B, T, bucket, valid is None, logits)
        inputs = dict(ids=ids, pos=pos.clamp_min(0))
        if valid is not None:
            inputs["valid"] = valid

        def fn(ids, pos, valid=None):
            return self._main(ids, pos, valid, bucket, logits)

        return self._run(key, fn, inputs)

    def greedy_next(self, ids, pos, kv_len: int, out: torch.Tensor) -> None:
        """ids, pos [B, 1] -> the greedy next token of each row (argmax of the logits, first index on ties)
        written to out [B]; the Triton step writes it from inside its lm_head kernel."""
        if self.triton and ids.numel() == 1:
            if self._main_triton(ids, pos, kv_len, kv_bucket(kv_len, self.cache.S), out) is not None:
                return
        logits, _ = self.main(ids, pos, None, kv_len, logits="last", graph=True)
        out.copy_(logits[:, -1].argmax(-1))

    def _main_triton(self, ids, pos, kv_len: int, bucket: int, token: torch.Tensor | None = None):
        """The one-token step through TritonStep (one graph per bucket); None if it failed (the runner then
        keeps the compiled path and says so in `notes`). token [1]: where the greedy token goes."""
        if kv_len > self.cache.S:
            raise ValueError(f"position {kv_len - 1} does not fit in a KV cache of max_length {self.cache.S}")
        key = ("main-triton", bucket)
        try:
            if self._triton_step is None:
                from .triton_step import TritonStep
                self._triton_step = TritonStep(self.model, self.cache, self.rope_tables)
            step = self._triton_step
            if self._inline or self.cache.device.type != "cuda":
                return step(ids, pos, bucket, token)

            def fn(ids, pos):
                return step(ids, pos, bucket)

            out = self._replay(key, lambda: fn, dict(ids=ids, pos=pos), 1)  # one row: no negative position
            if token is not None:
                token.copy_(step.token)
            return out
        except Exception as e:  # also inside a whole-step capture's warm-up runs: the step then uses main's path
            self.graphs.pop(key, None)
            self.triton = False
            msg = f"{key}: Triton decode step failed ({type(e).__name__}: {str(e)[:200]}); falling back"
            self.notes.append(msg)
            import warnings
            warnings.warn(msg)
            return None

    def mtp(self, k: int, ids, h_prev, pos, valid, graph: bool = False):
        B, T = ids.shape
        if not graph or T > self.max_graph_tokens:
            return super().mtp(k, ids, h_prev, pos, valid)
        key = ("mtp", k, B, T, valid is None)
        inputs = dict(ids=ids, h_prev=h_prev, pos=pos.clamp_min(0))
        if valid is not None:
            inputs["valid"] = valid

        def fn(ids, h_prev, pos, valid=None):
            return self._mtp(k, ids, h_prev, pos, valid)

        return self._run(key, fn, inputs)
