"""Adaptive K (generation/adaptive.py): the controller's model and choices, and decoding whose k changes per step
(re-priming the MTP layers, plain chunks in between) against plain decoding."""

from __future__ import annotations

import time

import pytest
import torch

from conftest import run_in_triton_interpreter, tiny_model
from mimo_flash.generation import generate
from mimo_flash.generation.adaptive import AdaptiveK
from test_generation import record_drafts


class ScriptedK(AdaptiveK):
    """A controller whose choices follow a fixed cycle (from index `start`; its current k is script[0] before
    the first choice): every schedule of k must give plain greedy's tokens."""

    def __init__(self, k_max: int, script: list[int], start: int = 0) -> None:
        super().__init__(k_max)
        self.script, self.i, self.seen_k, self.k = script, start, [], script[0]

    def choose(self) -> int:
        self.k = self.script[self.i % len(self.script)]
        self.i += 1
        self.seen_k.append(self.k)
        return self.k


def _batch():
    ids = torch.randint(0, 6, (3, 12), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :10] = 0  # a 2-token prompt
    return ids, mask


# ------------------------------------------------------------------ the controller
def test_expected_tokens_and_choice_from_given_costs():
    ctl = AdaptiveK(3, costs=[1.0, 1.5, 1.8, 2.6])
    ctl.alpha = [0.8, 0.5, 0.25]
    want = [1.0, 1.8, 2.2, 2.3]  # 1 + 0.8 + 0.8*0.5 + 0.8*0.5*0.25
    assert [ctl.expected_tokens(k) for k in range(4)] == pytest.approx(want)
    # tokens per second: 1.0, 1.2, 1.222, 0.885 -> k = 2 (current 3; 2 beats it by more than the margin)
    assert ctl.choose() == 2
    ctl.alpha = [0.2, 0.2, 0.2]  # 1.0, 0.8, 0.69, ...: plain wins
    assert ctl.choose() == 0
    ctl.alpha = [0.52, 0.2, 0.2]  # k = 1: 1.52 / 1.5 = 1.013 tokens/s: within the margin of plain's 1.0
    assert ctl.choose() == 0
    ctl.alpha = [0.7, 0.2, 0.2]  # 1.7 / 1.5 = 1.133: beyond the margin
    assert ctl.choose() == 1


def test_acceptance_rates_are_conditional_per_position():
    ctl = AdaptiveK(3, decay=1.0)  # decay 1: the rates of the last step alone
    ctl.observe(3, [0, 1, 3, 3])  # position 1: 3 of 4 rows; position 2: 2 of the 3 that reached it; 3: 2 of 2
    assert ctl.alpha == pytest.approx([0.75, 2 / 3, 1.0])
    ctl.observe(1, [0, 0])  # a step with one draft says nothing about positions 2 and 3
    assert ctl.alpha == pytest.approx([0.0, 2 / 3, 1.0])
    half = AdaptiveK(2, decay=0.5, prior=0.6)
    half.observe(2, [2])
    assert half.alpha == pytest.approx([0.8, 0.8])


def test_measured_costs_explore_both_ends_then_interpolate():
    ctl = AdaptiveK(3, explore=2, margin=0.0)
    ctl.alpha = [0.9, 0.9, 0.9]
    order = []
    for t3, t0 in ((2.0, None), (2.2, None), (None, 1.0), (None, 1.1)):
        k = ctl.choose()
        order.append(k)
        ctl.timed(k, t3 if k == 3 else t0)
    assert order == [3, 3, 0, 0]
    assert ctl.cost(3) == pytest.approx(2.1) and ctl.cost(0) == pytest.approx(1.05)
    assert ctl.cost(1) == pytest.approx(1.05 + (2.1 - 1.05) / 3)  # linear between the measured ends
    # rates: 1/1.05 = 0.95, 1.9/1.4 = 1.357, 2.71/1.75 = 1.549, 3.439/2.1 = 1.638
    assert ctl.choose() == 3


