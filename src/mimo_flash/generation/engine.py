"""generate(): chunked prefill, then plain or MTP-speculative decoding over a KVCache.

Shapes: B rows, P prompt columns (left padding), V vocabulary, D hidden size, K speculative tokens.
Each row's new tokens and the host's reads of device values are generation/output.py; the speculative steps
generation/speculative.py, the adaptive loop generation/adaptive.py.
"""

from __future__ import annotations

import weakref
from dataclasses import astuple, dataclass, field
from typing import Callable, Sequence

import torch

from .adaptive import PLAIN_GRAPH, AdaptiveK, adaptive_decode, controller, plain_throughout
from .cache import KVCache
from .output import Clock, Output, to_host_later
from .rings import SpecRings
from .runner import GraphRunner, Runner, graph_bucket, graph_steps
from .sampling import SamplingParams, sample_token
from .speculative import SPEC_CHUNK, spec_chunk_launch, spec_chunk_size, spec_prefill, spec_step, spec_step_launch


@dataclass
class GenerationStats:
    """What a generate() call did. acceptance_length = tokens emitted per verification step per row."""

    prompt_tokens: int = 0
    new_tokens: int = 0  # summed over rows, up to EOS / max_new_tokens
    steps: int = 0  # decode (or verification) forwards
    drafted: int = 0  # draft tokens verified, summed over active rows
    accepted: int = 0  # of which accepted
    row_steps: int = 0  # verification steps summed over active rows
    emitted: int = 0  # tokens emitted by verification steps, summed over active rows
    # the prompt through the main model, and with a fixed K > 0 the MTP layers' pass over it (speculative.spec_prefill;
    # adaptive K launches its first plain run before that pass, which then counts as decoding); decoding: the rest
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    capture_seconds: float = 0.0
    cache_bytes: int = 0
    per_step_accepted: list[int] = field(default_factory=list)
    spec_k: list[int] = field(default_factory=list)  # adaptive K: the drafts of each step (0: a plain step)
    runner: str = ""  # "Runner" (eager) or "GraphRunner" (graph-shaped steps: CUDA graphs, compiled code or both)
    notes: list[str] = field(default_factory=list)  # fallbacks the runner has taken (a failed graph, kernel, ...)

    @property
    def acceptance_length(self) -> float:
        return self.emitted / self.row_steps if self.row_steps else 1.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def verified(self, k: int, counts: list[int]) -> None:
        """Count one verification step of k drafts; counts: the tokens each active row emitted (accepted + 1)."""
        self.steps += 1
        self.row_steps += len(counts)
        self.emitted += sum(counts)
        self.accepted += sum(counts) - len(counts)
        self.drafted += k * len(counts)
        self.per_step_accepted.append(sum(counts) - len(counts))


def _as_eos_list(eos) -> list[int]:
    return [] if eos is None else [eos] if isinstance(eos, int) else [int(e) for e in eos]


