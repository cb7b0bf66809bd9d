"""MTP speculative decoding: draft K tokens with the chained MTP layers, verify them in one forward.
The rules that draw and accept drafts are generation/acceptance.py; the adaptive loop is generation/adaptive.py.

Notation per row: committed tokens x_0 .. x_N, where x_N is the newest (sampled, not yet run through the
main model, whose cache holds positions 0 .. N-1). One step:

1. Draft. MTP layer k at position t reads (token x_{t+k+1}, h_{k-1}[t]) with h_{-1} = the main model's final
   hidden state and h_{k-1} the block output of layer k-1, and predicts x_{t+k+2}, exactly as in training.
   At position N-1 the tokens x_{N+1} .. x_{N+k} that layer k needs are the drafts d_1 .. d_k of the
   layers before it, so the chain at position N-1 drafts d_1 .. d_K. Each step layer k (re)runs the
   positions N_prev-k .. N-1 (N_prev: N of the previous step): the new ones, plus its last k positions,
   which were computed from drafts and now have committed tokens. Its cache entries at positions >= N-k
   still depend on drafts and are rolled back after verification; h_{k-1} at position N_prev-k, which
   layer k-1 does not rerun, is kept from the previous step ("stash").
2. Verify: the main model runs x_N, d_1 .. d_K at positions N .. N+K in one forward (K + 1 logits).
3. Accept: greedy takes the longest prefix of drafts equal to the target's argmax, then the target's
   token after it; sampling accepts d_j with probability min(1, p_j(d_j) / q_j(d_j)) and at the first
   rejection samples from norm(max(0, p_j - q_j)) (else, all accepted, from p_K): the emitted tokens follow
   the target distribution exactly (Leviathan et al. 2023; Chen et al. 2023).
4. Roll back the main cache past the accepted tokens (positions > N + a) and the MTP caches past their
   final entries. Ring slack 2K keeps every key still needed (cache.py).

Rows accept different numbers of tokens; all tensors keep static shapes: layer k always runs T_k = K+1+k
columns, right-aligned on position N-1, invalid columns masked. Frozen rows (done in generate(); in the serving
scheduler, rows that are not speculating) take no part: masked out of every forward, their cache entries and
state unchanged.

Rows may also start speculating after a plain prefill (`spec_enter`: a serving slot joining a running batch):
their state says a step has just committed x_N (N_prev = N - 1), so their first step drafts like every later one.

Adaptive K (generation/adaptive.py): the state is sized for K (its column count) and each step drafts
`st.k` <= K tokens with the first st.k layers (k = 0: a plain step through the same code). Layers that did not
run fall behind; `st.fresh` counts the layers whose caches are current, and a step wanting more re-primes
them (`spec_reprime`) from rings of the last committed tokens and main hidden states (`SpecRings`), which
every step records.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

import torch

from ..options import options
from .acceptance import RowSampling, accept, draft_token, greedy_accept, seen_prefixes
from .cache import MAIN, mtp_group
from .rings import SpecRings
from .runner import graph_bucket
from .sampling import GREEDY, SamplingParams

# speculative steps of generate() (fixed K) per CUDA graph: one host sync, and the host's work between steps, per
# chunk instead of per step (0.5-0.6 ms a step on an H200, docs/BENCHMARKS.md); EOS is seen a chunk late
SPEC_CHUNK = 4


@dataclass
class SpecState:
    K: int
    N: torch.Tensor  # [B] position of x_N
    N_prev: torch.Tensor  # [B]
    tok: torch.Tensor  # [B] x_N
    recent: torch.Tensor  # [B, K+1] committed tokens at positions N-K .. N (0 before position 0)
    h_main: torch.Tensor | None  # [B, K+1, D] main hidden at positions N-K-1 .. N-1 (valid from N_prev)
    stash: list  # stash[j] [B, D]: h_j at position N_prev - j - 1 (j = 0 .. K-2)
    drafts: torch.Tensor  # [B, K] drafts for positions N+1 .. N+K
    q: torch.Tensor | None  # [B, K, V] draft probabilities (sampling only)
    seen: torch.Tensor | None  # [B, V] tokens in each sequence (repetition penalty)
    n_max: int  # host: max over rows of N
    k: int = -1  # drafts this step (<= K; -1: K)
    fresh: int = -1  # MTP layers whose caches are current (-1: K)
    rings: "SpecRings | None" = None  # adaptive K only
    logits: torch.Tensor | None = None  # [B, k+1, V] the last step's verification logits (a buffer it may reuse)

    def __post_init__(self) -> None:
        self.k = self.K if self.k < 0 else self.k
        self.fresh = self.K if self.fresh < 0 else self.fresh


def spec_prefill(runner, input_ids, mask, hidden, tok, K: int, params: SamplingParams, seen, generator,
                 chunk: int, k: int | None = None, rings: SpecRings | None = None, n_max: int | None = None,
                 recorded: int = 0):
    """State after the prompt: runs the first k (default K) MTP layers over the prompt (in chunks) and drafts
    d_1 .. d_k; the state is sized for K.

    input_ids, mask [B, P] (left padding); hidden [B, P, D] main hidden states; tok [B] = x_N (N = prompt length).
    rings: recorded from the prompt (adaptive K); recorded: steps already written to them after the prompt (a run of
    plain steps launched before this), whose slots the prompt's oldest positions there would overwrite: those are
    left out. n_max: the longest prompt's length, if the caller knows it (else read from mask: a host sync). With
    k = 0 and n_max given, nothing here waits for the GPU.
    """
    B, P = input_ids.shape
    N = mask.sum(1)
    if seen is not None:
        seen.scatter_(1, tok[:, None], True)
    pos = (mask.cumsum(1) - 1).clamp_min(-1)
    if rings is not None:  # the prompt's last positions (a row's padding lies before its tokens)
        c = max(0, P - rings.size + recorded)
        if c < P:
            rings.write(pos[:, c:], input_ids[:, c:], hidden[:, c:], mask[:, c:].bool())
    st = _prime(runner, input_ids, mask, pos, hidden, tok, K, K if k is None else k, params, seen, generator, chunk)
    dev = input_ids.device
    ar = torch.arange(K + 1, device=dev)
    rpos = (N[:, None] - K + ar[None])  # positions N-K .. N
    rcol = (rpos + (P - N)[:, None]).clamp(0, P)
    st.recent = torch.where(rpos >= 0, torch.cat([input_ids, tok[:, None]], 1).gather(1, rcol), 0)
    st.N, st.n_max, st.rings = N.clone(), int(N.max()) if n_max is None else n_max, rings
    return st


def spec_reprime(runner, st: SpecState, k: int, chunk: int, frozen: torch.Tensor | None = None) -> None:
    """Bring the first k MTP layers up to date after steps that ran fewer (adaptive K; a serving slot that
    joined or decoded plainly): re-run them over each row's last L = k * window positions (fewer where the
    sequence is shorter) from the rings, with spec_enter, which leaves every row as if a step had just committed
    its x_N: the next step drafts as every step does. k windows make layers 0 .. k-1 exact (spec_enter).
    st.N / st.tok / st.n_max must be current and the rings must hold positions N-L .. N-1 (size >= L + 2K + 2).
    frozen [B] or None: rows left out: their caches and state are untouched."""
    K = st.K
    L = max(1, min(k * runner.model.config.sliding_window, st.rings.size - 2 * K - 2, st.n_max))
    pos = st.N[:, None] - L + torch.arange(L, device=st.N.device)[None]  # [B, L]: positions N-L .. N-1
    ids, hidden = st.rings.read(pos.clamp_min(0))
    start = st.N - L if frozen is None else torch.where(frozen, runner.cache.S, st.N - L)
    for j in range(k):  # the positions this rewrites: any older entries there go first
        runner.cache.rollback(start, mtp_group(j))
    new = spec_enter(runner, ids, hidden, st.tok, st.N, K, chunk, k_run=k, frozen=frozen)

    def keep(old, got):  # (frozen rows keep their own)
        return got if frozen is None else torch.where(frozen.view(-1, *[1] * (got.dim() - 1)), old, got)
    st.N_prev, st.recent = keep(st.N_prev, new.N_prev), keep(st.recent, new.recent)
    st.h_main = new.h_main if st.h_main is None else keep(st.h_main, new.h_main)
    st.stash = [new_s if j >= len(st.stash) else keep(st.stash[j], new_s) for j, new_s in enumerate(new.stash)]
    st.drafts, st.q = new.drafts, None
    st.k = st.fresh = k


def _prime(runner, input_ids, mask, pos, hidden, tok, K: int, k_run: int, params, seen, generator, chunk: int):
    """Run MTP layers 0 .. k_run-1 over input_ids / hidden [B, P(, D)] at positions pos (the token after the
    last column is tok) and draft d_1 .. d_k_run: a SpecState without N / recent (the caller's)."""
    B, P = input_ids.shape
    valid = mask.bool()
    all_valid = k_run > 0 and bool(valid.all())  # (a host sync: only where a layer runs)
    ext = torch.cat([input_ids, tok[:, None]], 1)  # column c holds the token at position c - pad
    h_in, stash, drafts, qs = hidden, [], [], []
    for k in range(k_run):
        ids_k = ext[:, k + 1: k + 1 + P]
        outs = []
        for c0 in range(0, P, chunk):
            c1 = min(P, c0 + chunk)
            logits, h = runner.mtp(k, ids_k[:, c0:c1], h_in[:, c0:c1], pos[:, c0:c1],
                                   None if all_valid else valid[:, c0:c1])
            outs.append(h)
        h_in = torch.cat(outs, 1)
        d, q = draft_token(logits[:, -1], params, seen, generator, runner.glue)
        drafts.append(d)
        qs.append(q)
        ext = torch.cat([ext, d[:, None]], 1)
        stash.append(h_in[:, max(P - k - 1, 0)])  # position N - k - 1
    zero = torch.zeros(B, dtype=torch.long, device=input_ids.device)
    drafts = torch.stack(drafts, 1) if drafts else torch.zeros(B, 0, dtype=torch.long, device=input_ids.device)
    return SpecState(K=K, N=zero, N_prev=zero.clone(), tok=tok, recent=None, h_main=None,
                     stash=stash[:-1], drafts=drafts, q=torch.stack(qs, 1) if params.do_sample and qs else None,
                     seen=seen, n_max=0, k=k_run, fresh=k_run)


def spec_enter(runner, ids: torch.Tensor, hidden: torch.Tensor, tok: torch.Tensor, N, K: int, chunk: int,
               k_run: int | None = None, frozen: torch.Tensor | None = None) -> SpecState:
    """The state of rows that start speculating after a plain prefill of their prompt, or after plain steps
    (spec_reprime). It drafts nothing: the next step drafts, greedy or sampled.

    ids [B, L] the committed tokens at positions N-L .. N-1 (the prompt's tail), hidden [B, L, D] the main
    model's hidden states there, tok [B] = x_N (the prefill's token); N an int or [B] long (per row). Columns
    at positions < 0 (a row with fewer than L positions) are masked, as left padding is. The state says
    N_prev = N - 1, so the first spec_step re-runs layer k over positions N-1-k .. N-1 and drafts as every later
    step does; this runs each layer k < k_run (default K) over the rest, positions N-L .. N-2-k, and stashes
    h_k at N-2-k (= N_prev - k - 1): a state for steps of at most k_run drafts.
    L = min(N, K * window) gives the MTP caches what a run over the whole prompt gives: layer 0's keys at t
    depend only on (x_{t+1}, h_main[t]), so they are exact from N-L on; layer k's keys depend on h_{k-1}[t],
    exact once layer k-1's window at t is, i.e. from N-L + k * (window-1) on; and decoding reads no MTP key
    before position N - window. A shorter tail only makes early drafts worse, never the output.
    frozen [B] or None: rows left out, masked out of every forward (their caches untouched; their part of the
    returned state is meaningless).
    """
    B, L = ids.shape
    dev = ids.device
    k_run = K if k_run is None else k_run
    n_row = torch.full((B,), N, dtype=torch.long, device=dev) if isinstance(N, int) else N
    pos = n_row[:, None] - L + torch.arange(L, device=dev)[None]
    exists = pos >= 0
    valid = exists if frozen is None else exists & ~frozen[:, None]
    all_valid = bool(valid.all())
    ids = torch.where(exists, ids, 0)
    hidden = torch.where(exists[..., None], hidden, 0)
    h_in, stash = hidden, []
    for k in range(k_run):
        n = L - 1 - k  # positions N-L .. N-2-k: they read the committed tokens at N-L+k+1 .. N-1
        if n > 0:
            outs = []
            for c0 in range(0, n, chunk):
                c1 = min(n, c0 + chunk)
                outs.append(runner.mtp(k, ids[:, k + 1 + c0: k + 1 + c1], h_in[:, c0:c1], pos[:, c0:c1],
                                       None if all_valid else valid[:, c0:c1])[1])
            h_in = torch.cat(outs, 1)
        if k < k_run - 1:  # (a short prompt: h_k at N-2-k < 0 is masked wherever it is read)
            stash.append(h_in[:, n - 1] if n > 0 else torch.zeros_like(hidden[:, 0]))
    ext = torch.cat([torch.zeros(B, K + 1, dtype=ids.dtype, device=dev), ids, tok[:, None]], 1)
    hid = torch.cat([torch.zeros_like(hidden[:, :1]).expand(B, K + 1, hidden.shape[-1]), hidden], 1)
    return SpecState(K=K, N=n_row, N_prev=n_row - 1, tok=tok, recent=ext[:, -(K + 1):], h_main=hid[:, -(K + 1):],
                     stash=stash, drafts=torch.zeros(B, K, dtype=torch.long, device=dev), q=None, seen=None,
                     n_max=N if isinstance(N, int) else 0, k=k_run, fresh=k_run)


def _draft(runner, st: SpecState, params: SamplingParams, generator, frozen=None) -> tuple[list, torch.Tensor]:
    """Regular draft phase (after a verification): fills st.drafts / st.q; returns (the new stash, the tokens at
    positions N-K .. N+k: st.recent then the drafts, of which the verification's input is the last k + 1).
    frozen [B] or None: rows masked out of the MTP forwards."""
    K, B = st.K, st.N.shape[0]
    ext = st.recent
    h_prev = st.h_main
    greedy = not isinstance(params, RowSampling) and not params.do_sample and st.seen is None
    qs, stash = [], []
    for k in range(st.k):
        inputs = runner.glue(("draft-inputs", B, K, k), _draft_inputs)
        pos, valid, h_prev = inputs(K, k, st.N, st.N_prev, frozen, h_prev, st.stash[k - 1] if k else None)
        logits, h_prev = runner.mtp(k, ext, h_prev, pos, valid, graph=True)  # (read before any other replay)
        if greedy:
            ext = runner.glue(("draft-greedy", B, K, k), _draft_greedy)(logits, ext)
            q = None
        else:
            d, q = draft_token(logits[:, -1], params, st.seen, generator, runner.glue)
            ext = torch.cat([ext, d[:, None]], 1)
        qs.append(q)
        if k < st.k - 1:  # h_k at position N - k - 1, kept for the next step (past the next replay of a graph)
            stash.append(h_prev[:, K].clone())
    st.drafts = ext[:, K + 1:]
    st.q = torch.stack(qs, 1) if params.do_sample and qs else None
    return stash, ext


def _draft_inputs(K: int, k: int, N, N_prev, frozen, h_prev, stash):
    """MTP layer k's positions and valid mask [B, T] (T = K + 1 + k columns, right-aligned on position N - 1) and
    its hidden input h_{k-1} [B, T, D]: h_prev (layer k-1's outputs) after its stash at position N_prev - k."""
    B, T = N.shape[0], K + 1 + k
    pos = N[:, None] - T + torch.arange(T, device=N.device)[None]
    valid = (pos >= (N_prev[:, None] - k)) & (pos >= 0)
    if frozen is not None:
        valid &= ~frozen[:, None]
    if k > 0:  # h_{k-1}: stash at position N_prev - k, then layer k-1's outputs
        col = T - (N - N_prev + k)
        h_prev = torch.cat([torch.zeros_like(h_prev[:, :1]), h_prev], 1)
        D = h_prev.shape[-1]
        h_prev = h_prev.scatter(1, col.clamp(0, T - 1)[:, None, None].expand(B, 1, D), stash[:, None])
    return pos, valid, h_prev


def _draft_greedy(logits, ext):
    """The tokens ext [B, n] with the greedy draft of an MTP layer's last logits [B, 1, V] appended."""
    return torch.cat([ext, logits[:, -1].float().argmax(-1)[:, None]], 1)


def _verify_inputs(k: int, N, frozen):
    """The verification's positions N .. N+k [B, k+1] and valid mask ([B, k+1] or None); frozen rows (frozen [B]
    or None) masked, at positions 0 .. k (a serving slot's N may be stale, past the cache's end)."""
    ar = torch.arange(k + 1, device=N.device)
    pos = N[:, None] + ar[None]
    if frozen is None:
        return pos, None
    fz = frozen[:, None] & (ar[None] >= 0)  # [B, k+1], as pos: one kernel writes both (not a [B] one besides)
    return torch.where(fz, ar[None], pos), ~fz


def spec_step(runner, st: SpecState, params: SamplingParams, generator, frozen: torch.Tensor | None = None):
    """One draft + verify + accept step with st.k drafts. Returns (new tokens [B, k+1], count [B], count as a host
    list): row b emits new[b, :count[b]].

    frozen [B] bool or None: rows that take no part (done, or not speculating): masked out of every forward,
    their cache entries and state unchanged, count 0.
    Steps after the first (greedy, or sampled with one SamplingParams for the batch: _can_graph) replay one CUDA
    graph of the whole step on a GraphRunner: no eager work and no host sync inside it; the same code, so the same
    tokens (sampled: the same draws).
    """
    new, count = spec_step_launch(runner, st, params, generator, frozen)
    host = torch.cat([count, st.N.max()[None]]).tolist()  # the step's one host sync
    st.n_max = host[-1]
    return new, count, host[:-1]


def spec_step_launch(runner, st: SpecState, params: SamplingParams, generator, frozen: torch.Tensor | None = None):
    """spec_step without its host sync: (new [B, k+1], count [B]) on the device. st.n_max becomes a bound, k + 1
    more, at most S - 1 - K, which no row's N passes (a row still emitting has N <= P + max_new - 2 before a step,
    S >= P + max_new + 2K + 2, and rows that are done do not advance); the caller sets it exactly once it has read
    st.N."""
    new = None
    if _can_graph(runner, st, params, generator):
        try:
            new, count = _graphed_step(runner, st, frozen, 1, params, generator)
        except Exception as e:  # fall back to the step-by-step path for the rest of this runner's life
            runner.graph_failed(_path(params), e)
            new = None
    if new is None:
        new, count = _step_core(runner, st, params, generator, frozen)
    st.n_max = min(st.n_max + st.k + 1, runner.cache.S - 1 - st.K)
    return new, count


def _can_graph(runner, st: SpecState, params: SamplingParams, generator=None) -> bool:
    """Whether whole steps of this state may replay as captured graphs: greedy, or sampled with one SamplingParams for
    the batch and the default generator or the runner's own (runner.generator: the one a graph keeps drawing from;
    RowSampling's per-row generators stay eager), no repetition penalty, after the first step."""
    sampled_ok = not isinstance(params, RowSampling) and (generator is None or generator is runner.rng)
    return (options().spec_graph and runner.graphs_for(_path(params)) and (not params.do_sample or sampled_ok)
            and st.seen is None and st.h_main is not None and st.K > 0)


def _path(params: SamplingParams) -> str:
    """The runner's name for the graphed path of these steps (a failed capture of sampled ones leaves greedy ones)."""
    return "spec-sampled" if params.do_sample else "spec"


def _graphed_step(runner, st: SpecState, frozen, n: int = 1, params: SamplingParams = GREEDY, generator=None):
    """n x _step_core as one captured graph over static copies of the state (keyed by batch, K, k, kv bucket, n,
    and for sampled steps the sampling parameters and generator: its draws are the graph's, _can_graph).
    The rings (adaptive K) are written in place, like the cache. Returns (new [n, B, k+1], count [n, B]) for
    n > 1, else (new [B, k+1], count [B])."""
    K, k, B = st.K, st.k, st.N.shape[0]
    n_max = st.n_max + (n - 1) * (k + 1)  # (a bound on every row's N at the chunk's last step)
    bucket = graph_bucket(n_max + k + 1, runner.cache.S, B)
    key = ("spec", B, K, k, bucket) if n == 1 else ("spec", B, K, k, bucket, n)
    if params.do_sample:
        key += ("sampled", astuple(params), generator is None)
    # (always a frozen mask: one graph whether or not rows are done)
    fz = frozen if frozen is not None else torch.zeros(B, dtype=torch.bool, device=st.N.device)
    inputs = dict(N=st.N, N_prev=st.N_prev, tok=st.tok, recent=st.recent, h_main=st.h_main, frozen=fz)
    n_stash = max(k - 1, 0)  # what the step reads (a step after a larger k holds more): fixed per key
    for j, t in enumerate(st.stash[:n_stash]):
        inputs[f"stash{j}"] = t
    rings = st.rings

    def fn(N, N_prev, tok, recent, h_main, frozen, **stash):
        s = SpecState(K=K, N=N, N_prev=N_prev, tok=tok, recent=recent, h_main=h_main,
                      stash=[stash[f"stash{j}"] for j in range(n_stash)], drafts=None, q=None, seen=None,
                      n_max=n_max, k=k, rings=rings)
        # (one row: no mask, so that verification may take the batch-1 Triton step; a single frozen row never
        # steps: generate() has ended, and the server's warm-up steps write a row that admission resets)
        news, counts = [], []
        for _ in range(n):
            new, count = _step_core(runner, s, params, generator, frozen if B > 1 else None)
            news.append(new)
            counts.append(count)
        new, count = (news[0], counts[0]) if n == 1 else (torch.stack(news), torch.stack(counts))
        out = dict(new=new, count=count, N=s.N, N_prev=s.N_prev, tok=s.tok, recent=s.recent, h_main=s.h_main,
                   drafts=s.drafts, logits=s.logits)
        for j, t in enumerate(s.stash):
            out[f"stash{j}"] = t
        ptrs = {t.data_ptr() for t in [N, N_prev, tok, recent, h_main, frozen, *stash.values()]}
        return {n: (t.clone() if t.data_ptr() in ptrs else t) for n, t in out.items()}  # no output aliases an input

    out = runner.run_step(key, fn, inputs, rng=generator)
    st.N, st.N_prev, st.tok, st.recent, st.h_main = out["N"], out["N_prev"], out["tok"], out["recent"], out["h_main"]
    st.stash = [out[f"stash{j}"] for j in range(n_stash)]
    st.drafts, st.q, st.logits = out["drafts"], None, out["logits"]
    st.fresh = min(st.fresh, k)
    return out["new"], out["count"]


def spec_chunk_size(runner, st: SpecState, params: SamplingParams, generator=None) -> int:
    """How many speculative steps the next captured graph may run (1: one step, spec_step): up to SPEC_CHUNK where
    whole steps are graphed (_can_graph), as long as every row's positions stay inside the cache (rows that finish
    inside a chunk keep stepping to its end)."""
    if not _can_graph(runner, st, params, generator):
        return 1
    room = (runner.cache.S - 1 - st.K - st.n_max) // (st.k + 1)
    return max(1, min(SPEC_CHUNK, room))


def spec_chunk(runner, st: SpecState, n: int, frozen: torch.Tensor | None = None, params: SamplingParams = GREEDY,
               generator=None):
    """n > 1 speculative steps (spec_chunk_size) as one CUDA graph and one host sync: returns (new [n, B, k+1],
    count [n, B], counts as host lists per step). Each step is spec_step's (sampled ones draw what n single steps
    draw); rows frozen at the start stay frozen, and rows that finish inside the chunk keep stepping (the caller
    drops their tokens). None if the graph failed (the runner then takes single steps, step by step, and says so
    in `notes`)."""
    launched = spec_chunk_launch(runner, st, n, frozen, params, generator)
    if launched is None:
        return None
    new, count = launched
    host = torch.cat([count.reshape(-1), st.N.max()[None]]).tolist()  # the chunk's one host sync
    st.n_max = host[-1]
    B = count.shape[1]
    return new, count, [host[j * B:(j + 1) * B] for j in range(n)]


def spec_chunk_launch(runner, st: SpecState, n: int, frozen: torch.Tensor | None = None,
                      params: SamplingParams = GREEDY, generator=None):
    """spec_chunk without its host sync: launches the graph and returns (new [n, B, k+1], count [n, B]) on the
    device (the graph's buffers: its next replay overwrites them), or None if the graph failed. st.n_max becomes
    a bound, the most n steps can advance (k + 1 each); the caller sets it exactly once it has read st.N."""
    try:
        new, count = _graphed_step(runner, st, frozen, n, params, generator)
    except Exception as e:
        runner.graph_failed(_path(params), e)
        return None
    st.n_max += n * (st.k + 1)
    return new, count


def _step_core(runner, st: SpecState, params: SamplingParams, generator, frozen):
    """Draft st.k tokens, verify, accept, roll back; updates st (not n_max). Returns (new [B, k+1], count [B])."""
    K, k, B = st.K, st.k, st.N.shape[0]
    if k > st.fresh:
        raise RuntimeError(f"a step with {k} drafts needs {k} current MTP layers, {st.fresh} are: spec_reprime first")
    if st.h_main is not None:  # the first step's drafts come from spec_prefill / spec_reprime
        new_stash, ext = _draft(runner, st, params, generator, frozen)
        ids = ext[:, K:]  # x_N (recent's last), d_1 .. d_k
    else:  # the drafts of spec_prefill / spec_reprime: this step may verify fewer
        new_stash = list(st.stash)
        st.drafts = st.drafts[:, :k]
        st.q = None if st.q is None else st.q[:, :k]
        ids = torch.cat([st.tok[:, None], st.drafts], 1)
    d = st.drafts
    pos, valid = runner.glue(("verify-inputs", B, k, frozen is None), _verify_inputs)(k, st.N, frozen)
    logits, h = runner.main(ids, pos, valid, st.n_max + k + 1, graph=True)
    if st.rings is not None:  # committed positions among these are final; the others are rewritten later (frozen
        # rows' rings kept)
        st.rings.write(pos, ids, h, keep=frozen)
    st.logits = logits
    state = (st.N, st.N_prev, st.tok, st.recent, st.h_main, h, frozen)
    if not isinstance(params, RowSampling) and not params.do_sample and st.seen is None:  # plain greedy
        advance = runner.glue(("advance", B, K, k, True), _advance_greedy)  # (accept and update: one function)
        new, count, *state = advance(runner.cache, K, k, logits, d, *state)
    else:
        seen_j = None if st.seen is None else seen_prefixes(st.seen, d, logits.shape[-1])
        if isinstance(params, RowSampling):
            a, y = params.accept(logits, d, st.q)
        else:
            a, y = accept(logits, d, st.q, params, generator, seen_j, runner.glue)
        new, count, *state = runner.glue(("advance", B, K, k, False), _advance)(runner.cache, K, k, d, a, y, *state)
        if st.seen is not None:
            ar = torch.arange(k + 1, device=count.device)
            st.seen.scatter_(1, torch.where(ar[None] < count[:, None], new, st.tok[:, None]), True)
    st.N, st.N_prev, st.tok, st.recent, st.h_main = state
    st.fresh = min(st.fresh, k)
    if frozen is not None and len(st.stash) == len(new_stash):  # (k changed: a frozen row's stash is never read)
        new_stash = [torch.where(frozen[:, None], o, n) for o, n in zip(st.stash, new_stash, strict=True)]
    st.stash = new_stash
    return new, count


def _advance_greedy(cache, K: int, k: int, logits, d, N, N_prev, tok, recent, h_main, h, frozen):
    """Greedy acceptance of drafts d [B, k] from the verification logits [B, k+1, V], then _advance."""
    a, y = greedy_accept(logits, d)
    return _advance(cache, K, k, d, a, y, N, N_prev, tok, recent, h_main, h, frozen)


def _advance(cache, K: int, k: int, d, a, y, N, N_prev, tok, recent, h_main, h, frozen):
    """After a verification of x_N, d_1 .. d_k (h [B, k+1, D] its hidden states) that accepted a [B] drafts and
    then the token y [B]: rolls the caches back and returns (new [B, k+1], count [B], and the state's next N,
    N_prev, tok, recent, h_main); frozen rows (frozen [B] or None) keep their state and caches, count 0."""
    B = N.shape[0]
    new = torch.cat([d, torch.zeros_like(y[:, None])], 1).scatter(1, a[:, None], y[:, None])
    count = a + 1 if frozen is None else torch.where(frozen, 0, a + 1)
    keep = cache.S  # (frozen rows: every position is below it)
    cache.rollback(N + count if frozen is None else torch.where(frozen, keep, N + count), MAIN)
    for j in range(k):  # keeps positions < N - j (later ones read drafts); layers that did not run wrote nothing
        cache.rollback(N - j if frozen is None else torch.where(frozen, keep, N - j), mtp_group(j))
    arK = torch.arange(K + 1, device=N.device)
    h_old = h_main if h_main is not None else torch.zeros_like(h[:, :1]).expand(B, K + 1, h.shape[-1])
    hseq = torch.cat([h_old, h], 1)  # positions N-K-1 .. N+k
    out = [N + count, N, new.gather(1, (count - 1).clamp_min(0)[:, None])[:, 0],
           torch.cat([recent, new], 1).gather(1, count[:, None] + arK[None]),  # positions N-K .. N+k+1
           hseq.gather(1, (count[:, None] + arK[None])[..., None].expand(B, K + 1, h.shape[-1]))]
    if frozen is not None:
        out = [torch.where(frozen.view(-1, *[1] * (o.dim() - 1)), old, o) for old, o in
               zip([N, N_prev, tok, recent, h_old], out, strict=True)]
    return new, count, *out