def test_a_chunk_timing_counts_as_its_steps():
    """A chunk of n steps timed once counts as n timed steps: one chunk of 4 at k = 3 ends that end's exploration
    (explore=3), and the median is over steps, so one slow chunk of 1 step does not outweigh a chunk of 8."""
    ctl = AdaptiveK(3)
    assert ctl.choose() == 3
    ctl.timed(3, 2.0, steps=4)
    assert ctl.choose() == 0  # k = 3 explored
    ctl.timed(0, 1.0, steps=8)
    ctl.timed(0, 9.0)
    assert ctl.cost(0) == 1.0 and len(ctl._times[0]) == ctl.samples  # the window keeps the last 9 steps
    ctl.timed(0, 5.0, steps=50)
    assert ctl.cost(0) == 5.0


def test_costs_are_recomputed_only_after_a_new_timing(monkeypatch):
    """The medians behind cost() are kept between timings: a decision costs the host no median per k (it decides
    while the GPU waits), and a new timing is seen at once."""
    from mimo_flash.generation import adaptive

    calls, real = [], adaptive.statistics.median
    monkeypatch.setattr(adaptive.statistics, "median", lambda t: calls.append(1) or real(t))
    ctl = AdaptiveK(3)
    ctl.timed(3, 4.0, steps=3)
    ctl.timed(0, 1.0, steps=3)
    for _ in range(5):
        ctl.choose()
    assert len(calls) == 2 and ctl.cost(0) == 1.0 and ctl.cost(2) == 3.0  # (k = 2 interpolated)
    ctl.timed(0, 2.0, steps=9)
    assert ctl.cost(0) == 2.0 and len(calls) == 4


def test_probe_refreshes_later_positions():
    ctl = AdaptiveK(2, costs=[1.0, 2.0, 3.0], probe_every=4)
    ctl.alpha = [0.1, 0.1]
    picks = [ctl.choose() for _ in range(9)]
    assert picks == [0, 0, 0, 0, 1, 0, 0, 0, 1] and ctl.k == 0  # four plain decisions, then one probe at k + 1
    ctl.alpha = [0.9, 0.1]  # the probe found position 1 good: k = 1 wins (1.9 / 2 < 1: not yet)
    ctl.costs = [1.0, 1.5, 3.0]
    assert ctl.choose() == 1 and [ctl.choose() for _ in range(5)] == [1, 1, 1, 2, 1]


def test_probes_refresh_the_plain_cost_while_drafting():
    """With measured costs, a controller that drafts (0 < k < k_max) probes in turn at k + 1 and at k = 0 (the
    plain step's cost is otherwise measured only at the start); at k = k_max, at k = 0 only."""
    ctl = AdaptiveK(2, probe_every=3, explore=1, margin=0.0)
    ctl.alpha = [0.9, 0.1]
    for k, t in ((2, 3.0), (0, 1.0)):  # explore: both ends
        assert ctl.choose() == k
        ctl.timed(k, t)
    ctl.timed(1, 1.2)  # k = 1: 1.9 / 1.2 beats 1 / 1 and 1.99 / 3
    picks = [ctl.choose() for _ in range(9)]
    assert picks == [1, 1, 1, 0, 1, 1, 2, 1, 1] and ctl.k == 1  # (the switch to k = 1 restarts the count)
    ctl.alpha = [0.9, 0.95]  # position 2 now accepted, and k = 2 cheaper: 2.755 / 1.3 beats 1.9 / 1.2
    ctl.timed(2, 1.3)
    ctl.timed(2, 1.3)
    ctl.timed(2, 1.3)  # (the median of 3.0, 1.3, 1.3, 1.3)
    # (a plain probe is due first), then k = 2; at k_max the probes are plain steps only
    assert [ctl.choose() for _ in range(5)] == [0, 2, 2, 2, 0] and ctl.k == 2


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="step_costs must hold 3"):
        AdaptiveK(2, costs=[1.0, 2.0])
    model = tiny_model(vocab_size=6)
    ids = torch.randint(0, 6, (1, 5), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="step_costs needs adaptive"):
        generate(model, ids, max_new_tokens=4, num_speculative_tokens=2, step_costs=[1, 2, 3])
    with pytest.raises(ValueError, match="k_max=3"):
        generate(model, ids, max_new_tokens=4, num_speculative_tokens=2, adaptive=AdaptiveK(3))
    with pytest.raises(ValueError, match="or 'auto'"):
        generate(model, ids, max_new_tokens=4, num_speculative_tokens="most")


