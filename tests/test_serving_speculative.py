"""MTP speculative decoding inside the continuous-batching scheduler (Scheduler(speculative_k=K), serve
--speculative K)."""

from __future__ import annotations

import urllib.request

import pytest
import torch

from conftest import tiny_model
from mimo_flash.cli import main
from mimo_flash.generation.adaptive import AdaptiveK
from test_adaptive import ScriptedK
from mimo_flash.generation.sampling import SamplingParams
from mimo_flash.serving.requests import Request
from mimo_flash.serving.scheduler import Scheduler
from serving_helpers import make_tokenizer


def drafting_model(vocab: int, eps: float = 0.3):
    """A tiny model whose MTP layers mostly agree with it: the main layers' outputs are scaled by eps, so
    the main model is nearly a function of the current token (norm(embed(x))), and each MTP layer passes
    enorm(embed(its token)) through (eh_proj = [I, 0], its block scaled by eps) to a final norm equal to the
    main one: a draft is what the main model would say after the drafted token, give or take the eps
    terms. Acceptance is high but not total (both branches of verification run)."""
    model = tiny_model(seed=7, vocab_size=vocab)
    D = model.config.hidden_size
    with torch.no_grad():
        for name, p in model.model.layers.named_parameters():
            if "o_proj" in name or "down_proj" in name:
                p.mul_(eps)
        for layer in model.model.mtp.layers:
            layer.enorm.weight.fill_(1.0)
            layer.eh_proj.weight.zero_()
            layer.eh_proj.weight[:, :D] = torch.eye(D)
            layer.self_attn.o_proj.weight.mul_(eps)
            layer.mlp.down_proj.weight.mul_(eps)
            layer.final_layernorm.weight.copy_(model.model.norm.weight)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = make_tokenizer(tmp_path_factory.mktemp("tok"))
    return drafting_model(tok.vocab_size), tok


def alone(model, prompt, n, eos=()):
    """Plain greedy generate() of one prompt (no speculation), cut after the first EOS."""
    new = model.generate(torch.tensor([prompt]), max_new_tokens=n, eos_token_id=list(eos))[0, len(prompt):].tolist()
    cut = [new.index(e) for e in eos if e in new]
    return new[: min(cut) + 1] if cut else new


def run_all(sched: Scheduler, reqs: list[Request], cancel: tuple[int, ...] = ()) -> list[list]:
    """Submit every request, step the scheduler by hand until all finish; the requests numbered in `cancel`
    are cancelled once they have 3 events. Returns each request's events."""
    events = [[] for _ in reqs]
    for r, ev in zip(reqs, events, strict=True):
        r.sink = ev.append
        sched.submit(r)
    while sched.running() or sched.waiting:
        for i in cancel:
            if len(events[i]) >= 3:
                reqs[i].cancel()
        sched.step()
    return events


def ids_of(events):
    return [t for e in events for t in e.token_ids]