def check_inputs(model, input_ids, attention_mask, max_new_tokens, num_speculative_tokens):
    """Validate and normalise; returns (input_ids [B, P] long, attention_mask [B, P] long or None)."""
    config = model.config
    if isinstance(input_ids, (list, tuple)):
        if len(input_ids) and isinstance(input_ids[0], (list, tuple)):
            if len({len(r) for r in input_ids}) > 1:
                raise ValueError("input_ids rows have different lengths; left-pad them and pass attention_mask")
        input_ids = torch.tensor(input_ids, dtype=torch.long)
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a LongTensor [batch, seq], got {type(input_ids).__name__}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    B, P = input_ids.shape
    if B == 0 or P == 0:
        raise ValueError("empty prompt: input_ids has no tokens")
    input_ids = input_ids.long().to(model.device)
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= config.vocab_size:
        raise ValueError(f"input_ids hold token ids outside [0, {config.vocab_size}) "
                         f"(min {int(input_ids.min())}, max {int(input_ids.max())})")
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask).to(model.device)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                             f"input_ids {tuple(input_ids.shape)}")
        m = attention_mask.long()
        if bool(((m != 0) & (m != 1)).any()):
            raise ValueError("attention_mask must hold 0 (padding) and 1 (token) only")
        if bool((m.sum(1) == 0).any()):
            raise ValueError("empty prompt: a row of attention_mask has no tokens")
        if bool((m[:, 1:] < m[:, :-1]).any()):
            raise ValueError("attention_mask has padding after tokens; generation needs left padding "
                             "(pad at the start of each row)")
        attention_mask = None if bool(m.all()) else m
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    longest = P if attention_mask is None else int(attention_mask.sum(1).max())
    limit = config.max_position_embeddings
    if longest > limit:
        raise ValueError(f"prompt of {longest} tokens is longer than the model's max_position_embeddings ({limit})")
    if longest + max_new_tokens > limit:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
                         f"max_position_embeddings ({limit})")
    K = num_speculative_tokens
    if K == "auto":
        K = min(AUTO_MAX_K, config.num_nextn_predict_layers)
    if not isinstance(K, int) or isinstance(K, bool) or K < 0:
        raise ValueError(f"num_speculative_tokens must be an integer >= 0 or 'auto', got {K!r}")
    if K > config.num_nextn_predict_layers:
        raise ValueError(f"num_speculative_tokens={K} needs {K} MTP layers; the model has "
                         f"{config.num_nextn_predict_layers}")
    return input_ids, attention_mask, K


AUTO_MAX_K = 3  # num_speculative_tokens="auto": adaptive with up to this many drafts (the released model's MTP layers)

_RUNNERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {key: GraphRunner}


def _make_runner(model, B: int, S: int, K: int, cuda_graphs, compile: bool, adaptive: bool = False) -> Runner:
    """An eager Runner with a fresh cache, or a GraphRunner kept on the model for reuse: its graphs (and
    compiled code) serve every later call with the same batch size, cache length and K.

    GraphRunner: on CUDA with cuda_graphs "auto" or True; anywhere with compile=True or cuda_graphs=True. On a
    CPU there are no CUDA graphs: its graph-shaped steps (greedy chunks, whole speculative steps, the decode
    backends) run directly, compiled with compile=True: the code CUDA captures, checked on the CPU."""
    if cuda_graphs not in ("auto", True, False):
        raise ValueError(f"cuda_graphs must be 'auto', True or False, got {cuda_graphs!r}")
    cuda = model.device.type == "cuda"
    config = model.kv_config  # this rank's kv heads under tensor parallelism

    def new_cache():
        # SWA ring slack: speculative steps write up to 2K slots past the accepted tokens; a graphed greedy
        # chunk runs several times from one state while it is captured, and so does a graphed chunk of
        # speculative steps, which advances up to (SPEC_CHUNK - 1)(K + 1) positions more (adaptive K: both)
        return KVCache(config, B, S, device=model.device, dtype=model.dtype, num_mtp=K, slack=slack)

    slack = 2 * K + (SPEC_CHUNK - 1) * (K + 1) if K else GREEDY_CHUNK - 1
    if adaptive:
        slack = max(slack, PLAIN_GRAPH - 1)

    if not ((cuda and cuda_graphs == "auto") or cuda_graphs is True or compile):
        return Runner(model, new_cache(), S)
    runners = _RUNNERS.setdefault(model, {})
    key = (B, S, K, slack, model.dtype, str(model.device), bool(compile), model.parallel is None)
    runner = runners.pop(key, None)
    if runner is None:
        while len(runners) >= 4:  # keep a few (graph memory pools are not small)
            runners.pop(next(iter(runners)))
        runner = GraphRunner(model, new_cache(), S, compile=compile)
    else:
        runner.cache.reset()
    runners[key] = runner
    return runner