# ------------------------------------------------------------------ decoding with k chosen per step
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_adaptive_greedy_equals_plain_and_fixed_k(cuda_graphs):
    """Auto (measured costs), fixed K = 1, 2, 3 and given costs that make each k the best all give plain's tokens."""
    model = tiny_model(vocab_size=6)
    ids, mask = _batch()
    kw = dict(attention_mask=mask, max_new_tokens=50, prefill_chunk=5, cuda_graphs=cuda_graphs)
    plain = generate(model, ids, **kw)
    for K in (1, 2, 3):
        assert torch.equal(generate(model, ids, num_speculative_tokens=K, **kw), plain)
    out, stats = generate(model, ids, num_speculative_tokens="auto", return_stats=True, **kw)
    assert torch.equal(out, plain) and stats.notes == []
    assert 0 in stats.spec_k and 3 in stats.spec_k  # explored both ends
    again, stats = generate(model, ids, num_speculative_tokens="auto", return_stats=True, **kw)
    assert torch.equal(again, plain)  # a GraphRunner's second call: its rings and controller are kept
    # free drafts: the controller stays at 3; costly drafts: it drops to plain steps after the first
    out, stats = generate(model, ids, num_speculative_tokens=3, adaptive=True, step_costs=[1, 1, 1, 1],
                          return_stats=True, **kw)
    assert torch.equal(out, plain) and set(stats.spec_k) == {3}
    out, stats = generate(model, ids, num_speculative_tokens=3, adaptive=True, step_costs=[1, 9, 9, 9],
                          return_stats=True, **kw)
    assert torch.equal(out, plain) and set(stats.spec_k) == {0} and stats.drafted == 0


def test_steps_that_build_graphs_are_not_timed(monkeypatch):
    """A stretch of decoding during which the runner captured a graph or compiled a step (made slow here: 0.3 s
    per build) gives the controller no cost: capture time is not a step's cost, and a costly first k = 0 chunk
    must not make plain decoding look dear."""
    from mimo_flash.generation.runner import GraphRunner

    model = tiny_model(vocab_size=6)
    ids, mask = _batch()
    kw = dict(attention_mask=mask, max_new_tokens=40, prefill_chunk=5, cuda_graphs=True,
              num_speculative_tokens=3)
    seen: list[float] = []

    class Recording(AdaptiveK):
        def timed(self, k, seconds_per_step, steps=1):
            seen.append(seconds_per_step)
            super().timed(k, seconds_per_step, steps)

    build = GraphRunner._fn

    def slow_build(self, key, fn, tune):
        if key not in self.fns:
            time.sleep(0.3)
        return build(self, key, fn, tune)

    monkeypatch.setattr(GraphRunner, "_fn", slow_build)
    ctl = Recording(3)
    out, stats = generate(model, ids, adaptive=ctl, return_stats=True, **kw)
    assert torch.equal(out, generate(model, ids, attention_mask=mask, max_new_tokens=40, prefill_chunk=5))
    assert len(seen) >= 2 and 0 in stats.spec_k and 3 in stats.spec_k  # (a chunk of steps: one timing)
    assert max(seen) < 0.25, seen  # every stretch that built something (0.3 s at least) was left out
    assert max(ctl.cost(k) for k in range(4)) < 0.25


