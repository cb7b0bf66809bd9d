"""Forwards of the main model and of the MTP layers over a KVCache, eager or as CUDA graphs.

`Runner` runs everything eagerly (CPU, GPU prefill). `GraphRunner` (CUDA) captures the fixed-shape calls
of decoding (one token per row, verification of K + 1 tokens, the MTP layers' re-runs) into CUDA graphs,
optionally through torch.compile, as gpt-fast does: one graph per (kind, batch, tokens, cache bucket).
Full-attention layers read only the cache slots [0, bucket), bucket = the next power of two (>= 256) above
the longest row, capped at the cache size; SWA and MTP layers read their ring.

Decode steps are traced / captured with the ops' decode backends (options.override: router "decode" when
compiled, experts "decode", linear "reduction" for compiled one-row steps); the model is never modified.
A runner owns what it learns about its paths: `graph_failed(path, error)` records that a graphed path (the
greedy or sampled chunk, the greedy or sampled speculative step) failed, after which `graphs_for(path)` is False and
callers take the step-by-step path; `notes` lists every fallback.
"""

from __future__ import annotations

import importlib.util
import time
import warnings

import torch

from ..ops.compiled import compile_scoped
from ..options import options, override
from .cache import MAIN, KVCache, mtp_group


class Runner:
    """Eager forwards over `cache`. Positions index precomputed RoPE tables of `max_length` rows."""

    def __init__(self, model, cache: KVCache, max_length: int) -> None:
        self.model, self.cache = model, cache
        pos = torch.arange(max_length, device=model.device)[None]
        self.rope_tables = model.model.ropes(pos, model.dtype)  # {swa: (cos, sin) [1, S, rotary]}
        self.notes: list[str] = []  # fallbacks taken, said once each
        self.failed: dict[str, str] = {}  # graphed path -> why it failed
        # adaptive K's rings of committed tokens / hidden states (rings.SpecRings): made by the engine on
        # first use and kept here, like the cache, because captured steps write them in place
        self.spec_rings = None
        self.adaptive = None  # adaptive K's controller with measured costs (adaptive.AdaptiveK), kept across calls
        # graphs captured and step functions compiled so far (GraphRunner): a call during which it grew paid for
        # building them, so adaptive K does not take its time as a step's cost
        self.builds = 0
        self.rng = None  # the runner's own generator (generator()), made on first use

    def generator(self, seed: int) -> torch.Generator:
        """The runner's generator, seeded: a call with a seed samples from it. One generator per runner, not one per
        call, because a captured step that samples draws from the generator it was captured with (its state is
        registered with the graph, whose replays advance it)."""
        if self.rng is None:
            self.rng = torch.Generator(device=self.cache.device)
        return self.rng.manual_seed(int(seed))

    def graphs_for(self, path: str) -> bool:
        """Whether `path` ("greedy" / "sampled": chunks of plain steps, "spec" / "spec-sampled": whole speculative
        steps) may run as one captured step on this runner (never on an eager Runner)."""
        return False

    def graph_failed(self, path: str, error: Exception) -> str:
        """Record that the graphed `path` failed: callers take the step-by-step path from now on. Warns;
        returns the message (also in notes and failed[path])."""
        msg = f"graphed {path} step failed ({type(error).__name__}: {str(error)[:200]}); step-by-step path"
        self.failed[path] = msg
        self._note(msg)
        return msg

    def _note(self, msg: str) -> None:
        self.notes.append(msg)
        warnings.warn(msg)

    def glue(self, key, fn):
        """fn as this runner runs a step's own arithmetic between forwards (speculative acceptance and state
        updates): as is here; compiled on a compiling GraphRunner (one function per key; fewer kernels)."""
        return fn

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


# batch-1 graphed steps of up to this many tokens run the Triton step (one token: __call__; more: speculative
# verification, TritonStep.verify, and MTP drafting, TritonStep.draft, whose GEMV tiles shrink with the tokens)
MAX_VERIFY_TOKENS = 8


def kv_bucket(kv_len: int, size: int) -> int:
    """Smallest power of two >= max(kv_len, 256), capped at the cache size."""
    b = 256
    while b < kv_len:
        b *= 2
    return min(b, size)


def graph_bucket(kv_len: int, size: int, rows: int) -> int:
    """The cache length a graphed step of `rows` rows is keyed and sliced by: kv_bucket's, or the whole cache where
    options().cache_attention is "triton" and rows > 1 (its kernel reads each row's keys only up to its own
    position: one graph per batch size; one row keeps the buckets, which size the batch-1 Triton step's reads)."""
    return size if rows > 1 and options().cache_attention == "triton" else kv_bucket(kv_len, size)