@torch.no_grad()
def generate(model, input_ids, attention_mask=None, max_new_tokens: int = 32, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             min_p: float | None = None, repetition_penalty: float | None = None, eos_token_id=None,
             pad_token_id: int | None = None, num_speculative_tokens: int | str = 0, streamer=None,
             seed: int | None = None, stopping: Callable[[list[list[int]]], list[bool]] | None = None,
             prefill_chunk: int = 512, cuda_graphs="auto", compile: bool = False, return_stats: bool = False,
             adaptive: bool | AdaptiveK = False, step_costs: Sequence[float] | None = None):
    """Generate continuations of a batch of prompts.

    input_ids [B, P] LongTensor, left-padded where rows differ (attention_mask [B, P]: 1 token, 0 padding).
    Returns LongTensor [B, P + n] where n <= max_new_tokens is the number of steps taken: generation stops
    early once every row has produced an EOS (eos_token_id: int or list; default the config's), and rows
    that finished earlier are filled with pad_token_id (default: config.pad_token_id, else the first EOS,
    else 0), as transformers does.

    Greedy when do_sample=False (temperature/top_k/top_p/min_p ignored); repetition_penalty applies to both.
    num_speculative_tokens=K > 0 drafts K tokens with the K first MTP layers and verifies them in one
    forward (output identical to K=0 under greedy, same distribution under sampling).
    num_speculative_tokens="auto", or K with adaptive=True: adaptive K (generation/adaptive.py): each step
    drafts k = 0 .. K tokens (K for "auto": min(3, the MTP layers)), chosen from the running acceptance and the
    steps' costs (measured, or step_costs: seconds per step for k = 0 .. K) to maximise tokens per second;
    adaptive may also be an AdaptiveK (its settings; it keeps what it learns across calls; by default the
    runner's, kept with its graphs, carries the measured costs and rates to the next call). stats.spec_k: each
    step's k.
    streamer: an object with put(list[int]) and end() receiving row 0's new tokens (batch 1 only).
    stopping: called each step with every row's new tokens so far; rows it returns True for finish.
    prefill_chunk: prompt tokens per prefill forward. cuda_graphs: "auto" (on CUDA), True or False (True on a
    CPU model runs the graph-shaped step code directly: there are no graphs there); compile: torch.compile the
    graphed steps. return_stats: also return a GenerationStats (stats.notes: fallbacks the runner took).
    """
    params = SamplingParams(do_sample, temperature, top_k, top_p, min_p, repetition_penalty).validate()
    input_ids, attention_mask, K = check_inputs(model, input_ids, attention_mask, max_new_tokens,
                                                num_speculative_tokens)
    ctl = controller(adaptive or num_speculative_tokens == "auto", K, step_costs)
    if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be a positive integer, got {prefill_chunk!r}")
    B, P = input_ids.shape
    if streamer is not None and B != 1:
        raise ValueError("a streamer needs a batch of one prompt")
    config = model.config
    eos = _as_eos_list(config.eos_token_id if eos_token_id is None else eos_token_id)
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    stats = GenerationStats(prompt_tokens=P * B if attention_mask is None else int(attention_mask.sum()))
    if max_new_tokens == 0:
        return (input_ids, stats) if return_stats else input_ids

    device = model.device
    S = P + max_new_tokens + 2 * K + 2  # rows that finish early keep verifying K + 1 tokens
    S = min(-(-S // 64) * 64, config.max_position_embeddings + 2 * K + 2)  # round up: reuse across calls
    runner = _make_runner(model, B, S, K, cuda_graphs, compile, adaptive=ctl is not None)
    if ctl is True:  # measured costs belong to the runner: its controller carries them (and the rates) across calls
        if runner.adaptive is None or runner.adaptive.k_max != K:
            runner.adaptive = AdaptiveK(K)
        ctl = runner.adaptive
    cache = runner.cache
    stats.cache_bytes = cache.nbytes()
    generator = None if seed is None else runner.generator(seed)

    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    lengths = mask.sum(1)  # [B] prompt tokens per row
    n_max = int(lengths.max())  # read before prefill: a wait for the GPU after it would leave it idle
    seen = None
    if params.repetition_penalty is not None and params.repetition_penalty != 1.0:
        seen = torch.zeros(B, config.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, torch.where(mask.bool(), input_ids, input_ids[:, -1:]), True)  # last column is a token

    out = Output(B, max_new_tokens, eos, pad_token_id, streamer, stopping, device, runner.glue)
    clock = Clock(device)
    k = ctl.choose() if ctl is not None and max_new_tokens > 1 else None  # adaptive K's first decision
    plain = ctl is not None and plain_throughout(ctl, k, out)
    if K == 0 or plain:
        last_logits, _ = prefill(runner, input_ids, attention_mask, prefill_chunk, keep_hidden=False)
        tok = sample_token(last_logits, params, seen, generator, runner.glue)
        clock.mark()
        plain_decode(runner, out, tok, lengths.clone(), n_max, params, seen, generator, stats)
        if plain:
            ctl.plain_run += 1
            stats.spec_k.extend([0] * stats.steps)
    else:
        last_logits, hidden = prefill(runner, input_ids, attention_mask, prefill_chunk, keep_hidden=True)
        tok = sample_token(last_logits, params, seen, generator, runner.glue)
        if ctl is not None:  # adaptive K builds its state after its first decision (which may be a plain run)
            clock.mark()
            rings = runner.spec_rings
            size = K * config.sliding_window + 2 * K + 2  # (spec_reprime reads up to K windows)
            if rings is None or rings.size != size or rings.h.dtype != hidden.dtype:
                rings = runner.spec_rings = SpecRings(B, size, config.hidden_size, device, hidden.dtype)
            adaptive_decode(runner, out, (input_ids, mask, hidden, tok, lengths), K, params, seen, generator, ctl, k,
                            stats, prefill_chunk, n_max, rings)
        else:
            out.add(tok[:, None], torch.ones(B, dtype=torch.long, device=device))
            state = spec_prefill(runner, input_ids, mask, hidden, tok, K, params, seen, generator, prefill_chunk,
                                 n_max=n_max)
            clock.mark()  # (the MTP layers' pass over the prompt is prompt work: the prefill's time)
        while ctl is None:
            done = out.done.tolist()
            if all(done):
                break
            if out.streamer is None and out.stopping is None:
                _spec_pipelined(runner, out, state, params, generator, stats)
                break
            frozen = out.done.clone() if any(done) else None
            new, count, counts = spec_step(runner, state, params, generator, frozen=frozen)
            stats.verified(K, [c for c, d in zip(counts, done, strict=True) if not d])
            out.add(new, count)
    clock.mark()
    stats.prefill_seconds, stats.decode_seconds = clock.intervals()
    stats.capture_seconds = getattr(runner, "capture_seconds", 0.0)
    stats.runner, stats.notes = type(runner).__name__, list(runner.notes)
    result = out.result(input_ids)
    stats.new_tokens = out.total_new()
    if streamer is not None:
        streamer.end()
    return (result, stats) if return_stats else result


def plain_decode(runner, out: Output, tok, pos, n_max: int, params: SamplingParams, seen, generator,
                 stats: GenerationStats) -> None:
    """Plain decoding after the prefill's token tok [B] (not yet in `out`) at positions pos [B] until every row of
    `out` is done: graphed greedy chunks where they apply (_greedy_graphed), then one step at a time. Adaptive K
    takes this path too for a call that it decodes plainly throughout."""
    B = tok.shape[0]
    start = 1
    if _greedy_graphable(runner, params, seen, out, generator):  # it adds tok to `out` after launching its first graph
        start, tok, pos = _greedy_graphed(runner, out, tok, pos, n_max, out.max_new, stats, params, generator)
    else:
        out.add(tok[:, None], torch.ones(B, dtype=torch.long, device=tok.device))
    # with EOS / stopping: whether every row was done, read one step late (step i is launched before the host
    # waits for step i - 1's flag, so the GPU is never idle waiting for the host); without, no host read at all
    done_before = out.all_done_later() if out.sync else None
    for i in range(start, out.max_new):
        if seen is not None:
            seen.scatter_(1, tok[:, None], True)
        logits, _ = runner.main(tok[:, None], pos[:, None], None, n_max + i, graph=True)
        tok = sample_token(logits[:, -1], params, seen, generator, runner.glue)
        pos += 1
        if done_before is not None and done_before():  # every row was done before this step: drop it
            break
        out.add(tok[:, None], torch.ones(B, dtype=torch.long, device=tok.device))
        stats.steps += 1
        if out.sync:
            done_before = out.all_done_later()


GREEDY_CHUNK = 16  # greedy steps per CUDA graph; EOS is checked between graphs, one graph late
def _greedy_graphable(runner, params: SamplingParams, seen, out: Output, generator=None) -> bool:
    """Whether plain steps run as captured chunks: greedy, or sampled from the default generator or the runner's
    (runner.generator: a graph keeps drawing from the one it was captured with); no repetition penalty."""
    return (isinstance(runner, GraphRunner) and seen is None and out.streamer is None and out.stopping is None
            and runner.graphs_for(_path(params)) and generator in (None, runner.rng))


def _path(params: SamplingParams) -> str:
    """The runner's name for the graphed path of plain steps (a failed capture of sampled steps leaves greedy ones)."""
    return "sampled" if params.do_sample else "greedy"


def _greedy_chunk(runner, bucket: int, n: int, rings=None, limit: int | None = None, params=None, generator=None):
    def fn(tok, pos):
        """tok, pos [B]: n plain steps (greedy: the argmax of the logits, what sample_token gives without
        sampling or repetition penalty; params with do_sample: sample_token from generator) -> their tokens
        `new` [B, n], the last token and the position after it. Step j reads its token from column j - 1 of `new`,
        where the previous step wrote it, and its position from a table made before the first step: a step's kernels
        need nothing from the host.
        rings (rings.SpecRings, adaptive K): each step's token and hidden state are recorded there.
        limit: positions past it are held at it (rows that are done, whose tokens are dropped, stay in the cache)."""
        P = pos[None] + torch.arange(n + 1, device=pos.device)[:, None]  # [n + 1, B]
        if limit is not None:
            P = P.clamp(max=limit)
        # step-major: each step's ids and positions [B, 1] have tok[:, None]'s strides (a compiled step is
        # specialised on them)
        new = torch.empty(n, tok.shape[0], dtype=torch.long, device=tok.device)
        m = 0 if rings is None else min(n, rings.size)  # steps whose hidden states the rings keep (the last m)
        hs = None if rings is None else torch.empty(m, tok.shape[0], rings.h.shape[-1], dtype=rings.h.dtype,
                                                    device=tok.device)
        ids = tok[:, None]
        for j in range(n):  # (the Triton step writes a kept hidden state straight into hs: no copy kernel between
            # steps, which would also break the programmatic launch chain of the step's kernels)
            if params is not None and params.do_sample:
                logits, h = runner.main(ids, P[j][:, None], None, bucket, logits="last", graph=True)
                new[j] = sample_token(logits[:, -1], params, None, generator, runner.glue)
                if j >= n - m:
                    hs[j - n + m] = h[:, 0]
            else:
                runner.greedy_next(ids, P[j][:, None], bucket, new[j], None if j < n - m else hs[j - n + m])
            ids = new[j][:, None]
        new = new.t()  # [B, n]
        if m:  # the inputs at positions pos + n - m .. pos + n - 1 and their hidden states: one write per slot
            rings.write(P[n - m:n].t(), torch.cat([tok[:, None], new[:, :-1]], 1)[:, n - m:], hs.transpose(0, 1))
        return dict(tok=new[:, -1], pos=P[-1], new=new)
    return fn


def _greedy_graphed(runner: GraphRunner, out: Output, tok, pos, n_max: int, max_new_tokens: int,
                    stats: GenerationStats, params: SamplingParams, generator):
    """Plain decoding up to GREEDY_CHUNK steps per CUDA graph (runner.graph_steps: shorter ones first; forward,
    argmax or sample, next input; no eager work between steps) after the prefill's token tok; the tokens go to
    `out`, where EOS is checked: a row that ended mid-chunk ran a few steps more whose tokens `out` drops, so the
    output is the same as step by step.
    With EOS the host checks a chunk's rows after launching the next chunk, which then runs past the end (its
    tokens dropped likewise). A chunk's steps share one cache bucket (its last step's). Capturing runs a chunk
    several times from the same state, which the SWA rings allow with GREEDY_CHUNK - 1 slots of slack
    (_make_runner).
    Returns (index of the next step, tok, pos): max_new_tokens when done, or where the plain loop takes over
    if capturing failed (runner.graph_failed("greedy" or "sampled", ...) records it; runner.failed[...] says why)."""
    B = tok.shape[0]
    i = 1
    # tok (the prefill's token) first, then the chunks' tokens: added after the first launch (the host is behind
    # the GPU after prefill), and without a host check (no EOS) all at the end
    pending = [tok[:, None]]
    checks = []  # with EOS: per chunk, whether every row was done after it (read when wanted)

    def flush():
        if pending:
            new = torch.cat(pending, 1)
            out.add(new, torch.full((B,), new.shape[1], dtype=torch.long, device=new.device))
            pending.clear()

    for n in graph_steps(max_new_tokens - i, GREEDY_CHUNK):
        bucket = graph_bucket(n_max + i + n - 1, runner.cache.S, B)
        key = ("greedy", B, bucket, n) + (("sampled", astuple(params), generator is None) if params.do_sample else ())
        try:
            res = runner.run_step(key, _greedy_chunk(runner, bucket, n, params=params, generator=generator),
                                  dict(tok=tok, pos=pos), rows=B, rng=generator)
        except Exception as e:  # the step-by-step path from here on, for this runner
            runner.graph_failed(_path(params), e)
            flush()
            return i, tok.clone(), pos.clone()  # (a graph's outputs: the step-by-step graphs may write there)
        tok, pos = res["tok"], res["pos"]
        stats.steps += n
        i += n
        pending.append(res["new"].clone())  # the graph's output buffer: the next replay overwrites it
        if not out.sync:
            continue
        flush()
        # the host waits for the previous chunk's flag, not this one's, so the GPU has this chunk to run while
        # the host adds its tokens and launches the next; one chunk past the end is harmless
        checks.append(out.all_done_later())
        if len(checks) > 1 and checks.pop(0)():
            break
    flush()
    return max_new_tokens, tok, pos


def _spec_pipelined(runner, out: Output, st, params: SamplingParams, generator, stats: GenerationStats) -> None:
    """Speculative decoding with the host one launch behind the device, until every row is done: each launch is a
    graphed chunk of steps (speculative.spec_chunk_launch: greedy, or sampled from the runner's or the default
    generator) or, where chunks do not apply (a repetition penalty, an eager runner, the first step, the cache's last
    positions), one step (spec_step_launch). Launch c is
    made, and its tokens added to `out`, before the host reads launch c - 1's accepted counts, so the device runs
    each launch while the host reads the last one's counts and makes the next. The state's n_max is a bound
    meanwhile (the advance of the launches not yet read). No step is launched that the batch may not need: each
    step emits 1 .. k + 1 tokens per row, so a row with r tokens left is done after r steps, and may be after
    r / (k + 1) (rounded up): where the launches in flight may end every row the host waits for them first, and a
    launch has no more steps than the most-wanting row surely still needs. Near the end launches are therefore
    read one by one, and without EOS the loop runs the synchronous loop's steps exactly (EOS may end rows sooner:
    then one launch more runs, its tokens dropped by `out`). The tokens are those of one step at a time, sampled
    ones included (the same random draws in the same order)."""
    B, k = st.N.shape[0], st.k
    pending = []  # per launch not yet read: (its steps, a function that waits for what it reports)
    left = None  # steps after which every row is surely done, as of the last launch read (None: unknown)
    while True:
        n = spec_chunk_size(runner, st, params, generator)
        ahead = sum(p[0] for p in pending)  # steps launched past the last read
        if left is not None and left <= ahead:
            break
        if pending and left is not None and left <= ahead * (k + 1):  # the launches in flight may end every row:
            left = _spec_read(pending.pop(0), runner, st, pending, stats)  # wait for them rather than make one more
            continue
        if left is not None:  # no more steps than the last row surely still needs (all its drafts accepted): a
            n = min(n, -(-(left - ahead * (k + 1)) // (k + 1)))  # chunk never steps past the batch's end
        # (one row: no frozen mask, which would keep it from the batch-1 kernels; a launch after it is done only
        # follows an EOS, its tokens dropped)
        frozen = out.done.clone() if B > 1 else None
        launched = spec_chunk_launch(runner, st, n, frozen, params, generator) if n > 1 else None  # (None: failed)
        if launched is None:
            n = 1
            new, count = spec_step_launch(runner, st, params, generator, frozen)
            launched = new[None], count[None]
        news, count = launched
        active = out.add_steps(news, count)  # per step, the rows still emitting before it (rows that end inside a
        # chunk step on); what the host reads later: counts, active rows, tokens each row still wants, max N
        info = torch.cat([count.reshape(-1), active.reshape(-1).long(),
                          torch.where(out.done, 0, out.max_new - out.count), st.N.max()[None]])
        pending.append((n, to_host_later(info)))
        if len(pending) > 1:
            left = _spec_read(pending.pop(0), runner, st, pending, stats)
            if left == 0:
                break
    while pending:
        _spec_read(pending.pop(0), runner, st, pending, stats)


def _spec_read(item, runner, st, pending: list, stats: GenerationStats) -> int:
    """Read a launch's counts (waits for it): counts its steps in stats (the rows that were still emitting, as a step
    at a time counts them), sets st.n_max to its exact max N plus the advance of the launches still pending (at most
    S - 1 - K, which no row's N passes: spec_step_launch); returns the most tokens a row still wants after it."""
    B, k = st.N.shape[0], st.k
    n, read = item
    v = read().tolist()
    counts, active, want = v[:n * B], v[n * B:2 * n * B], v[2 * n * B:-1]
    for j in range(n):
        row = slice(j * B, (j + 1) * B)
        stats.verified(k, [c for c, a in zip(counts[row], active[row], strict=True) if a])
    st.n_max = min(v[-1] + sum(p[0] for p in pending) * (k + 1), runner.cache.S - 1 - st.K)
    return max(want)


def prefill(runner: Runner, input_ids, attention_mask, chunk: int, keep_hidden: bool):
    """Run the prompt through the main model in chunks of `chunk` columns.

    input_ids [B, P]; attention_mask [B, P] or None. Returns (logits of the last column [B, V] fp32,
    hidden [B, P, D] after model.norm if keep_hidden else None).
    """
    B, P = input_ids.shape
    if attention_mask is None:
        pos = torch.arange(P, device=input_ids.device).expand(B, P)
        valid, min_pad = None, 0
    else:
        pos = (attention_mask.cumsum(1) - 1).clamp_min(0)
        valid = attention_mask.bool()
        min_pad = P - int(attention_mask.sum(1).max())
    hs = []
    for c0 in range(0, P, chunk):
        c1 = min(P, c0 + chunk)
        last = c1 == P
        logits, h = runner.main(input_ids[:, c0:c1], pos[:, c0:c1], None if valid is None else valid[:, c0:c1],
                                max(1, c1 - min_pad), logits="last" if last else "none")
        if keep_hidden:
            hs.append(h)
    return logits[:, -1].float(), (torch.cat(hs, 1) if keep_hidden else None)