def test_adaptive_greedy_drafting_steps_run_in_chunks(monkeypatch):
    """On a GraphRunner, greedy steps with k > 0 run up to SPEC_CHUNK to a graph (one host sync), as fixed K's do:
    plain greedy's tokens with an EOS met inside a chunk, every step of a chunk observed and counted, and the
    controller asked again after each chunk."""
    from mimo_flash.generation import adaptive
    from mimo_flash.generation.speculative import SPEC_CHUNK

    sizes = []
    orig = adaptive.spec_chunk
    monkeypatch.setattr(adaptive, "spec_chunk", lambda runner, st, n, frozen=None: sizes.append(n) or
                        orig(runner, st, n, frozen))
    model = tiny_model(vocab_size=6)
    ids, mask = _batch()
    for extra in ({}, dict(eos_token_id=3, pad_token_id=5)):
        kw = dict(attention_mask=mask, max_new_tokens=45, prefill_chunk=5, **extra)
        plain = generate(model, ids, **kw)
        ctl = ScriptedK(3, [2, 2, 0, 3])
        seen = []
        observe = ctl.observe
        ctl.observe = lambda k, accepted: seen.append(k) or observe(k, accepted)
        out, stats = generate(model, ids, num_speculative_tokens=3, adaptive=ctl, return_stats=True,
                              cuda_graphs=True, **kw)
        assert torch.equal(out, plain), extra
        drafting = [k for k in stats.spec_k if k]
        assert seen == drafting and len(drafting) > len([k for k in ctl.seen_k if k])  # chunks of several steps
    assert sizes.count(SPEC_CHUNK) >= 4


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_adaptive_primes_no_mtp_layer_while_it_decodes_plainly(monkeypatch, cuda_graphs):
    """A controller whose choice is plain steps when a call starts (one kept from earlier calls) runs no MTP layer
    over the prompt; one that then chooses drafts re-primes them from the rings: plain greedy's tokens either way."""
    from mimo_flash.generation.runner import GraphRunner, Runner

    calls = []
    for cls in (Runner, GraphRunner):
        orig = cls.mtp
        monkeypatch.setattr(cls, "mtp", lambda self, k, *a, _orig=orig, **kw: calls.append(k) or _orig(self, k, *a,
                                                                                                         **kw))
    model = tiny_model(vocab_size=6)
    ids, mask = _batch()
    kw = dict(attention_mask=mask, max_new_tokens=30, prefill_chunk=5, cuda_graphs=cuda_graphs)
    plain = generate(model, ids, **kw)
    out, stats = generate(model, ids, num_speculative_tokens=3, adaptive=ScriptedK(3, [0]), return_stats=True, **kw)
    assert torch.equal(out, plain) and calls == [] and stats.drafted == 0
    out, stats = generate(model, ids, num_speculative_tokens=3, adaptive=ScriptedK(3, [0, 0, 3, 1]),
                          return_stats=True, **kw)
    assert torch.equal(out, plain) and stats.spec_k[0] == 0 and stats.accepted > 0
    # (sampled: test_adaptive_sampling_keeps_the_target_distribution[script2-extra2-1] starts so)


def test_adaptive_chunks_take_no_step_past_the_batch_end():
    """A graphed chunk runs no more steps than the most-wanting row surely still needs: drafting chunks take as
    many steps as one step per decision (before the fix, up to SPEC_CHUNK - 1 more at the end)."""
    model = tiny_model(vocab_size=6)
    ids, mask = _batch()
    for K, new_tokens in ((1, 42), (1, 46), (3, 46)):
        steps = []
        for graphs in (False, True):
            _, stats = generate(model, ids, attention_mask=mask, max_new_tokens=new_tokens, prefill_chunk=5,
                                num_speculative_tokens=K, adaptive=ScriptedK(K, [K]), cuda_graphs=graphs,
                                return_stats=True)
            steps.append(stats.steps)
        assert steps[0] == steps[1], (K, new_tokens, steps)


