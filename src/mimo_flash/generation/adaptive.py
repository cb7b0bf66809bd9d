"""Adaptive K: MTP speculative decoding that chooses its drafts per step so that it never loses to plain decoding.

The controller (`AdaptiveK`) keeps, per draft position j = 1 .. K, the running rate at which draft j is
accepted given that drafts 1 .. j-1 were (an exponential moving average over the batch's active rows), and the
cost of a step with k drafts (k = 0: a plain step), measured by the decode loop itself as wall-clock seconds
between its host syncs (on CUDA: the replays of its graphs; a stretch during which the runner captured a graph or
compiled a step is not timed) or passed in. A step with k drafts emits, per row,

    E[tokens | k] = 1 + sum_{j <= k} prod_{i <= j} alpha_i

tokens, so the controller picks argmax_k E[tokens | k] / cost(k), and changes k only when the new choice
promises `margin` more tokens per second than the current one. Unmeasured costs are interpolated linearly in k
between measured ones; without given costs the loop first measures k = K and k = 0 (`explore` timed steps of
each). While k < K the later positions' rates are not observed; every `probe_every` decisions one decision (a step,
or a graphed chunk of steps) runs at k + 1 to refresh the next one (a probe re-primes the MTP layers, so it is
rare). While k > 0 with measured costs, probes alternate with plain steps (k = 0) that refresh
the plain step's cost, which otherwise is never measured again after the start.

`adaptive_decode` is the loop: k > 0 through speculative.spec_step (with st.k = k drafts; layers that fell
behind are re-primed first), k = 0 through runs of plain steps (what plain decoding runs; 8 steps, then 16, 32
and so on up to 256 while k stays 0, counted across calls: a call that starts on plain steps starts with long
runs, and a short call is one run, as plain decoding's; one host sync per run) which also record their tokens and
the hidden states the rings keep for a later re-prime: for greedy decoding on a GraphRunner each run is captured
graphs of up to PLAIN_GRAPH steps launched back to back (the first ones short: runner.graph_steps), otherwise
(sampling, an eager runner) the steps are launched one by one. Greedy steps with k > 0 on a GraphRunner run as
fixed-K decoding runs them, up to SPEC_CHUNK to a graph and one host sync, and no more steps than the most-wanting
row surely still needs (the controller decides again after each chunk, and observes each of its steps); sampled ones
one graphed step at a time (spec_step; their draws inside the graph). The first
decision of a call is made without waiting for the prefill, and not timed. Greedy output
equals plain greedy for any sequence of choices: every step emits the target model's own tokens.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .runner import GraphRunner, graph_bucket, graph_steps
from .speculative import SpecState, spec_chunk, spec_chunk_size, spec_prefill, spec_reprime, spec_step

# plain steps per decision when k = 0: the controller decides again after each run; runs in a row grow (fewer host
# syncs once plain decoding has won), and the count carries across calls (AdaptiveK.plain_run)
PLAIN_RUNS = (8, 16, 32, 64, 128, 256)
PLAIN_GRAPH = 32  # most greedy steps in one captured graph (the SWA rings' slack: engine._make_runner)


@dataclass
class AdaptiveK:
    """Chooses the drafts per step. k_max: the largest k; costs: seconds per step for k = 0 .. k_max (None:
    measured). See the module docstring."""

    k_max: int
    costs: Sequence[float] | None = None
    decay: float = 0.25  # weight of a step's acceptance in the running rates
    margin: float = 0.05  # a new k must promise this much more tokens per second than the current one
    prior: float = 0.6  # acceptance rate assumed for a position before it is observed
    explore: int = 3  # timed steps of k = k_max and k = 0 before the model decides (measured costs)
    probe_every: int = 128  # decisions at k < k_max between probes at k + 1
    samples: int = 9  # cost(k) = median over the last `samples` timed steps of k
    alpha: list[float] = field(init=False)  # per draft position: P(accepted | the drafts before it were)
    k: int = field(init=False)  # the current choice
    _times: dict = field(init=False)  # k -> seconds per step, as timed
    _medians: dict | None = field(init=False, default=None)  # k -> median of _times[k] (None: to recompute)
    _since_probe: int = field(init=False, default=0)
    _probed_down: bool = field(init=False, default=False)
    plain_run: int = field(init=False, default=0)  # plain decisions in a row, across calls (the runs' size)

    def __post_init__(self) -> None:
        if not isinstance(self.k_max, int) or self.k_max < 1:
            raise ValueError(f"AdaptiveK needs k_max >= 1, got {self.k_max!r}")
        if self.costs is not None:
            self.costs = [float(c) for c in self.costs]
            if len(self.costs) != self.k_max + 1 or not all(c > 0 for c in self.costs):
                raise ValueError(f"step_costs must hold {self.k_max + 1} positive seconds per step "
                                 f"(k = 0 .. {self.k_max}), got {self.costs!r}")
        self.alpha = [self.prior] * self.k_max
        self._times = {k: [] for k in range(self.k_max + 1)}
        self.k = self.k_max

    # --- the model
    def expected_tokens(self, k: int) -> float:
        """Tokens a row emits per step with k drafts, from the running acceptance rates."""
        e, p = 1.0, 1.0
        for j in range(k):
            p *= self.alpha[j]
            e += p
        return e

    def cost(self, k: int) -> float | None:
        """Seconds per step with k drafts: given, measured, or interpolated (None: nothing measured yet)."""
        if self.costs is not None:
            return self.costs[k]
        if self._medians is None:  # (once per new timing, not per choice: the host decides while the GPU waits)
            self._medians = {j: statistics.median(t) for j, t in self._times.items() if t}
        known = self._medians
        if k in known:
            return known[k]
        lo = max((j for j in known if j < k), default=None)
        hi = min((j for j in known if j > k), default=None)
        if lo is None or hi is None:
            return None
        return known[lo] + (known[hi] - known[lo]) * (k - lo) / (hi - lo)

    def rate(self, k: int) -> float | None:
        c = self.cost(k)
        return None if c is None else self.expected_tokens(k) / c

    # --- observations
    def observe(self, k: int, accepted: Sequence[int]) -> None:
        """accepted: drafts accepted by each active row in a step with k drafts."""
        for j in range(1, k + 1):
            reach = sum(1 for a in accepted if a >= j - 1)
            if reach:
                hit = sum(1 for a in accepted if a >= j)
                self.alpha[j - 1] += self.decay * (hit / reach - self.alpha[j - 1])

    def timed(self, k: int, seconds_per_step: float, steps: int = 1) -> None:
        """`steps` steps with k drafts took this long each (one timing of a chunk of steps counts as that many: the
        exploration and the median are over steps; callers leave out steps that built graphs or compiled code)."""
        t = self._times[k]
        self._medians = None
        t.extend([seconds_per_step] * min(steps, self.samples))
        del t[:max(0, len(t) - self.samples)]

    # --- the choice
    def choose(self) -> int:
        """The k of the next step (also self.k)."""
        if self.costs is None:
            for k in (self.k_max, 0):  # measure both ends first
                if len(self._times[k]) < self.explore:
                    self.k = k
                    return k
        up = self.k < self.k_max
        down = self.k > 0 and self.costs is None
        if up or down:
            self._since_probe += 1
            if self._since_probe >= self.probe_every:  # one step, without changing the current choice
                self._since_probe = 0
                self._probed_down = down and not (up and self._probed_down)  # (both: in turn)
                return 0 if self._probed_down else self.k + 1
        rates = {k: self.rate(k) for k in range(self.k_max + 1)}
        best = max((k for k in rates if rates[k] is not None), key=lambda k: rates[k])
        cur = rates.get(self.k)
        if best != self.k and (cur is None or rates[best] > cur * (1 + self.margin)):
            self.k, self._since_probe = best, 0
        return self.k


def _chunked(runner, params, seen, out) -> bool:
    """Whether greedy steps run as captured chunks with one host sync each (a GraphRunner, nothing read per step)."""
    return (isinstance(runner, GraphRunner) and not params.do_sample and seen is None
            and out.streamer is None and out.stopping is None)


def plain_throughout(ctl: AdaptiveK, k: int | None, out) -> bool:
    """Whether the call's first decision k is a run of plain steps that covers the whole call: then the call is plain
    decoding itself (engine.generate takes its K = 0 path: the same prefill and graphs or steps, no hidden states
    kept, no state built, nothing recorded for later steps), greedy or sampled. (Sampled runs of plain steps record
    each step in the rings: at batch 1 on an H100 they took 0.389 ms a step against plain sampling's 0.361.)"""
    return k == 0 and _run_size(ctl) >= out.max_new - 1


def adaptive_decode(runner, out, prompt: tuple, K: int, params, seen, generator, ctl: AdaptiveK, k: int | None,
                    stats, chunk: int, n_max: int, rings) -> None:
    """Decode until every row of `out` is done, choosing k per step with `ctl` (see the module docstring).
    prompt: (input_ids, mask, hidden, tok, lengths) after the prefill (hidden: the main model's hidden states, tok:
    its token, not yet in `out`; lengths [B]: prompt tokens per row, n_max their most); k: the first decision
    (ctl.choose(), made before the prefill; None when the prefill's token is all the call wants); rings: SpecRings
    for the state; stats: GenerationStats, updated.

    The first decision is not timed (the prefill's tail would count). If it is a run of plain greedy graphs, the
    run is launched before the state is built (spec_prefill: a few dozen small eager kernels, 2 ms of host time at
    batch 1 that the GPU would otherwise wait through). (A run that would end the call never gets here:
    plain_throughout.)"""
    input_ids, mask, hidden, tok, lengths = prompt
    chunks = _chunked(runner, params, seen, out)
    B = tok.shape[0]
    first = None  # the first decision's plain run, launched before the state exists: its tokens [B, n]
    if k == 0 and chunks and runner.graphs_for("greedy"):
        first = _plain_launch(runner, tok, lengths, n_max, rings, K, min(_run_size(ctl), out.max_new - 1))
    out.add(tok[:, None], torch.ones(B, dtype=torch.long, device=tok.device))
    st = spec_prefill(runner, input_ids, mask, hidden, tok, K, params, seen, generator, chunk, k=k or 0, rings=rings,
                      n_max=n_max, recorded=0 if first is None else first.shape[1])
    k_prev, n_prev = 0, 0
    if first is not None:
        k_prev, n_prev, k = 0, _after_run(runner, out, st, first, ctl, stats), None
    t_prev, built = None, runner.builds
    while True:
        if k is None:  # the loop's host sync (the previous phase has finished): done flags and tokens kept, one read
            v = torch.cat([out.done.long(), out.count]).tolist()
            done, counts = [bool(d) for d in v[:B]], v[B:]
            now = time.perf_counter()
            if t_prev is not None and n_prev and runner.builds == built:  # (the first phase is not timed)
                ctl.timed(k_prev, (now - t_prev) / n_prev, n_prev)
            t_prev, built = now, runner.builds
            if all(done):
                break
            k = ctl.choose()
        else:  # the first decision, made before anything was read: after the prefill's token every row has one
            # token and none is taken as done (a row that its first token ended steps through it, its tokens
            # dropped by `out`)
            done, counts = [False] * B, [1] * B
        wanted = max(out.max_new - c for c, d in zip(counts, done) if not d)  # the most a row still wants
        if wanted <= 0:
            break
        size = min(_run_size(ctl), wanted)
        if k == 0 and chunks and runner.graphs_for("greedy"):
            # the state's N and recent, which _after_plain reads after the run, may be a speculative graph's
            # outputs: memory that the run's graphs, sharing the runner's pool, may write (GraphRunner._replay)
            st.N, st.recent = st.N.clone(), st.recent.clone()
            new = _plain_launch(runner, st.tok, st.N, st.n_max, st.rings, K, size)
            if new is not None:
                k_prev, n_prev, k = 0, _after_run(runner, out, st, new, ctl, stats), None
                continue
        if k == 0 and not chunks:  # (sampling, or an eager runner) plain steps with one host sync, as above
            new = _plain_steps(runner, out, st, params, generator, size)
            k_prev, n_prev, k = 0, _after_run(runner, out if not out.sync else None, st, new, ctl, stats), None
            continue
        ctl.plain_run = 0
        if k > st.fresh:
            spec_reprime(runner, st, k, chunk)
        st.k = k
        frozen = out.done.clone() if any(done) else None
        n = spec_chunk_size(runner, st, params) if chunks else 1
        if n > 1:  # a chunk never steps past the batch's end
            n = min(n, -(-wanted // (k + 1)))
        steps = spec_chunk(runner, st, n, frozen) if n > 1 else None  # greedy: n steps, one graph, one host sync
        if steps is None:
            new, count, counts = spec_step(runner, st, params, generator, frozen=frozen)
            steps = new[None], count[None], [counts]
        news, count_n, counts_n = steps
        for counts in counts_n:  # (a row that finishes inside a chunk steps to its end: observed too)
            act = [c for c, d in zip(counts, done, strict=True) if not d]
            ctl.observe(k, [c - 1 for c in act])
            stats.spec_k.append(k)
            stats.verified(k, act)
        out.add_steps(news, count_n)
        k_prev, n_prev, k = k, len(counts_n), None


def controller(adaptive, K: int, step_costs) -> AdaptiveK | bool | None:
    """The AdaptiveK of a call (None: fixed K; True: the runner's, whose costs are measured)."""
    if isinstance(adaptive, AdaptiveK):
        if adaptive.k_max != K:
            raise ValueError(f"adaptive is an AdaptiveK for k_max={adaptive.k_max}, num_speculative_tokens is {K}")
        if step_costs is not None:
            raise ValueError("step_costs goes into the AdaptiveK passed as adaptive, not beside it")
        return adaptive
    if adaptive not in (True, False):
        raise ValueError(f"adaptive must be a bool or an AdaptiveK, got {adaptive!r}")
    if not adaptive or K == 0:
        if step_costs is not None and K > 0:
            raise ValueError("step_costs needs adaptive K (num_speculative_tokens='auto' or adaptive=True)")
        return None
    return True if step_costs is None else AdaptiveK(K, costs=step_costs)


def _run_size(ctl: AdaptiveK) -> int:
    return PLAIN_RUNS[min(ctl.plain_run, len(PLAIN_RUNS) - 1)]


def _after_run(runner, out, st: SpecState, new: torch.Tensor, ctl: AdaptiveK, stats) -> int:
    """Book a run of plain steps that produced new [B, n]: the state moves past it (_after_plain; its tokens to
    `out` unless None), the controller's run count and the stats. Returns n."""
    n = new.shape[1]
    _after_plain(runner, out, st, new)
    ctl.plain_run += 1
    stats.steps += n
    stats.spec_k.extend([0] * n)
    return n


def _plain_launch(runner, tok, pos, n_max: int, rings, K: int, n: int):
    """n plain greedy steps after token tok [B] at positions pos [B] as captured chunks (graph_steps: short first,
    then up to PLAIN_GRAPH steps), launched back to back (no host sync between them), each step's token and
    hidden state recorded in the rings. Returns their tokens [B, n'] (n' = n; fewer if a later chunk failed), or
    None if the first chunk failed (the runner then takes the step-by-step path)."""
    from .engine import _greedy_chunk

    B = tok.shape[0]
    limit = _limit(runner, K)
    news, a = [], 0
    for m in graph_steps(n, PLAIN_GRAPH):
        bucket = graph_bucket(n_max + a + m, runner.cache.S, B)
        try:
            fn = _greedy_chunk(runner, bucket, m, rings, limit)
            res = runner.run_step(("adaptive-greedy", B, bucket, m), fn, dict(tok=tok, pos=pos), rows=B)
        except Exception as e:
            runner.graph_failed("greedy", e)
            break
        news.append(res["new"].clone())  # (the graph's buffers: the next replay overwrites them; its tok and pos
        tok, pos, a = res["tok"], res["pos"], a + m  # are copied into the graph's inputs before it)
    return torch.cat(news, 1) if news else None


def _plain_steps(runner, out, st: SpecState, params, generator, n: int) -> torch.Tensor:
    """n plain steps one by one (sampling, a repetition penalty, or an eager runner) from the state's x_N, recorded
    in the rings, without a host sync between them (plain decoding's loop). Returns their tokens [B, n] (with a
    streamer or stopping criteria already in `out`; the caller moves the state past them)."""
    from .sampling import sample_token

    limit = _limit(runner, st.K)
    B = st.N.shape[0]
    tok, pos = st.tok, st.N
    new = []
    for j in range(n):
        logits, h = runner.main(tok[:, None], pos[:, None], None, st.n_max + j + 1, graph=True)
        st.rings.write(pos[:, None], tok[:, None], h)
        tok = sample_token(logits[:, -1], params, st.seen, generator, runner.glue)
        if st.seen is not None:
            st.seen.scatter_(1, tok[:, None], True)
        new.append(tok)
        pos = (pos + 1).clamp(max=limit)
        if out.sync:  # (a streamer or stopping criteria: each step's token goes out now)
            out.add(tok[:, None], torch.ones(B, dtype=torch.long, device=tok.device))
    return torch.stack(new, 1)


def _limit(runner, K: int) -> int:
    """The last position a run of plain steps moves a row to. Every row steps (no row mask), those already done
    and those that finish during the run too, and a row that accepted more drafts than the others runs ahead of
    them: positions are held here, the last one from which a later speculative step's K + 1 positions (frozen
    rows' included) stay inside the cache. Rows still emitting never reach it (S has 2K + 2 positions of room)."""
    return runner.cache.S - 2 - K


def _after_plain(runner, out, st: SpecState, new: torch.Tensor) -> None:
    """The state after a run of n plain steps that produced new [B, n] (and their tokens to `out`, unless None)."""
    B, n = new.shape
    K = st.K
    ar = torch.arange(K + 1, device=new.device)
    seq = torch.cat([st.recent, new], 1)  # positions N-K .. N+n
    st.recent = seq[:, n:n + K + 1]
    st.N = (st.N + n).clamp(max=_limit(runner, K))
    st.tok = new[:, -1]
    st.N_prev = st.N.clone()
    _, st.h_main = st.rings.read((st.N[:, None] - K - 1 + ar[None]).clamp_min(0))
    st.stash, st.drafts, st.q = [], new[:, :0], None
    st.k = st.fresh = 0
    st.n_max += n
    if out is not None:
        out.add(new, torch.full((B,), n, dtype=torch.long, device=new.device))