def make_requests(model, tok):
    """Greedy requests of many prompt / output lengths (EOS, stop strings, the context limit, shared prefixes
    for the prefix cache), sampled ones (one with a repetition penalty) and greedy ones with logprobs or a
    repetition penalty in between, and two cancelled midway. Returns (kind, request) pairs."""
    V, eos = model.config.vocab_size, tuple(tok.eos_token_ids)
    g = torch.Generator().manual_seed(11)
    rand = lambda n: torch.randint(3, V, (n,), generator=g).tolist()  # noqa: E731
    system = rand(48)
    out = []
    for n, m in [(3, 12), (21, 7), (9, 20), (30, 5), (1, 9), (14, 16), (25, 11), (2, 30)]:
        out.append(("greedy", Request(rand(n), m, eos=eos)))
    for n, m in [(5, 14), (11, 9), (20, 25)]:  # share a 48-token prefix (6 blocks of 8)
        out.append(("greedy", Request(system + rand(n), m, eos=eos)))
    out.append(("greedy", Request(rand(100), 28, eos=eos)))  # ends at the context limit (128)
    for n in (6, 17):  # a stop string from the middle of the request's own greedy text
        p = rand(n)
        text = tok.decode(alone(model, p, 24))
        out.append(("stop", Request(p, 24, eos=eos, stop=(text[len(text) // 2: len(text) // 2 + 3],))))
    for i in range(3):
        out.append(("sampled", Request(rand(7 + 5 * i), 15, SamplingParams(True, 0.9, top_k=20), seed=i, eos=eos)))
    out.append(("sampled", Request(rand(9), 15, SamplingParams(True, 0.9, top_k=20, repetition_penalty=1.3), seed=7,
                                   eos=eos)))
    out.append(("logprobs", Request(rand(8), 12, logprobs=2, eos=eos)))
    out.append(("penalty", Request(rand(13), 20, SamplingParams(repetition_penalty=1.3), eos=eos)))
    for n in (12, 4):
        out.append(("cancel", Request(rand(n), 100)))
    return out


@pytest.mark.parametrize("K,graphs", [(1, False), (3, False), (2, True)], ids=["K1", "K3", "K2-graph-shaped"])
def test_speculative_serving_equals_plain(setup, K, graphs):
    """Greedy and seeded sampled requests, some with logprobs or a repetition penalty, decode speculatively side
    by side; every greedy request's events equal those of a scheduler without speculation (logprobs included, to
    rounding), greedy tokens equal generate() alone, and a sampled request's tokens equal its own run alone through
    a speculative scheduler (each row samples from its own generator: its neighbours change nothing)."""
    model, tok = setup
    kw = dict(max_slots=4, max_context=128, prefill_chunk=8, prefix_blocks=32, cuda_graphs=graphs)
    runs = {}
    for k in (0, K):
        sched = Scheduler(model, tok, speculative_k=k, **kw)
        reqs = make_requests(model, tok)
        cancel = tuple(i for i, (kind, _) in enumerate(reqs) if kind == "cancel")
        runs[k] = (sched, reqs, run_all(sched, [r for _, r in reqs], cancel))
    (_, reqs, ev0), (spec, _, ev1) = runs[0], runs[K]
    assert spec.metrics.spec_accepted_tokens > 0  # drafts were accepted ...
    assert spec.metrics.spec_accepted_tokens < spec.metrics.spec_draft_tokens  # ... and rejected
    eos = tuple(tok.eos_token_ids)
    for (kind, req), a, b in zip(reqs, ev0, ev1, strict=True):
        ids = ids_of(b)
        if kind == "cancel":
            assert a[-1].finish == b[-1].finish == "cancelled"
            assert 0 < len(ids) < 100 and ids == alone(model, req.prompt, len(ids))
            continue
        if kind in ("sampled", "logprobs", "penalty"):  # (alone, it speculates too)
            solo = Scheduler(model, tok, speculative_k=K, **kw)
            got = run_all(solo, [Request(req.prompt, req.max_tokens, req.params, req.seed, eos=req.eos,
                                         logprobs=req.logprobs)])[0]
            assert ids == ids_of(got) and solo.metrics.spec_accepted_tokens > 0, (kind, req.params)
        if kind == "sampled":
            assert b[-1].finish in ("stop", "length") and b[-1].completion_tokens == len(ids)
            continue
        assert ids == ids_of(a), kind
        if kind == "logprobs":  # each token's logprob and top 2 as plain decoding reports them
            la = [lp for e in a for lp in e.logprobs]
            lb = [lp for e in b for lp in e.logprobs]
            assert len(la) == len(lb) == len(ids)
            for (x, tx), (y, ty) in zip(la, lb, strict=True):
                assert abs(x - y) < 1e-4 and [t for t, _ in tx] == [t for t, _ in ty] and len(tx) == 2
                assert all(abs(p - q) < 1e-4 for (_, p), (_, q) in zip(tx, ty, strict=True))
        if kind == "penalty":  # (the penalty changed the tokens: it was applied)
            assert ids != alone(model, req.prompt, req.max_tokens, eos)
        assert "".join(e.text for e in b) == "".join(e.text for e in a)
        assert b[-1].finish == a[-1].finish and b[-1].completion_tokens == len(ids)
        if kind == "greedy":
            assert ids == alone(model, req.prompt, req.max_tokens, eos)
            assert b[-1].finish == ("stop" if ids[-1] in eos else "length")
        if kind == "stop":
            assert b[-1].finish == "stop" and ids[-1] not in eos and len(ids) < req.max_tokens
    # the prefix cache served the shared prompts, up to K * window positions before their end
    for (_, req), e in zip(reqs[9:11], ev1[9:11], strict=True):  # (the first of the three stored it)
        assert 0 < e[-1].cached_tokens <= len(req.prompt) - K * model.config.sliding_window
    assert spec.metrics.generation_tokens == sum(len(ids_of(e)) for e in ev1)
    assert sum(spec.metrics.ttft.counts) == len(reqs)
    assert spec.running() == 0


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-shaped"])
def test_adaptive_serving_equals_plain(setup, graphs):
    """speculative_k="auto": the drafts change from step to step (here forced through a cycle that visits
    k = 3 -> 0 -> 0 -> 1 -> 2 -> 0 -> 3 -> 2 -> 1, so steps both catch up layers that fell behind during plain
    steps and draft with fewer layers than are current); every greedy request's events (logprobs and repetition
    penalty included) still equal a plain scheduler's, and k = 0 steps decode the slots in the plain forward."""
    model, tok = setup
    kw = dict(max_slots=4, max_context=128, prefill_chunk=8, prefix_blocks=32, cuda_graphs=graphs)
    plain = Scheduler(model, tok, speculative_k=0, **kw)
    reqs0 = make_requests(model, tok)
    cancel = tuple(i for i, (kind, _) in enumerate(reqs0) if kind == "cancel")
    ev0 = run_all(plain, [r for _, r in reqs0], cancel)
    sched = Scheduler(model, tok, speculative_k="auto", **kw)
    assert sched.spec.K == 3 and sched.spec.adaptive
    cycle = [3, 0, 0, 1, 2, 0, 3, 2, 1]
    ctls = [ScriptedK(3, cycle) for _ in range(3)]  # (the test's schedule in place of the measured one)
    sched.spec.ctls.update(zip((1, 2, 4), ctls))
    reqs = make_requests(model, tok)
    ev1 = run_all(sched, [r for _, r in reqs], cancel)
    for (kind, req), a, b in zip(reqs, ev0, ev1, strict=True):
        if kind == "cancel":
            assert b[-1].finish == "cancelled"
            assert ids_of(b) == alone(model, req.prompt, len(ids_of(b)))
            continue
        if kind == "sampled":  # (its draws follow the schedule of k: its own check is the distribution test)
            assert b[-1].finish in ("stop", "length") and len(ids_of(b)) == b[-1].completion_tokens
            continue
        assert ids_of(b) == ids_of(a), kind
        assert b[-1].finish == a[-1].finish
    ks = sched.spec.steps_k
    assert sum(len(c.seen_k) for c in ctls) > 2 * len(cycle) and set(ks) == {0, 1, 2, 3}
    assert ks.count(0) > 0 and sched.metrics.spec_accepted_tokens > 0
    # every step ran one decode forward at most (k = 0: the plain forward)
    assert sched.decode_forwards < plain.decode_forwards


def test_adaptive_slot_drafts_what_generate_drafts(setup):
    """The same schedule of k through generate(adaptive=...) and through a slot: re-primed after plain steps from
    the slot's rings, its drafts are accepted exactly as generate()'s (re-primed from its own rings) are."""
    model, tok = setup
    p = torch.randint(3, model.config.vocab_size, (100,), generator=torch.Generator().manual_seed(16)).tolist()
    seq = [3, 0, 0, 1, 2, 0, 3, 2, 1, 0]
    out, stats = model.generate(torch.tensor([p]), max_new_tokens=60, eos_token_id=[], num_speculative_tokens=3,
                                adaptive=ScriptedK(3, seq), return_stats=True)
    sched = Scheduler(model, tok, max_slots=1, max_context=200, prefill_chunk=16, speculative_k="auto")
    # generate() runs a k = 0 decision as several plain steps, the scheduler as one: the slot follows generate()'s
    # steps (the slot's first step takes the current k: the script's first)
    sched.spec.ctls[1] = ScriptedK(3, stats.spec_k, start=1)
    events = run_all(sched, [Request(p, 60)])
    assert ids_of(events[0]) == out[0, len(p):].tolist()
    assert sched.spec.steps_k == stats.spec_k and {0, 1, 2, 3} <= set(stats.spec_k)
    assert 0 < stats.accepted < stats.drafted
    assert (sched.metrics.spec_accepted_tokens, sched.metrics.spec_draft_tokens) == (stats.accepted, stats.drafted)


def test_adaptive_rings_hold_the_committed_window(setup):
    """What a re-prime reads: after every step, whatever its k, each speculating slot's rings hold the tokens
    of its last `window` committed positions and the main model's hidden states there (those of one forward
    over the whole sequence)."""
    model, tok = setup
    W = model.config.sliding_window
    g = torch.Generator().manual_seed(17)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in (40, 6)]
    sched = Scheduler(model, tok, max_slots=2, max_context=128, prefill_chunk=16, speculative_k="auto")
    seq = [0, 3, 0, 0, 2, 1, 0, 3]
    for n in (1, 2):
        sched.spec.ctls[n] = ScriptedK(3, seq)
    events = [[], []]
    for r, ev in zip(prompts, events, strict=True):
        sched.submit(Request(r, 60, sink=ev.append))
    checked = 0
    while sched.running() or sched.waiting:
        sched.step()
        for s in sched.slots:
            if s is None or not s.decoding:
                continue
            N, full = s.pos, s.req.prompt + ids_of(events[s.i])  # the last token, at N, is not run yet
            assert len(full) == N + 1
            h = model(torch.tensor([full[:N]])).hidden_states[0]
            P = torch.arange(max(0, N - W), N)
            rings = sched.spec.rings
            assert rings.ids[s.i, P % rings.size].tolist() == [full[p] for p in P.tolist()]
            torch.testing.assert_close(rings.h[s.i, P % rings.size], h[P], atol=1e-4, rtol=1e-4)
            checked += 1
    assert checked > 20 and {0, 1, 2, 3} <= set(sched.spec.steps_k)


def test_followers_take_the_leaders_drafts(setup):
    """Tensor-parallel serving: every rank steps a replica of the scheduler with rank 0's step inputs. The
    drafts per step are rank 0's choice (its timings are its own): a follower whose controller would choose
    otherwise takes the leader's k at every step, and so emits the same tokens."""
    model, tok = setup
    kw = dict(max_slots=2, max_context=128, prefill_chunk=8, prefix_blocks=0, speculative_k="auto")
    leader, follower = Scheduler(model, tok, **kw), Scheduler(model, tok, **kw)
    for n in (1, 2):
        leader.spec.ctls[n] = ScriptedK(3, [2, 0, 3, 0, 1])
        follower.spec.ctls[n] = ScriptedK(3, [1])  # (what it would choose alone)

    class Relay:  # a StepBroadcaster in one process: the follower steps with what the leader announces
        def announce(self, *args):
            self.args = args
    leader.broadcaster = Relay()
    g = torch.Generator().manual_seed(18)
    events = {id(leader): [[], []], id(follower): [[], []]}
    leader_reqs = [Request(torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist(), 30)
                   for n in (9, 20)]
    for r, ev in zip(leader_reqs, events[id(leader)], strict=True):
        r.sink = ev.append
        leader.submit(r)
    assert min(len(r.prompt) for r in leader_reqs) > 8
    while leader.running() or leader.waiting:
        leader.step()
        follower.follow_step(*leader.broadcaster.args)
        for s in follower.slots:  # the follower's own requests (prompts longer than a prefill chunk: the step
            if s is not None:  # that admits one emits no token yet)
                s.req.sink = events[id(follower)][s.i].append
    assert follower.spec.steps_k == leader.spec.steps_k and {0, 2, 3} <= set(leader.spec.steps_k)
    assert [ids_of(e) for e in events[id(follower)]] == [ids_of(e) for e in events[id(leader)]]
    assert [ids_of(e) for e in events[id(leader)]] == [alone(model, r.prompt, 30) for r in leader_reqs]
    assert follower.metrics.generation_tokens == 60


def test_adaptive_serving_chooses_plain_where_speculation_loses(setup):
    """The real controller: with costs that make drafting a loss (a step with k drafts costs 1 + k plain
    steps), it settles on k = 0 and the slots decode in the plain forward; with cheap drafting, on k = 3."""
    model, tok = setup
    g = torch.Generator().manual_seed(15)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in (5, 9, 16, 3)]
    for costs, want in (([1.0, 2.0, 3.0, 4.0], 0), ([1.0, 1.01, 1.02, 1.03], 3)):
        sched = Scheduler(model, tok, max_slots=4, max_context=128, prefill_chunk=16, prefix_blocks=0,
                          speculative_k="auto")
        for n in (1, 2, 4):
            sched.spec.ctls[n] = AdaptiveK(3, costs=costs)
        events = run_all(sched, [Request(p, 40) for p in prompts])
        assert [ids_of(e) for e in events] == [alone(model, p, 40) for p in prompts]
        ks = sched.spec.steps_k
        assert ks[-10:] == [want] * 10, ks


@pytest.mark.parametrize("K,extra", [(2, {}), (3, dict(temperature=0.8, top_p=0.9))])
def test_speculative_sampling_through_the_scheduler_keeps_the_distribution(K, extra, tmp_path):
    """Seeded sampled requests that speculate, each row drawing from its own generator: the joint distribution of
    3 new tokens over 3000 requests (vocab 4: 64 cells) is the target's, and not a nearby one (power check)."""
    from test_generation import _chi2_pvalue, _target_joint, peaked_model

    model, prompt = peaked_model()
    params = SamplingParams(do_sample=True, **extra)
    target = _target_joint(model, prompt, 3, params)
    n = 3000
    sched = Scheduler(model, make_tokenizer(tmp_path), max_slots=64, max_context=32, prefill_chunk=8,
                      prefix_blocks=0, max_queue=n, speculative_k=K)
    events = run_all(sched, [Request(prompt, 3, params, seed=i) for i in range(n)])
    counts: dict = {}
    for e in events:
        counts[tuple(ids_of(e))] = counts.get(tuple(ids_of(e)), 0) + 1
    m = sched.metrics
    assert 0.02 < m.spec_accepted_tokens / m.spec_draft_tokens < 0.95  # both branches of acceptance ran often
    assert _chi2_pvalue(counts, target, n) > 1e-3
    assert 0.5 * sum(abs(counts.get(c, 0) / n - q) for c, q in target.items()) < 0.05
    t = 1.25 * extra.get("temperature", 1.0)
    assert _chi2_pvalue(counts, _target_joint(model, prompt, 3, SamplingParams(True, **{**extra, "temperature": t})),
                        n) < 1e-6


def test_speculation_cuts_main_forwards_per_token(setup):
    """One main forward per scheduler step decodes every speculating slot; with accepted drafts, fewer
    forwards than tokens. (Warm-up steps run with every row frozen first: they leave no trace.)"""
    model, tok = setup
    g = torch.Generator().manual_seed(12)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in (5, 9, 16, 3)]
    forwards, tokens = {}, {}
    for K in (0, 2):
        sched = Scheduler(model, tok, max_slots=4, max_context=128, prefill_chunk=16, prefix_blocks=0,
                          speculative_k=K)
        sched.warmup()
        events = run_all(sched, [Request(p, 40) for p in prompts])
        assert [ids_of(e) for e in events] == [alone(model, p, 40) for p in prompts]
        forwards[K], tokens[K] = sched.decode_forwards, sum(len(ids_of(e)) - 1 for e in events)  # after prefill
    assert forwards[0] == 39 and tokens[0] == tokens[2] == 4 * 39  # plain: one forward per token of a slot
    assert forwards[2] < 39 * 0.8  # speculative: 1 .. 3 tokens per slot and forward


def test_bad_speculative_values_are_refused(setup, tmp_path, capsys):
    model, tok = setup
    for bad in (4, -1, True, "3"):
        with pytest.raises(ValueError, match="MTP layers"):
            Scheduler(model, tok, max_slots=1, max_context=64, speculative_k=bad)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    make_tokenizer(ckpt)
    base = ["serve", "--model", str(ckpt), "--device", "cpu", "--speculative"]
    for k, msg in (("4", "the model has 3 MTP layers; use 0 (off) .. 3 or auto"), ("-2", "integer >= 0"),
                   ("two", "integer >= 0 or 'auto'")):
        assert main(base + [k]) == 2
        assert msg in capsys.readouterr().err


def test_a_slot_drafts_what_generate_drafts(setup):
    """A slot primes its MTP layers from its prompt's last K * window positions only (speculative.spec_enter),
    yet drafts as generate() does after priming over the whole prompt: the same drafts are accepted."""
    model, tok = setup
    K = 3
    p = torch.randint(3, model.config.vocab_size, (100,), generator=torch.Generator().manual_seed(13)).tolist()
    assert len(p) > K * model.config.sliding_window
    out, stats = model.generate(torch.tensor([p]), max_new_tokens=40, eos_token_id=[], num_speculative_tokens=K,
                                return_stats=True)
    sched = Scheduler(model, tok, max_slots=2, max_context=160, prefill_chunk=16, speculative_k=K)
    events = run_all(sched, [Request(p, 40)])
    assert ids_of(events[0]) == out[0, len(p):].tolist()
    assert 0 < stats.accepted < stats.drafted
    assert (sched.metrics.spec_accepted_tokens, sched.metrics.spec_draft_tokens) == (stats.accepted, stats.drafted)
    assert sched.decode_forwards == stats.steps


def test_a_one_row_eager_step_keeps_its_previous_position(setup):
    """The state after a speculative step of one row that masks nothing and runs eagerly (a sampled request alone:
    its N_prev is its old N, a view of the state's own rows while the step ran) says N_prev = the N before the step
    (a bug had it equal to the new N: the next draft then re-ran none of the new positions)."""
    model, tok = setup
    sched = Scheduler(model, tok, max_slots=1, max_context=128, prefill_chunk=16, prefix_blocks=0, speculative_k=3)
    p = torch.randint(3, model.config.vocab_size, (20,), generator=torch.Generator().manual_seed(15)).tolist()
    events = []
    r = Request(p, 30, SamplingParams(True, 0.9, top_k=20), seed=3)
    r.sink = events.append
    sched.submit(r)
    checked = 0
    while sched.running() or sched.waiting:
        before = int(sched.spec.st.N[0])
        was = sched.slots[0] is not None and sched.slots[0].decoding  # (its first token came from its prefill)
        steps = len(sched.spec.steps_k)
        sched.step()
        if was and len(sched.spec.steps_k) > steps and sched.running():  # a speculative step ran, the request goes on
            assert int(sched.spec.st.N_prev[0]) == before and int(sched.spec.st.N[0]) > before
            checked += 1
    assert checked >= 3 and sched.metrics.spec_accepted_tokens > 0


def test_frozen_rows_are_untouched(setup):
    """A speculative step leaves every row it does not step (other slots, idle) exactly as it was: keys,
    values, slot tables, MTP rings included; the stepped row changes."""
    model, tok = setup
    sched = Scheduler(model, tok, max_slots=4, max_context=128, prefill_chunk=16, prefix_blocks=0, speculative_k=2)
    g = torch.Generator().manual_seed(14)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in (7, 12, 30)]
    for r in (Request(prompts[0], 50), Request(prompts[1], 50, SamplingParams(True, 0.8), seed=1, logprobs=1),
              Request(prompts[2], 50)):
        sched.submit(r)
    for _ in range(3):
        sched.step()
    assert [s.spec for s in sched.slots[:3]] == [True, True, True]
    cache = sched.cache

    def snapshot(row):
        rings = sched.spec.rings
        return [t.clone() for i in cache.layers() for t in vars(cache.layer_slots(i, row)).values()
                if isinstance(t, torch.Tensor)] + [rings.ids[row].clone(), rings.h[row].clone()]

    before = [snapshot(r) for r in range(4)]
    s = sched.slots[2]
    sched.spec.step(sched._runner(4), [2], s.pos)
    after = [snapshot(r) for r in range(4)]
    for r in (0, 1, 3):
        assert all(torch.equal(a, b) for a, b in zip(before[r], after[r], strict=True)), r
    assert not all(torch.equal(a, b) for a, b in zip(before[2], after[2], strict=True))


@pytest.mark.parametrize("graphs", [False, True])
def test_requests_that_reach_the_context_limit_with_every_draft_accepted(tmp_path, graphs):
    """Every draft accepted (eps = 0: the MTP layers say what the main model says) and every request running to
    the context limit: a speculative step moves a row up to K + 1 positions, past the end for the tokens that are
    dropped, and the rows that finished stay frozen beside those still decoding. Before the fix the next step
    computed the frozen rows at positions past the cache's end (an IndexError that ended every request; on CUDA
    an out-of-bounds index)."""
    tok = make_tokenizer(tmp_path)
    model = drafting_model(tok.vocab_size, eps=0.0)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, tok.vocab_size, (n,), generator=g).tolist() for n in (12, 8, 20, 5)]
    sched = Scheduler(model, tok, max_slots=4, max_context=64, prefill_chunk=16, speculative_k=3, cuda_graphs=graphs)
    events = run_all(sched, [Request(p, 64 - len(p)) for p in prompts])
    assert sched.metrics.spec_accepted_tokens == sched.metrics.spec_draft_tokens > 0
    for p, ev in zip(prompts, events, strict=True):
        assert ev[-1].finish == "length" and ev[-1].error is None
        assert ids_of(ev) == alone(model, p, 64 - len(p))