def test_plain_runs_grow_across_calls_and_span_several_graphs(monkeypatch):
    """Runs of plain steps grow 8, 16, 32, 64, 128 while the controller stays plain, and keep growing in the next
    call (a call that starts plain starts with long runs: here the whole call is one run, which is plain decoding
    itself, its graphs, and builds no speculative state); a run is captured chunks launched back to back, each fed
    by the one before: 4 steps, then 8, 16 and PLAIN_GRAPH (runner.graph_steps), plain greedy's tokens."""
    from mimo_flash.generation import adaptive
    from mimo_flash.generation.runner import GraphRunner

    model = tiny_model(vocab_size=6)
    ids, mask = _batch()
    kw = dict(attention_mask=mask, max_new_tokens=100, prefill_chunk=5, cuda_graphs=True)
    plain = generate(model, ids, **kw)
    sizes, launches = [], []
    real_launch, real_step, real_prefill = adaptive._plain_launch, GraphRunner.run_step, adaptive.spec_prefill
    prefills = []

    def spy_prefill(*args, **kwargs):
        prefills.append(1)
        return real_prefill(*args, **kwargs)

    def spy_launch(runner, tok, pos, n_max, rings, K, n):
        sizes.append(n)
        return real_launch(runner, tok, pos, n_max, rings, K, n)

    def spy_step(self, key, *args, **kwargs):
        if key[0] in ("adaptive-greedy", "greedy"):
            launches.append((key[0], key[-1]))
        return real_step(self, key, *args, **kwargs)

    monkeypatch.setattr(adaptive, "_plain_launch", spy_launch)
    monkeypatch.setattr(GraphRunner, "run_step", spy_step)
    monkeypatch.setattr(adaptive, "spec_prefill", spy_prefill)
    ctl = AdaptiveK(2, costs=[1.0, 9.0, 9.0])  # drafts cost 9 plain steps: plain throughout
    ctl.k = 0
    calls = (([8, 16, 32, 43], [("adaptive-greedy", n) for n in (4, 4, 4, 8, 4, 4, 8, 16, 4, 4, 8, 16, 15)]),
             ([], [("greedy", n) for n in (4, 8, 16, 16, 16, 16, 16, 7)]))  # (99 steps a call; GREEDY_CHUNK 16)
    for call, (want_sizes, want_launches) in enumerate(calls):
        sizes.clear()
        launches.clear()
        prefills.clear()
        out, stats = generate(model, ids, num_speculative_tokens=2, adaptive=ctl, return_stats=True, **kw)
        assert torch.equal(out, plain), call
        assert set(stats.spec_k) == {0} and stats.notes == [] and stats.steps == 99
        assert sizes == want_sizes and launches == want_launches, (call, sizes, launches)
        assert len(prefills) == (call == 0)  # a call that is one run builds no speculative state
    assert ctl.plain_run == 5


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_sampled_call_plain_throughout_is_plain_sampling(monkeypatch, cuda_graphs):
    """A sampled call whose first decision is a run of plain steps covering it all is plain sampling itself: the
    same tokens for the same seed (repetition penalty included), and no speculative state built."""
    from mimo_flash.generation import adaptive

    model = tiny_model(vocab_size=6)
    ids, mask = _batch()
    kw = dict(attention_mask=mask, max_new_tokens=40, prefill_chunk=5, cuda_graphs=cuda_graphs, do_sample=True,
              temperature=0.9, top_k=4, repetition_penalty=1.3, seed=7)
    plain = generate(model, ids, **kw)
    prefills = []
    real_prefill = adaptive.spec_prefill
    monkeypatch.setattr(adaptive, "spec_prefill", lambda *a, **k: prefills.append(1) or real_prefill(*a, **k))
    ctl = AdaptiveK(2, costs=[1.0, 9.0, 9.0])  # drafts cost 9 plain steps: plain throughout
    ctl.k, ctl.plain_run = 0, 3  # runs have grown to 64 steps: the call (39 steps) is one run
    out, stats = generate(model, ids, num_speculative_tokens=2, adaptive=ctl, return_stats=True, **kw)
    assert torch.equal(out, plain)
    assert prefills == [] and set(stats.spec_k) == {0} and stats.steps == 39 and ctl.plain_run == 4
    ctl.plain_run = 0  # runs of 8 steps: the speculative state is built, the tokens the same
    assert torch.equal(generate(model, ids, num_speculative_tokens=2, adaptive=ctl, **kw), plain)
    assert prefills == [1]


@pytest.mark.parametrize("cuda_graphs", [False, True])
@pytest.mark.parametrize("script", [[0], [2, 0], [1]])
def test_first_decision_reads_nothing_and_is_not_timed(cuda_graphs, script):
    """The first decision follows the prefill without waiting for it: every row is taken as having one token and
    none as done, so a row whose first token is EOS steps through it (its tokens dropped: plain's output), and
    its time (which holds the prefill's tail) is not given to the controller."""
    model = tiny_model(vocab_size=6)
    ids, mask = _batch()
    kw = dict(attention_mask=mask, max_new_tokens=30, prefill_chunk=5, cuda_graphs=cuda_graphs)
    first = generate(model, ids, max_new_tokens=1, attention_mask=mask)[:, -1]
    eos = int(first[1])  # row 1 ends with its first token; the other rows go on unless theirs is the same
    plain = generate(model, ids, eos_token_id=eos, pad_token_id=5, **kw)
    assert plain[1, 12] == eos and plain[1, 13:].eq(5).all() and plain.shape[1] > 14  # (row 1 ends, others go on)
    timings = []

    class Recording(ScriptedK):
        def timed(self, k, seconds_per_step, steps=1):
            timings.append(k)
            super().timed(k, seconds_per_step, steps)

    for _ in range(2):  # (the second call: a GraphRunner's steps are built, so every decision after the first is timed)
        timings.clear()
        ctl = Recording(2, script)
        out = generate(model, ids, num_speculative_tokens=2, adaptive=ctl, eos_token_id=eos, pad_token_id=5, **kw)
        assert torch.equal(out, plain)
    assert ctl.seen_k and len(timings) == len(ctl.seen_k) - 1  # every decision but the first
    assert generate(model, ids, num_speculative_tokens=2, adaptive=Recording(2, script), **{
        **kw, "max_new_tokens": 1}).shape == (3, 13)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("drafting", [5, 6])
