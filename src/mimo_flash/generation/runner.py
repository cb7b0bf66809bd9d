"""Forwards of the main model and of the MTP layers over a KVCache, eager or as CUDA graphs.

`Runner` runs everything eagerly (CPU, GPU prefill). `GraphRunner` (CUDA) captures the fixed-shape calls
of decoding (one token per row, verification of K + 1 tokens, the MTP layers' re-runs) into CUDA graphs,
optionally through torch.compile, as gpt-fast does: one graph per (kind, batch, tokens, cache bucket).
Full-attention layers read only the cache slots [0, bucket), bucket = the next power of two (>= 256) above
the longest row, capped at the cache size; SWA and MTP layers read their ring.
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch._dynamo
import torch.nn as nn

from ..model.moe import Experts, Router
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
def linears_as_reductions(model):
    """While tracing a one-token step: every nn.Linear but lm_head (already bandwidth-bound) as a reduction."""
    mods = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not model.lm_head]
    for m in mods:
        m.forward = types.MethodType(_linear_as_reduction, m)
    try:
        yield
    finally:
        for m in mods:
            del m.forward


def route_decode(self: Router, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Router.forward for traced decode steps (n_group == 1): same selection and weights as ops.moe.route,
    written as fusible reductions instead of a GEMV call plus a top-k kernel.

    x [N, D] -> (indices [N, k], weights [N, k] fp32). The top-k comes from ranks: expert e is picked
    when fewer than k experts beat it (higher score, or equal score and lower index).
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
    return idx, w * self.scaling


@contextlib.contextmanager
def routers_for_decode(model):
    mods = [m for m in model.modules() if isinstance(m, Router) and m.n_group == 1]
    for m in mods:
        m.forward = types.MethodType(route_decode, m)
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
    """

    def __init__(self, model, cache: KVCache, max_length: int, compile: bool = False,
                 max_graph_tokens: int = 16) -> None:
        super().__init__(model, cache, max_length)
        self.compile = compile
        self.max_graph_tokens = max_graph_tokens
        self.graphs: dict = {}
        self.pool = None
        self.capture_seconds = 0.0

    def _tracing(self, rows: int):
        """Module swaps active while a step is traced / captured: decode experts; one-row GEMVs as reductions."""
        stack = contextlib.ExitStack()
        stack.enter_context(expert_backend(self.model, "decode"))
        if self.compile:
            stack.enter_context(routers_for_decode(self.model))
        if self.compile and rows == 1:
            stack.enter_context(linears_as_reductions(self.model))
        return stack

    def _run(self, key, fn, inputs: dict):
        rows = inputs["ids"].numel()
        if self.cache.device.type != "cuda":  # no CUDA graphs: torch.compile only (tests the traced code on CPU)
            if key not in self.graphs:
                self.graphs[key] = torch.compile(fn, fullgraph=True, dynamic=False) if self.compile else fn
            with self._tracing(rows):
                return self.graphs[key](**inputs)
        if key not in self.graphs:
            import time
            t0 = time.perf_counter()
            static = {n: t.clone() for n, t in inputs.items()}
            f = fn
            if self.compile:
                for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                             "accumulated_recompile_limit"):
                    if hasattr(torch._dynamo.config, name):
                        setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
                f = torch.compile(fn, fullgraph=True, dynamic=False)
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
        for n, t in inputs.items():
            static[n].copy_(t)
        g.replay()
        return out

    def main(self, ids, pos, valid, kv_len: int, logits: str = "all", graph: bool = False):
        B, T = ids.shape
        if not graph or T > self.max_graph_tokens:  # prefill stays eager
            return super().main(ids, pos, valid, kv_len, logits)
        bucket = kv_bucket(kv_len, self.cache.S)
        key = ("main", B, T, bucket, valid is None, logits)
        inputs = dict(ids=ids, pos=pos.clamp_min(0))
        if valid is not None:
            inputs["valid"] = valid

        def fn(ids, pos, valid=None):
            return self._main(ids, pos, valid, bucket, logits)

        return self._run(key, fn, inputs)

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
