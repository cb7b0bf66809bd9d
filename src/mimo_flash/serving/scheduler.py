"""Continuous batching: a fixed number of slots, each a row of one KVCache, stepped by one thread.
(A slot's own state and what each token makes of it
(text, stop, logprobs) is serving/slots.py; how a step's rows choose their tokens, generation/sampling.py
(choose_rows); what a request is and what it gets back, serving/requests.py; how prompt chunks are grouped into
forwards and run, serving/prefill.py; the decode steps themselves (plain, overlapped, speculative), serving/decode.py,
whose methods the scheduler inherits.)

Every step (Scheduler.step):
  1. requests cancelled by their client leave (their slot is free at once);
  2. waiting requests take free slots (with a prefix-cache hit, their slot starts from the cached prefix),
     every step, or (admit_wait > 0) in groups: see Scheduler._admit_now;
  3. prompt prefill: one chunk for each slot still prefilling (oldest first, up to `prefill_tokens` tokens
     in all); a chunk ends at the next multiple of `prefill_chunk` positions, so a long prompt holds the
     running streams for one chunk per step at most. Slots whose chunks have the same length (and the
     same logits need) run in ONE forward over a row view of the cache (KVCache.rows) covering them, the
     view's other rows invalid (their cache untouched): a step costs one prefill forward per distinct chunk
     length, not one per slot (on GPU a forward costs ~20 ms of host time whatever its size; graph_prefill
     replays CUDA graphs of them instead, chunks padded to a few lengths: serving/prefill.py);
  4. one decode step for every slot that is generating: one forward over rows [0, n) of the cache, n the
     power of two above the highest busy slot (slots are taken lowest first; rows that are not generating
     are masked: valid=False leaves their cache untouched), through a GraphRunner over that row view (a
     CUDA graph per batch size and cache bucket on GPU; eager on CPU), then each row's own sampling, all rows
     at once on the device (sampling.choose_rows: one host sync per step, sampled rows or not).
     overlap=True (default): while no decoding row asks for logprobs, a repetition penalty (its seen tokens would lag a
     step) or speculation, the step is launched before the previous one's tokens are taken: its inputs are those tokens
     as the previous step left them on the device, and the host emits them (detokenizing, stop strings, events) while
     the GPU computes the next step. A row whose previous token could end it by length is not launched ahead; one that a
     stop string or EOS ends computes one token for nothing, dropped (its slot is reset at the next admission, in stream
     order after that step);
  5. with speculative_k=K > 0: one MTP-speculative step for every decoding slot (greedy or sampled, each row
     with its own parameters, generator and repetition penalty; logprobs from the verification logits:
     serving/speculate.py), which step 4 then leaves out: K drafts each, one verification forward over rows
     [0, n) (the other rows frozen: masked, their cache untouched), 1 .. K + 1 tokens per row, each through the
     same output path.
     speculative_k="auto": k = 0 .. K drafts, chosen before each step (rank 0's choice on every rank);
     at k = 0 those slots take step 4 with the others.
A row's arithmetic does not depend on the other rows, so greedy output is what the request gives alone
(with speculation too: verification accepts exactly the tokens greedy decoding would choose), and a seeded
sampled request's output is what it gives alone (with speculation: what it gives alone with speculation, the
same distribution as without).
What that rests on, for prefill: a slot's chunk is [c0, c1) with c1 the next multiple of prefill_chunk
(or the prompt's end) whatever its neighbours, and a batched prefill only groups chunks of the same
length T, so each row is never padded and takes the same attention path (ring write or concat, chosen by
T) as alone; rows meet only as more rows of the same GEMMs and a larger kv_len bound whose extra keys
are masked out, exactly as in a batched decode step. On CPU in fp32 that gives identical per-row results
(tests/test_serving_scheduler.py); on GPU the batch size can pick other GEMM kernels, so exact equality is
claimed (and tested) in fp32 only, as for the decode step.

Requests (serving/requests.py) carry a `sink` that receives Events (from the scheduler thread: it must not block).

A tensor / expert parallel model (distributed/inference.py) runs one replica of this scheduler per rank:
rank 0's serves, and before each step sends the step's inputs (the requests that arrived, with a seed
each, the cancellations, and whether this step admits) through its `broadcaster` (distributed/steps.py);
every other rank applies them to its replica and steps it (`follow_step`), so all ranks run the same
forwards (admission timing is decided on rank 0 only). While idle, rank 0 steps every HEARTBEAT seconds
anyway, so that the others' wait never reaches the collectives' timeout.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque

import torch

from ..generation.cache import KVCache
from ..generation.engine import AUTO_MAX_K
from ..generation.runner import GraphRunner, Runner, graph_bucket
from ..generation.sampling import choose_rows
from .metrics import Metrics
from .prefix import PrefixCache
from .decode import DecodeSteps, _Inflight
from .prefill import PrefillForwards
from .requests import Event, QueueFull, Request, check_size
from .slots import Slot
from .speculate import SpecSlots


class Scheduler(DecodeSteps):
    """Continuous batching over `max_slots` rows. max_context: longest prompt + output (the cache length,
    default the model's max_position_embeddings); max_queue: requests waiting for a slot before submit()
    refuses; prefill_chunk: the prompt chunk (at most one per slot and step; also the prefix cache's block);
    prefill_tokens: prompt tokens prefilled per step over all slots (default max(4096, prefill_chunk));
    prefix_blocks: blocks the prefix cache keeps (0: no prefix caching); admit_wait: 0 admits waiting
    requests at every step; > 0 (seconds), while slots are decoding, admits them in groups (_admit_now);
    cuda_graphs / compile: as generate()'s. speculative_k: K > 0 decodes every request (greedy or sampled,
    logprobs and repetition penalty included) with K MTP drafts per step (serving/speculate.py; at most the model's
    MTP layers); their prompts reuse prefix-cache blocks only up to K * sliding_window positions before
    their end (the MTP layers are primed from the main model's hidden states there). "auto": adaptive K,
    0 .. min(3, the MTP layers) drafts per step, whichever gives the most tokens per second (never slower
    than plain decoding once it has measured both). overlap: decode steps launched one ahead of the
    host's output work (the module docstring's step 4; not for a tensor / expert parallel model). graph_prefill
    (with graphs: CUDA, or cuda_graphs=True): prefill forwards without prompt logprobs replay CUDA graphs of eager
    code, a chunk of T tokens left-padded (masked) to the next power of two >= 16 (at most prefill_chunk), one
    graph per (row block, padded length, cache bucket, logits kept) captured on first use, all in one memory pool:
    an eager forward costs tens of ms of host time on a GPU whatever its size. The padding changes which
    attention path a chunk takes (ring write or concat), so a prompt's arithmetic matches its own alone up to
    rounding, not bit for bit."""

    def __init__(self, model, tokenizer, max_slots: int = 8, max_context: int | None = None, max_queue: int = 256,
                 prefill_chunk: int = 256, prefix_blocks: int = 64, cuda_graphs="auto", compile: bool = False,
                 prefill_tokens: int | None = None, admit_wait: float = 0.0, speculative_k: int | str = 0,
                 overlap: bool = True, graph_prefill: bool = False):
        config = model.config
        limit = config.max_position_embeddings
        S = limit if max_context is None else max_context
        if not 1 <= S <= limit:
            raise ValueError(f"max_context must be in [1, {limit}] (max_position_embeddings), got {S}")
        if max_slots < 1 or max_queue < 0 or prefill_chunk < 1 or prefix_blocks < 0:
            raise ValueError("max_slots and prefill_chunk must be >= 1, max_queue and prefix_blocks >= 0")
        prefill_tokens = max(4096, prefill_chunk) if prefill_tokens is None else prefill_tokens
        if prefill_tokens < prefill_chunk:
            raise ValueError(f"prefill_tokens ({prefill_tokens}) must be >= prefill_chunk ({prefill_chunk})")
        if not admit_wait >= 0:  # (also refuses NaN)
            raise ValueError(f"admit_wait must be >= 0 seconds, got {admit_wait}")
        self.model, self.tok, self.S, self.B = model, tokenizer, S, max_slots
        self.max_queue, self.chunk = max_queue, prefill_chunk
        self.prefill_tokens, self.admit_wait = prefill_tokens, admit_wait
        self.device = model.device
        # one token per step and graph warm-ups that repeat a step from the same state need no ring slack;
        # speculation: the MTP layers' rings, slack 2K (speculative.py) and K positions past the context
        # (verification runs K drafts past the last token)
        auto = speculative_k == "auto"
        if auto:
            if not config.num_nextn_predict_layers:
                raise ValueError("speculative_k='auto' drafts with the MTP layers, and the model has none")
            speculative_k = min(AUTO_MAX_K, config.num_nextn_predict_layers)
        self.spec = SpecSlots(model, speculative_k, max_slots, adaptive=auto) if speculative_k else None
        K = speculative_k if self.spec is not None else 0
        self.cache = KVCache(model.kv_config, max_slots, S + K, device=self.device, dtype=model.dtype, num_mtp=K,
                             slack=2 * K)
        cuda = self.device.type == "cuda"
        # (as generate(): cuda_graphs=True on a CPU runs the graph-shaped steps directly, the code CUDA captures)
        self.graphs = (cuda and cuda_graphs == "auto") or cuda_graphs is True or compile
        self.compile = compile
        self.runners: dict[int, Runner] = {}  # decode runners over rows [0, n), n a power of two (or B)
        self.prefill = PrefillForwards(model, self.cache, prefill_chunk, prefill_tokens, graph_prefill and self.graphs)
        self.row_views = [self.cache.rows(i) for i in range(max_slots)]  # slot i's row (prefix cache, reset)
        self.prefix = PrefixCache(self.cache, prefill_chunk, prefix_blocks) if prefix_blocks else None
        self.slots: list[Slot | None] = [None] * max_slots
        self.waiting: deque[Request] = deque()
        self.metrics = Metrics()
        self._generated = 0  # tokens emitted this step: added to metrics once per step (one lock, not per token)
        self.cv = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.steps = 0
        self.decode_forwards = 0  # decode forwards run (plain and speculative: one each per step at most)
        self._admitted = 0
        # a parallel model's rank 0: a distributed.steps.StepBroadcaster (serving/commands.py sets it)
        self.broadcaster = None
        self._sent = 0
        # (every rank of a parallel model must launch the same forwards: no look-ahead there)
        self.overlap = overlap and getattr(model, "parallel", None) is None
        self._inflight: _Inflight | None = None  # a launched decode step whose tokens are not taken yet
        self._ahead_tok = torch.zeros(max_slots, dtype=torch.long, device=self.device)  # its tokens, per row
        self.ahead_rows = 0  # rows launched ahead of their previous token (overlap)
        self.ahead_dropped = 0  # rows whose token in flight was dropped (their request had ended)

    # ------------------------------------------------------------------ front
    def check(self, prompt_len: int, max_tokens: int) -> None:
        """Raise ValueError if a request of this size cannot run here."""
        check_size(prompt_len, max_tokens, self.S)

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def metrics_text(self) -> str:
        """/metrics: the Prometheus text of the counters and histograms, with the queue's length now."""
        return self.metrics.text(len(self.waiting), self.running())

    async def asubmit(self, req: Request) -> None:
        """submit() for the HTTP side's event loop (serving/remote.py's RemoteScheduler has the same)."""
        self.submit(req)

    def submit(self, req: Request) -> None:
        self.check(len(req.prompt), req.max_tokens)
        vocab = self.model.config.vocab_size
        if min(req.prompt) < 0 or max(req.prompt) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        req.submitted = time.perf_counter()
        with self.cv:
            if len(self.waiting) >= self.max_queue:
                self.metrics.rejected += 1
                raise QueueFull(f"the server is at capacity: {self.running()} requests running and "
                                f"{len(self.waiting)} waiting (limit {self.max_queue}); retry later")
            self.waiting.append(req)
            self.cv.notify()

    def running(self) -> int:
        return sum(s is not None for s in self.slots)

    def start(self) -> "Scheduler":
        self.thread = threading.Thread(target=self._loop, name="mimo-flash-scheduler", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify()
        if self.thread is not None:
            self.thread.join()

    def _loop(self) -> None:
        while True:
            with self.cv:
                while not self.stopping and not self.waiting and not self.running():
                    if not self.cv.wait(self.HEARTBEAT if self.broadcaster is not None else None):
                        break  # idle: an empty step, the other ranks' heartbeat
                if self.stopping:
                    return
            try:
                with torch.no_grad():
                    self.step()
            except Exception as e:  # a failed forward: end what was running, keep serving
                msg = f"{type(e).__name__}: {e}"
                self._inflight = None
                for s in self.slots:
                    if s is not None:
                        self._finish(s, "error", error=msg)
                self.cache.reset()

    # ------------------------------------------------------------------ step
    HEARTBEAT = 60.0

    def _step_inputs(self) -> tuple[list[tuple], list[int]]:
        """Rank 0: the requests that arrived since the last step (numbered, seeded) and the numbers of those
        cancelled, for the other ranks' replicas."""
        new, cancelled = [], []
        with self.cv:
            for r in self.waiting:
                if r.rid < 0:
                    r.rid, self._sent = self._sent, self._sent + 1
                    if r.seed is None:  # every rank must draw the same samples
                        r.seed = random.randrange(2 ** 31)
                    new.append((r.rid, r.prompt, r.max_tokens, r.params, r.seed, r.stop, r.eos, r.logprobs,
                                r.prompt_logprobs))
            reqs = list(self.waiting) + [s.req for s in self.slots if s is not None]
            cancelled = [r.rid for r in reqs if r.cancelled and r.rid >= 0]
        return new, cancelled

    @torch.no_grad()
    def follow_step(self, new: list[tuple], cancelled: list[int], admit: bool = True,
                    spec_k: int | None = None) -> None:
        """Another rank: apply rank 0's step inputs to this replica, then step it (admitting if rank 0 does,
        with rank 0's speculative drafts)."""
        for rid, prompt, max_tokens, params, seed, stop, eos, logprobs, prompt_logprobs in new:
            self.waiting.append(Request(prompt, max_tokens, params, seed, stop, eos, logprobs, prompt_logprobs,
                                        rid=rid, submitted=time.perf_counter()))
        gone = set(cancelled)
        for r in list(self.waiting) + [s.req for s in self.slots if s is not None]:
            if r.rid in gone:
                r.cancel()
        self._step(admit, spec_k)

    @torch.no_grad()
    def step(self) -> None:
        admit = self._admit_now()
        k = self._spec_choice()
        if self.broadcaster is not None:
            self.broadcaster.announce(*self._step_inputs(), admit, k)
        self._step(admit, k)

    def _step(self, admit: bool, spec_k: int | None = None) -> None:
        self.steps += 1
        t = [time.perf_counter()]
        self._reap()
        if admit:
            self._admit()
        t.append(time.perf_counter())
        self._prefill()
        k = spec_k if spec_k is not None else (self.spec.K if self.spec is not None else 0)
        t.append(time.perf_counter())
        built = self._builds()
        self._decode(with_spec=k == 0)
        if k:
            self._speculate(k)
        t.append(time.perf_counter())
        if self.spec is not None:
            self.spec.timed(t[3] - t[2], built=self._builds() != built)
        self._count()
        m = self.metrics
        with m.lock:
            for phase, a, b in (("admit", 0, 1), ("prefill", 1, 2), ("decode", 2, 3)):
                m.phase_seconds[phase] += t[b] - t[a]
            m.forwards["prefill"], m.forwards["decode"] = self.prefill.count, self.decode_forwards

    def _spec_choice(self) -> int | None:
        """The drafts of this step's speculating slots (None: no speculation), chosen from the slots decoding
        before it (slots that join during the step take the same k)."""
        if self.spec is None:
            return None
        busy = [s for s in self.slots if s is not None and s.decoding]
        n = self._bucket(max(s.i for s in busy) + 1) if busy else 1
        return self.spec.choose(n) if any(s.spec for s in busy) else self.spec.current(n)

    def _count(self) -> None:
        """Add the tokens emitted since the last call to the metrics (once per step, and before a final event
        so that a client that saw its request end sees its tokens counted)."""
        if self._generated:
            with self.metrics.lock:
                self.metrics.generation_tokens += self._generated
            self._generated = 0

    def _admit_now(self) -> bool:
        """Whether this step admits waiting requests. admit_wait 0: always. Otherwise a prefill forward
        (tens of ms of host time on GPU) would delay every decode step while requests trickle in one by one,
        so while slots are decoding, waiting requests are admitted together once the oldest has waited
        admit_wait seconds or they fill every free slot; with nothing decoding, at once. A request's TTFT
        grows by admit_wait at most."""
        if self.admit_wait <= 0:
            return True
        with self.cv:
            if not self.waiting:
                return False
            n, oldest = len(self.waiting), self.waiting[0].submitted
        busy = [s for s in self.slots if s is not None]
        return (not any(s.decoding for s in busy) or n >= self.B - len(busy)
                or time.perf_counter() - oldest >= self.admit_wait)

    def _reap(self) -> None:
        with self.cv:
            gone = [r for r in self.waiting if r.cancelled]
            for r in gone:
                self.waiting.remove(r)
        for r in gone:
            self.metrics.finished("cancelled")
            r.sink(Event([], "", finish="cancelled"))
        for s in self.slots:
            if s is not None and s.req.cancelled:
                self._finish(s, "cancelled")

    def _admit(self) -> None:
        for i in range(self.B):
            if self.slots[i] is not None:
                continue
            with self.cv:
                if not self.waiting or (self.broadcaster is not None and self.waiting[0].rid < 0):
                    return  # (arrived after this step's inputs were sent: the next step takes it)
                req = self.waiting.popleft()
            s = Slot(i, req, self.row_views[i], self.tok, self.device, self.model.config.vocab_size)
            s.order = self._admitted
            self._admitted += 1
            s.spec = self.spec is not None
            entries = []
            if self.prefix is not None and not req.prompt_logprobs:  # >= 1 token left for logits (speculation:
                keep = self.spec.tail if s.spec else 1  # the tail whose hidden states prime the MTP layers)
                entries = self.prefix.lookup(req.prompt, len(req.prompt) - keep)
            if self.prefix is not None:
                s.done = s.cached = self.prefix.restore(s.row, entries)
            else:
                s.row.reset()
            self.slots[i] = s
            with self.metrics.lock:
                self.metrics.prompt_tokens += len(req.prompt)
                self.metrics.cached_prompt_tokens += s.cached

    def _prefill(self) -> None:
        """One chunk for each prefilling slot, oldest first, within the step's prefill_tokens; chunks of the
        same length (and logits need) in one forward (see the module docstring for why that is exact)."""
        budget = self.prefill_tokens
        groups: dict[tuple[int, bool], list[tuple[Slot, int, int]]] = {}
        for s in sorted((s for s in self.slots if s is not None and not s.decoding), key=lambda s: s.order):
            c0 = s.done
            # always the aligned chunk (so a prompt's arithmetic never depends on its neighbours); the first
            # slot of a step always fits, later ones only if the step's budget still has room
            c1 = min(len(s.req.prompt), (c0 // self.chunk + 1) * self.chunk)
            if c1 - c0 > budget:
                break
            budget -= c1 - c0
            groups.setdefault((c1 - c0, s.prompt_lp is not None), []).append((s, c0, c1))
        for (T, all_logits), group in groups.items():
            for part in self.prefill.split(T, sorted(group, key=lambda g: g[0].i)):
                self._prefill_group(all_logits, part)

    def _prefill_group(self, all_logits: bool, group: list[tuple[Slot, int, int]]) -> None:
        """One forward for the chunks [c0, c1) (all of one length) of the slots in `group` (serving/prefill.py)."""
        finishing = any(c1 == len(s.req.prompt) for s, _, c1 in group)
        a, logits, h = self.prefill.forward([(s.i, s.req.prompt[c0:c1], c0) for s, c0, c1 in group], all_logits,
                                            finishing)
        first = None
        if finishing:  # the first tokens of the prompts that end here, sampled or not: one host sync
            rows = [None] * logits.shape[0]
            for s, _, c1 in group:
                if c1 == len(s.req.prompt):
                    rows[s.i - a] = s.sampling
            first = choose_rows(logits[:, -1], rows).tolist()
        for s, c0, c1 in group:
            r = s.i - a
            P = len(s.req.prompt)
            s.done = c1
            if s.spec:
                self.spec.record_prompt(s.i, s.req.prompt, c0, h[r])
            if s.prompt_lp is not None:
                s.add_prompt_logprobs(logits[r], c0, c1)
            if self.prefix is not None and c1 % self.chunk == 0:
                self.prefix.store(s.row, s.req.prompt[:c1])
            if c1 < P:
                continue
            if s.req.max_tokens == 0:
                self._finish(s, "length")
                continue
            s.decoding = True
            s.pos = P
            self._take(s, None if s.req.logprobs is None else logits[r, -1], first[r])
            if s.spec and self.slots[s.i] is s:  # it speculates from the next step on (which primes its MTP layers)
                self.spec.join(s.i, P, s.last)

    @torch.no_grad()
    def warmup(self) -> float:
        """Before serving: run the decode step of every batch size and cache bucket once (on GPU this captures
        their CUDA graphs, so no request waits for a capture). Rows are reset at admission, so what these
        steps write is never read. With speculation, also its step, every row frozen (which writes nothing);
        with graph_prefill, the prefill forward of every row block and padded length, every row masked.
        Returns the seconds it took."""
        t0 = time.perf_counter()
        spec_ks = [] if self.spec is None else range(1, self.spec.K + 1) if self.spec.adaptive else [self.spec.K]
        lengths = [min(256 << i, self.S) for i in range(max(1, (self.S - 1) // 256).bit_length() + 1)]
        for n in sorted({self._bucket(k) for k in range(1, self.B + 1)}):
            ids = torch.zeros(n, 1, dtype=torch.long, device=self.device)
            for kv in sorted({graph_bucket(x, self.S, n) for x in lengths}):  # (the graphs' cache buckets)
                valid = None if n == 1 else torch.zeros(n, 1, dtype=torch.bool, device=self.device)
                self._runner(n).main(ids, ids, valid, kv, logits="last", graph=True)
                for k in spec_ks:
                    self.spec.step(self._runner(n), [], max(kv - self.spec.K - 1, 0), k)
        self.prefill.warmup(lengths)
        self.cache.reset()
        return time.perf_counter() - t0

    def _bucket(self, rows: int) -> int:
        n = 1
        while n < rows:
            n *= 2
        return min(n, self.B)

    def _builds(self) -> int:
        """Graphs captured and steps compiled by the decode runners so far."""
        return sum(r.builds for r in self.runners.values())

    def _runner(self, n: int) -> Runner:
        """The decode runner over rows [0, n) (a GraphRunner on CUDA: its graphs are per batch size anyway)."""
        r = self.runners.get(n)
        if r is None:
            view = self.cache if n == self.B else self.cache.rows(0, n)
            r = GraphRunner(self.model, view, self.cache.S, compile=self.compile) if self.graphs \
                else Runner(self.model, view, self.cache.S)
            self.runners[n] = r
        return r

    # ------------------------------------------------------------------ output
    def _take(self, s: Slot, logits: torch.Tensor | None, token: int) -> None:
        """Emit slot s's next token (Slot.emit), finish the request if it is done. logits [V] (the token's step): read
        for logprobs only (None when none are asked)."""
        first = s.n_out == 0
        text, lps, finish = s.emit(token, logits, self.S)
        if first:
            with self.metrics.lock:
                self.metrics.ttft.observe(s.first_at - s.req.submitted)
        self._generated += 1
        if finish is None:
            s.req.sink(Event([token], text, lps, prompt_logprobs=s.take_prompt_logprobs()))
        else:
            self._finish(s, finish, token=token, text=text, lps=lps)

    def _finish(self, s: Slot, reason: str, token: int | None = None, text: str = "", lps=None,
                error: str | None = None) -> None:
        self.slots[s.i] = None
        self._count()
        if reason in ("stop", "length"):
            text += s.detok.finish()
        if s.n_out > 1:
            with self.metrics.lock:
                self.metrics.tpot.observe((time.perf_counter() - s.first_at) / (s.n_out - 1))
        self.metrics.finished(reason)
        s.req.sink(Event([] if token is None else [token], text, lps, finish=reason, error=error,
                         prompt_logprobs=s.take_prompt_logprobs(), prompt_tokens=len(s.req.prompt),
                         completion_tokens=s.n_out, cached_tokens=s.cached))