def test_plain_chunks_keep_rows_that_ran_ahead_inside_the_cache(drafting, device):
    """A row that accepts more drafts runs ahead of the others; the plain chunks (k = 0) that follow step it
    too, past its end (after 5 drafting decisions it is still emitting when they start; after 6 it is done), and
    must not carry it past the cache's end (here S = 64: prompt 12 + 44 new + 2K + 2). Before the fix a
    chunk indexed position 64 and fell back to step-by-step decoding (on CUDA: an out-of-bounds index)."""
    model = tiny_model(seed=4, vocab_size=6).to(device)  # (fp32: on CUDA, real graphs of the same steps)
    ids = torch.randint(0, 6, (8, 12), generator=torch.Generator().manual_seed(6))[[3, 1]].to(device)
    kw = dict(max_new_tokens=44, prefill_chunk=5)
    _, alone = generate(model, ids[:1], num_speculative_tokens=3, return_stats=True, **kw)
    _, other = generate(model, ids[1:], num_speculative_tokens=3, return_stats=True, **kw)
    assert alone.acceptance_length > 1.5 > other.acceptance_length  # row 0 runs ahead of row 1
    plain = generate(model, ids, **kw)
    out, stats = generate(model, ids, num_speculative_tokens=3, adaptive=ScriptedK(3, [3] * drafting + [0] * 60),
                          return_stats=True, cuda_graphs=True, **kw)
    assert torch.equal(out, plain)
    assert stats.notes == [] and stats.spec_k[-1] == 0  # no graph failed; it ended in plain chunks


@pytest.mark.parametrize("cuda_graphs", [False, True])
@pytest.mark.parametrize("script", [[3, 0, 0, 1, 2, 3, 3], [1, 3, 2, 0, 3], [0, 2, 2, 1]])
def test_any_schedule_of_k_gives_plain_greedy(cuda_graphs, script):
    """Drops (layers fall behind), rises (re-prime from the rings), plain chunks, EOS and frozen rows."""
    model = tiny_model(vocab_size=6)
    ids, mask = _batch()
    kw = dict(attention_mask=mask, max_new_tokens=45, prefill_chunk=5, cuda_graphs=cuda_graphs)
    for extra in ({}, dict(eos_token_id=3, pad_token_id=5), dict(repetition_penalty=1.3)):
        plain = generate(model, ids, **kw, **extra)
        ctl = ScriptedK(3, script)
        out, stats = generate(model, ids, num_speculative_tokens=3, adaptive=ctl, return_stats=True, **kw, **extra)
        assert torch.equal(out, plain), (script, extra)
        assert stats.accepted > 0 and set(ctl.seen_k) == set(script)


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_layer_zero_drafts_follow_the_training_forward_after_reprime(monkeypatch, cuda_graphs):
    """After k drops to 0 and comes back, the re-primed MTP layer 0 drafts what the full forward predicts
    (graph-shaped: from rings written by plain chunks of 8, 16 and 32 steps, longer than the rings)."""
    model = tiny_model(vocab_size=6)
    log = record_drafts(monkeypatch)
    ids = torch.randint(0, 6, (1, 15), generator=torch.Generator().manual_seed(8))
    ctl = ScriptedK(2, [2, 2, 2, 2, 0, 0, 0, 1, 2, 2, 2, 2, 0, 2, 2, 2])
    out = generate(model, ids, max_new_tokens=120, num_speculative_tokens=2, adaptive=ctl, cuda_graphs=cuda_graphs)
    assert torch.equal(out, generate(model, ids, max_new_tokens=120))
    with torch.no_grad():
        first = model(out, mtp=True).mtp_logits[0][0]
    checked = 0
    for N, d in log:
        n = int(N[0])
        if d.shape[1] and n < out.shape[1]:
            assert int(d[0, 0]) == int(first[n - 1].argmax())
            checked += 1
    assert checked > 10