FIRST_GRAPH = 4  # steps in the first graph of a run (see graph_steps)


def graph_steps(n: int, cap: int) -> list[int]:
    """The steps of each graph in a run of n graphed greedy steps: FIRST_GRAPH, then twice the one before, up to
    cap. A run starts with nothing queued on the GPU (after the prefill, or after the host read the previous run),
    and a graph's launch takes host time that grows with its steps (2.7 ms for 32 steps of the mini preset under
    the profiler, on the H100): the GPU waits only for the short first launch, and each graph runs long enough to
    hide the launch of the next."""
    sizes, m = [], FIRST_GRAPH
    while n > 0:
        sizes.append(min(m, cap, n))
        n -= sizes[-1]
        m *= 2
    return sizes


class GraphRunner(Runner):
    """Runner whose decode-shaped calls replay CUDA graphs (optionally of torch.compile'd code).
    On CPU it only compiles (no graphs), which lets tests trace the same code.

    Graphs are captured on first use of a shape; inputs are copied into static tensors, and the outputs
    are static tensors that the next replay overwrites (callers consume them at once). Capturing runs the
    step a few times first: cache writes are idempotent (same tokens, same slots), so this is harmless.

    options().decode_tune: one-row main steps compile with inductor's coordinate-descent tuning of block
    sizes (GEMV-like reductions); default (off: on an H100 it made the decode-attention kernel 3.5x
    slower and the batch-1 step no faster, 730 vs 717 us). If tracing or capturing with it fails, the step
    falls back to the plain path and says so in `notes`.
    options().decode_triton: one-token steps of a single sequence, and its verification forwards and MTP
    drafting layers of up to MAX_VERIFY_TOKENS tokens (speculative decoding), run the Triton kernels of
    generation/triton_step.py instead (76 kernels per one-token step instead of 207 on the mini preset): "auto" where
    triton imports and the cache is on CUDA, "always" also on CPU (Triton's interpreter, tests), "off".
    Both are read when the runner is built.
    `run_step` captures a whole caller-defined step (speculative decoding: drafts + verification + accept)
    whose model calls run inline (compiled, no nested graphs) inside one graph.
    max_graph_tokens: main() calls of more new tokens per row run eagerly (prefill); pool: a memory pool that other
    runners' graphs share (torch.cuda.graph_pool_handle(); default: this runner's own).
    """

    def __init__(self, model, cache: KVCache, max_length: int, compile: bool = False,
                 max_graph_tokens: int = 16, pool=None) -> None:
        super().__init__(model, cache, max_length)
        self.compile = compile
        self.max_graph_tokens = max_graph_tokens
        self.tune = options().decode_tune
        mode = options().decode_triton
        if mode not in ("auto", "always", "off"):
            raise ValueError(f"option decode_triton must be 'auto', 'always' or 'off', got {mode!r}")
        triton = mode == "always" or (mode == "auto" and cache.device.type == "cuda"
                                      and importlib.util.find_spec("triton") is not None)
        from .triton_step import unsupported
        self.triton = triton and cache.B == 1 and unsupported(model, cache) is None
        self.graphs: dict = {}
        self.fns: dict = {}  # key -> (compiled) step function
        self.pool = pool  # the graphs' memory pool (None: the first capture's; runners may share one)
        self.capture_seconds = 0.0
        self._inline = False
        self._triton_step = None
        # (until TritonStep.verify fails once: the one-token step is kept then)
        self.triton_verify = options().decode_triton_verify
        self.triton_draft = True  # (until TritonStep.draft fails once)

    def graphs_for(self, path: str) -> bool:
        return path not in self.failed

    def _tracing(self, rows: int):
        """The options a step is traced / captured with: the ops' decode backends (no sort, no host sync, so
        CUDA-graph safe); compiled one-row steps compute their products as fp32 reductions."""
        return override(router="decode" if self.compile else options().router, experts="decode",
                        linear="reduction" if self.compile and rows == 1 else options().linear)

    def _fn(self, key, fn, tune: bool):
        if key not in self.fns:
            self.builds += 1
            f = fn
            if self.compile:
                opts = {"coordinate_descent_tuning": True} if tune else None
                f = compile_scoped(fn, fullgraph=True, dynamic=False, options=opts)
            self.fns[key] = f
        return self.fns[key]

    def glue(self, key, fn):
        return self._fn(("glue", *key), fn, False) if self.compile else fn

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
            except Exception as e:  # tuning failed: fall back to the plain compile and say so
                self.graphs.pop(key, None)
                self.fns.pop(key, None)
                if not tune:
                    raise
                self.tune = False
                self._note(f"{key}: coordinate-descent tuning failed ({type(e).__name__}: {str(e)[:200]}); "
                           "falling back")

    def _run_once(self, key, fn, inputs: dict, rows: int, tune: bool):
        if self.cache.device.type != "cuda":  # no CUDA graphs: torch.compile only (tests the traced code on CPU)
            with self._tracing(rows):
                return self._fn(key, fn, tune)(**inputs)
        return self._replay(key, lambda: self._fn(key, fn, tune), inputs, rows)

    def run_step(self, key, fn, inputs: dict, rows: int = 2, rng: torch.Generator | None = None):
        """Run fn(**inputs) -> outputs as one CUDA graph (on CPU: directly), its model calls inline.
        fn must be idempotent for the same inputs and cache state (warm-up runs it several times), apart from its
        random draws: rng, the generator it samples from other than the default one (the runner's own, generator()),
        is registered with the graph, whose every replay then draws what fn run eagerly at that point would."""
        self._inline = True
        try:
            if self.cache.device.type != "cuda":
                with self._tracing(rows):
                    return fn(**inputs)
            return self._replay(key, lambda: fn, inputs, rows, rng)
        finally:
            self._inline = False

    def _replay(self, key, make_fn, inputs: dict, rows: int, rng: torch.Generator | None = None):
        """Capture make_fn()(**inputs) as a CUDA graph once per key (3 warm-up runs on a side stream;
        the graphs share one memory pool), then copy the inputs into its static buffers and replay it.
        Random draws: the warm-up runs' draws are undone (the generators' offsets restored), so the first replay
        draws what the step run eagerly would; the default generator, and rng if given, are the graph's (each replay
        reads their seed and offset, and advances them by the graph's draws).

        The outputs are valid until this runner replays any graph again, not only this one: graphs share the
        pool and replay in any order, so a graph captured later may hold its outputs in memory that one captured
        earlier used as scratch (or in tensors its capture left on a Python object and that were freed since),
        and the earlier graph's replay writes there. A caller that keeps an output past another replay copies it
        first (inputs are copied in before each replay: an output may be the next graph's input)."""
        if key not in self.graphs:
            self.builds += 1
            t0 = time.perf_counter()
            static = {n: t.clone() for n, t in inputs.items()}
            f = make_fn()
            gens = [torch.cuda.default_generators[self.cache.device.index or torch.cuda.current_device()]]
            gens += [rng] if rng is not None else []
            offsets = [gen.get_offset() for gen in gens]
            with self._tracing(rows):
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(3):
                        f(**static)
                torch.cuda.current_stream().wait_stream(s)
                for gen, offset in zip(gens, offsets, strict=True):
                    gen.set_offset(offset)
                g = torch.cuda.CUDAGraph()
                if rng is not None:
                    g.register_generator_state(rng)
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
        bucket = graph_bucket(kv_len, self.cache.S, B)
        if self.triton and B == 1 and (T == 1 or (T <= MAX_VERIFY_TOKENS and self.triton_verify)) and valid is None:
            out = self._main_triton(ids, pos, kv_len, bucket)
            if out is not None:
                lg, h = out
                return None if logits == "none" else lg[:, -1:] if logits == "last" else lg, h
        if valid is None and B > 1 and T > 1:  # verifications with and without frozen rows: one compiled function
            valid = torch.ones(B, T, dtype=torch.bool, device=ids.device)  # and graph (plain steps keep None)
        key = ("main", B, T, bucket, valid is None, logits)
        inputs = dict(ids=ids, pos=pos)
        if valid is not None:
            inputs["valid"] = valid

        def fn(ids, pos, valid=None):  # (the clamp inside: one kernel less in a step)
            return self._main(ids, pos.clamp_min(0), valid, bucket, logits)

        return self._run(key, fn, inputs)

    def greedy_next(self, ids, pos, kv_len: int, out: torch.Tensor, hidden: torch.Tensor | None = None):
        """ids, pos [B, 1] -> the greedy next token of each row (argmax of the logits, first index on ties)
        written to out [B]; the Triton step writes it from inside its lm_head kernel. Returns the hidden state
        after model.norm [B, 1, D] (a buffer the next step may overwrite), or writes it into hidden [B, D] (the
        Triton step from its lm_head kernel: no copy between steps)."""
        if self.triton and ids.numel() == 1:
            res = self._main_triton(ids, pos, kv_len, kv_bucket(kv_len, self.cache.S), out, hidden)
            if res is not None:
                return res[1]
        logits, h = self.main(ids, pos, None, kv_len, logits="last", graph=True)
        out.copy_(logits[:, -1].argmax(-1))
        if hidden is not None:
            hidden.copy_(h[:, 0])
        return h

    def _step(self):
        if self._triton_step is None:
            from .triton_step import TritonStep
            self._triton_step = TritonStep(self.model, self.cache, self.rope_tables)
        return self._triton_step

    def _mtp_triton(self, k: int, ids, h_prev, pos, valid):
        """MTP layer k over T <= MAX_VERIFY_TOKENS columns of the one sequence through TritonStep.draft, one graph
        per (k, T, mask or not) outside a whole-step capture; None if it failed (the runner then drafts through
        the compiled path and says so in `notes`)."""
        T = ids.shape[1]
        key = ("mtp-triton", k, T, valid is None)
        try:
            step = self._step()
            if self._inline or self.cache.device.type != "cuda":
                return step.draft(k, ids, h_prev, pos, valid)
            inputs = dict(ids=ids, h_prev=h_prev, pos=pos)
            if valid is not None:
                inputs["valid"] = valid

            def fn(ids, h_prev, pos, valid=None):
                return step.draft(k, ids, h_prev, pos, valid)

            return self._replay(key, lambda: fn, inputs, 1)
        except Exception as e:  # also inside a whole-step capture's warm-up runs
            self.graphs.pop(key, None)
            self.triton_draft = False
            self._note(f"{key}: Triton MTP drafting failed ({type(e).__name__}: {str(e)[:200]}); falling back")
            return None

    def _main_triton(self, ids, pos, kv_len: int, bucket: int, token: torch.Tensor | None = None,
                     hidden: torch.Tensor | None = None):
        """The one-token step through TritonStep, or T <= MAX_VERIFY_TOKENS consecutive tokens through its
        verify() (speculative verification), one graph per (bucket, T); None if it failed (the runner then keeps
        the compiled path and says so in `notes`). token [1]: where the greedy token goes (one token); hidden [1, D]:
        where its hidden state goes (one token, inside a capture)."""
        if kv_len > self.cache.S:
            raise ValueError(f"position {kv_len - 1} does not fit in a KV cache of max_length {self.cache.S}")
        T = ids.shape[1]
        key = ("main-triton", bucket) if T == 1 else ("main-triton", bucket, T)
        try:
            step = self._step()
            run = step if T == 1 else (lambda ids, pos, bucket, token=None: step.verify(ids, pos, bucket))
            if self._inline or self.cache.device.type != "cuda":
                return run(ids, pos, bucket, token) if hidden is None else step(ids, pos, bucket, token, hidden)
            if hidden is not None:
                raise ValueError("a hidden-state output is for steps inside a capture")

            def fn(ids, pos):
                return run(ids, pos, bucket)

            out = self._replay(key, lambda: fn, dict(ids=ids, pos=pos), 1)  # one row: no negative position
            if token is not None:
                token.copy_(step.token)
            return out
        except Exception as e:  # also inside a whole-step capture's warm-up runs: the step then uses main's path
            self.graphs.pop(key, None)
            if T == 1:
                self.triton = False
            else:
                self.triton_verify = False
            self._note(f"{key}: Triton {'decode step' if T == 1 else 'verification'} failed ({type(e).__name__}: "
                       f"{str(e)[:200]}); falling back")
            return None

    def mtp(self, k: int, ids, h_prev, pos, valid, graph: bool = False):
        B, T = ids.shape
        if not graph or T > self.max_graph_tokens:
            return super().mtp(k, ids, h_prev, pos, valid)
        if self.triton and self.triton_draft and B == 1 and T <= MAX_VERIFY_TOKENS:
            out = self._mtp_triton(k, ids, h_prev, pos.clamp_min(0), valid)
            if out is not None:
                return out
        key = ("mtp", k, B, T, valid is None)
        inputs = dict(ids=ids, h_prev=h_prev, pos=pos)
        if valid is not None:
            inputs["valid"] = valid

        def fn(ids, h_prev, pos, valid=None):
            return self._mtp(k, ids, h_prev, pos.clamp_min(0), valid)

        return self._run(key, fn, inputs)