def test_over_http_with_metrics(setup):
    """Through the OpenAI server: a greedy completion speculates (the /metrics counters move) and equals
    generate() alone; a sampled one beside it is served too."""
    import openai

    from mimo_flash.serving import OpenAIServer, start_in_thread

    model, tok = setup
    sched = Scheduler(model, tok, max_slots=2, max_context=128, prefill_chunk=16, speculative_k=2).start()
    http, url = start_in_thread(OpenAIServer(sched, tok, "tiny"))
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        ids = tok.encode("the quick brown fox")
        got = client.completions.create(model="tiny", prompt=ids, max_tokens=20, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert got.choices[0].text == tok.decode(alone(model, ids, 20))
        assert client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=1.0,
                                         seed=3).usage.completion_tokens >= 1
        with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
            lines = dict(line.rsplit(" ", 1) for line in r.read().decode().splitlines() if line[:1] not in ("#", ""))
        drafted = float(lines["mimo_flash_spec_decode_draft_tokens_total"])
        assert drafted > 0 and 0 < float(lines["mimo_flash_spec_decode_accepted_tokens_total"]) < drafted
    finally:
        http.should_exit = True
        sched.stop()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_speculative_serving_equals_plain(setup):
    """On the GPU the speculative steps replay CUDA graphs (whole steps: drafts, verification, acceptance,
    rollback; captured at warm-up with every row frozen); fp32 keeps the greedy argmax stable."""
    model, tok = setup
    model = drafting_model(tok.vocab_size).cuda()
    runs = {}
    for K in (0, 3):
        sched = Scheduler(model, tok, max_slots=8, max_context=512, prefill_chunk=32, speculative_k=K)
        sched.warmup()
        reqs = make_requests(model, tok)
        cancel = tuple(i for i, (kind, _) in enumerate(reqs) if kind == "cancel")
        runs[K] = (sched, run_all(sched, [r for _, r in reqs], cancel))
    for (kind, req), a, b in zip(reqs, runs[0][1], runs[3][1], strict=True):
        if kind != "cancel":
            assert ids_of(a) == ids_of(b), kind
        if kind == "greedy":
            assert ids_of(b) == alone(model, req.prompt, req.max_tokens, tuple(tok.eos_token_ids))
    assert runs[3][0].metrics.spec_accepted_tokens > 0
    assert not any(r.notes for r in runs[3][0].runners.values())  # no graphed path fell back