@pytest.mark.parametrize("script,extra,start", [([2, 0, 1], {}, 0), ([1, 0, 3], dict(temperature=0.8, top_p=0.9), 0),
                                                ([0, 2, 1], {}, 1)])
def test_adaptive_sampling_keeps_the_target_distribution(script, extra, start):
    """Sampling with k changing per step (plain steps and re-primes included, and a start without MTP layers primed:
    the controller's choice was plain, script[0], when the call began) keeps the target distribution."""
    from test_generation import _chi2_pvalue, _target_joint, peaked_model

    from mimo_flash.generation.sampling import SamplingParams

    model, prompt = peaked_model()
    target = _target_joint(model, prompt, 3, SamplingParams(do_sample=True, **extra))
    n = 6000
    out, stats = generate(model, torch.tensor([prompt] * n), max_new_tokens=3, do_sample=True,
                          num_speculative_tokens=3, adaptive=ScriptedK(3, script, start), seed=1234, return_stats=True,
                          **extra)
    counts: dict = {}
    for row in out[:, -3:].tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    assert 0.02 < stats.acceptance_rate < 0.95, stats.acceptance_rate
    assert _chi2_pvalue(counts, target, n) > 1e-3
    assert 0.5 * sum(abs(counts.get(c, 0) / n - q) for c, q in target.items()) < 0.05


_INTERPRETED = r"""
import os
os.environ["TRITON_INTERPRET"] = "1"
import sys
from pathlib import Path
import torch
import mimo_flash
sys.path.insert(0, str(Path(mimo_flash.__file__).resolve().parents[2] / "tests"))
from conftest import run_in_triton_interpreter, tiny_model
from test_adaptive import ScriptedK
from mimo_flash.generation import engine, generate
from mimo_flash.options import TritonStepTuning, override, set_options

set_options(triton_step=TritonStepTuning(min_programs=1))  # few programs: the interpreter runs each in Python
torch.set_num_threads(1)
model = tiny_model(seed=4)
ids = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(6))
plain = generate(model, ids, max_new_tokens=40, eos_token_id=[])
with override(decode_triton="always"):
    ctl = ScriptedK(3, [3, 0, 0, 2, 1, 3, 0])
    out, stats = generate(model, ids, max_new_tokens=40, eos_token_id=[], cuda_graphs=True, num_speculative_tokens=3,
                          adaptive=ctl, return_stats=True)
assert torch.equal(out, plain), (out, plain)
assert stats.notes == [] and set(ctl.seen_k) == {0, 1, 2, 3}
(r,) = engine._RUNNERS[model].values()
assert r.triton and r._triton_step is not None  # plain chunks and k = 0 steps ran the Triton step
print("ok")
"""


def test_adaptive_through_the_triton_step_equals_plain():
    """Batch 1 with the Triton one-token step (Triton's interpreter): plain chunks record the step's hidden
    states in the rings, re-primes read them; the tokens are plain greedy's."""
    run_in_triton_interpreter(_INTERPRETED)


@pytest.mark.parametrize("rows", [1, 3])
def test_switches_between_plain_and_drafting_steps_outlive_graph_outputs(rows):
    """The schedules that went wrong on CUDA only (tokens off plain greedy's, index faults): a speculative graph's
    outputs (the state's N, its recent tokens) were read after plain graphs had run, which on CUDA may overwrite
    them (the runner's graphs share one memory pool). conftest's graph_outputs_expire makes that so on the CPU."""
    from mimo_flash.generation import KVCache
    from mimo_flash.generation.runner import GraphRunner

    model = tiny_model(vocab_size=6)
    runner = GraphRunner(model, KVCache(model.config, 1, 8), 8)
    a = runner.run_step("a", lambda x: dict(y=x + 1), dict(x=torch.zeros(2)))
    assert torch.equal(a["y"], torch.ones(2))
    runner.run_step("b", lambda x: dict(y=x), dict(x=torch.zeros(2)))
    assert a["y"].isnan().all()  # (the fixture at work: "a"'s outputs did not outlive "b")
    ids, mask = _batch()
    ids, mask = ids[:rows], mask[:rows]
    kw = dict(attention_mask=mask, max_new_tokens=60, prefill_chunk=5)
    plain = generate(model, ids, **kw)
    for script in ([3, 0], [0, 3], [0, 2, 2, 1], [3, 0, 0, 1, 2, 3, 3]):
        for _ in range(2):
            out, stats = generate(model, ids, num_speculative_tokens=3, adaptive=ScriptedK(3, script),
                                  return_stats=True, cuda_graphs=True, **kw)
            assert torch.equal(out, plain) and stats.notes == [], script


# ------------------------------------------------------------------ CUDA: real graphs (python -m pytest -m gpu)
@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 3])
def test_adaptive_on_cuda_graphs_equals_plain(rows):
    """fp32 on CUDA: the captured speculative steps of every k, the captured plain chunks and the rings they
    write in place (kept with the runner: a second call replays the same graphs) give plain greedy's tokens."""
    model = tiny_model(vocab_size=6).cuda()
    ids, mask = _batch()
    ids, mask = ids[:rows].cuda(), mask[:rows].cuda()
    kw = dict(attention_mask=mask, max_new_tokens=60, prefill_chunk=5)
    plain = generate(model, ids, **kw)
    for script in ([3, 0, 0, 1, 2, 3, 3], [0, 2, 2, 1]):
        for _ in range(2):
            out, stats = generate(model, ids, num_speculative_tokens=3, adaptive=ScriptedK(3, script),
                                  return_stats=True, **kw)
            assert torch.equal(out, plain) and stats.runner == "GraphRunner" and stats.notes == []
    for _ in range(2):
        out, stats = generate(model, ids, num_speculative_tokens="auto", return_stats=True, **kw)
        assert torch.equal(out, plain) and stats.notes == []


@pytest.mark.gpu
def test_adaptive_plain_chunks_through_the_triton_step_equal_plain():
    """bf16, batch 1 (the Triton step): costs that make drafting lose leave plain chunks only, which run the
    same one-token Triton step as plain decoding and record the rings: the same tokens, no fallback."""
    model = tiny_model(vocab_size=64).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(3)).cuda()
    plain, ps = generate(model, ids, max_new_tokens=40, eos_token_id=[], return_stats=True)
    out, stats = generate(model, ids, max_new_tokens=40, eos_token_id=[], num_speculative_tokens=2, adaptive=True,
                          step_costs=[1.0, 9.0, 9.0], return_stats=True)
    assert torch.equal(out, plain) and stats.notes == [] and set(stats.spec_k) == {0}


def test_each_captured_step_has_one_input_set(monkeypatch):
    """A CUDA graph replays with the inputs it was captured with: every key run_step sees (speculative steps of
    each k, plain chunks) must always come with the same input names and shapes, whatever k ran before."""
    from mimo_flash.generation.runner import GraphRunner

    seen: dict = {}
    real = GraphRunner.run_step

    def recording(self, key, fn, inputs, rows=2, rng=None):
        sig = tuple((n, tuple(t.shape)) for n, t in inputs.items())
        assert seen.setdefault(key, sig) == sig, (key, seen[key], sig)
        return real(self, key, fn, inputs, rows, rng)

    monkeypatch.setattr(GraphRunner, "run_step", recording)
    model = tiny_model(vocab_size=6)
    ids, mask = _batch()
    out, stats = generate(model, ids, attention_mask=mask, max_new_tokens=60, num_speculative_tokens=3,
                          cuda_graphs=True, adaptive=ScriptedK(3, [3, 3, 1, 3, 3, 2, 1, 1, 0, 3, 3, 2, 2, 3]),
                          return_stats=True)
    assert torch.equal(out, generate(model, ids, attention_mask=mask, max_new_tokens=60))
    assert stats.notes == []  # no captured step failed (a failure falls back, with the same tokens)
    assert {key[3] for key in seen if key[0] == "spec"} == {1, 2, 3} and any(k[0] == "adaptive-greedy" for k in seen)
