"""The continuous-batching scheduler and the prefix cache, without HTTP."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from conftest import tiny_model
from mimo_flash.generation.sampling import SamplingParams
from mimo_flash.serving.requests import QueueFull, Request, run_blocking
from mimo_flash.generation.runner import GraphRunner
from mimo_flash.serving.scheduler import Scheduler
from serving_helpers import make_tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = make_tokenizer(tmp_path_factory.mktemp("tok"))
    model = tiny_model(seed=7, vocab_size=tok.vocab_size)
    return model, tok


def alone(model, tok, prompt, n):
    """Greedy tokens of model.generate for one prompt, cut after the first EOS."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, eos_token_id=tok.eos_token_ids)
    new = out[0, len(prompt):].tolist()
    eos = tok.eos_token_ids[0]
    return new[: new.index(eos) + 1] if eos in new else new


def collector():
    events, done = [], threading.Event()

    def sink(e):
        events.append(e)
        if e.finish is not None:
            done.set()
    return events, done, sink


def each_alone(sched, model, tok, prompts, max_tokens, timeout=120.0) -> None:
    """Submit every prompt (with its max_tokens) to the started scheduler at once; each one's greedy tokens must
    be its tokens alone."""
    sinks = [collector() for _ in prompts]
    for p, n, (_, _, sink) in zip(prompts, max_tokens, sinks, strict=True):
        sched.submit(Request(p, n, eos=tuple(tok.eos_token_ids), sink=sink))
    for p, n, (events, done, _) in zip(prompts, max_tokens, sinks, strict=True):
        assert done.wait(timeout)
        assert [t for e in events for t in e.token_ids] == alone(model, tok, p, n)


def test_concurrent_greedy_equals_alone_with_sampling_and_cancels(setup):
    model, tok = setup
    torch.manual_seed(0)
    sched = Scheduler(model, tok, max_slots=4, max_context=256, prefill_chunk=8, prefix_blocks=16).start()
    try:
        V = model.config.vocab_size
        greedy = [(torch.randint(3, V, (n,)).tolist(), m) for n, m in
                  [(3, 12), (21, 7), (9, 20), (30, 5), (1, 9), (14, 16), (25, 11)]]
        reqs = []
        for p, m in greedy:
            events, done, sink = collector()
            reqs.append(("greedy", p, m, Request(p, m, eos=tuple(tok.eos_token_ids), sink=sink), events, done))
        for i in range(3):  # sampled neighbours
            events, done, sink = collector()
            p = torch.randint(3, V, (7 + 5 * i,)).tolist()
            reqs.append(("sampled", p, 15, Request(p, 15, SamplingParams(True, 0.9, top_k=20), seed=i, sink=sink),
                         events, done))
        for i in range(2):  # cancelled midway
            events, done, sink = collector()
            p = torch.randint(3, V, (12,)).tolist()
            reqs.append(("cancel", p, 200, Request(p, 200, sink=sink), events, done))
        for r in reqs:
            sched.submit(r[3])
        deadline = time.time() + 60
        while not all(len(r[4]) >= 2 for r in reqs if r[0] == "cancel") and time.time() < deadline:
            time.sleep(0.01)
        for r in reqs:
            if r[0] == "cancel":
                r[3].cancel()
        for r in reqs:
            assert r[5].wait(60), f"{r[0]} request did not finish"
        for kind, p, m, req, events, _ in reqs:
            ids = [t for e in events for t in e.token_ids]
            if kind == "greedy":
                assert ids == alone(model, tok, p, m)
                assert events[-1].finish == ("stop" if ids[-1] in tok.eos_token_ids else "length")
            elif kind == "sampled":
                assert len(ids) == 15 or ids[-1] in tok.eos_token_ids
            else:
                assert events[-1].finish == "cancelled" and len(ids) < 200
        assert sched.running() == 0 and not sched.waiting
    finally:
        sched.stop()


def test_overlapped_steps_give_the_synchronous_outputs(setup):
    """Greedy decode steps launched ahead of the host (overlap) against the synchronous scheduler, stepped by
    hand: requests ended by max_tokens, by EOS, by a stop string and by a cancel while their next token is in
    flight, joined by a request mid-run; the same events' tokens and texts, and the in-flight rows of ended
    requests dropped."""
    model, tok = setup
    g = torch.Generator().manual_seed(5)
    V = model.config.vocab_size
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (4, 9, 6, 12, 7)]
    ref = alone(model, tok, prompts[2], 12)
    stop = tok.decode([ref[4]])  # request 2 stops at (or before) its fifth token
    assert stop.strip()

    def run(overlap):
        sched = Scheduler(model, tok, max_slots=4, max_context=128, prefill_chunk=8, prefix_blocks=0,
                          overlap=overlap)
        reqs = [Request(prompts[0], 3), Request(prompts[1], 40, eos=tuple(tok.eos_token_ids)),
                Request(prompts[2], 12, stop=(stop,)), Request(prompts[3], 30), Request(prompts[4], 6)]
        logs = []
        for r in reqs:
            events, _, r.sink = collector()
            logs.append(events)
        for r in reqs[:4]:
            sched.submit(r)
        for i in range(60):
            if i == 6:
                reqs[3].cancel()
            if i == 8:
                sched.submit(reqs[4])
            sched.step()
        assert all(log and log[-1].finish for log in logs)
        return sched, [([t for e in log for t in e.token_ids], "".join(e.text for e in log), log[-1].finish)
                       for log in logs]

    sync, want = run(False)
    ahead, got = run(True)
    assert got[:3] == want[:3] and got[4] == want[4]
    # cancelled at the same step: the token in flight then is dropped, so it has emitted one fewer
    assert got[3][0] == want[3][0][:-1] and len(want[3][0]) >= 3
    assert [f for _, _, f in got] == ["length", want[1][2], "stop", "cancelled", "length"]
    assert sync.ahead_rows == 0 and ahead.ahead_rows > 20 and ahead.ahead_dropped >= 2  # (the stop, the cancel)


@pytest.mark.parametrize("overlap, device", [(False, "cpu"), (True, "cpu"),
                                             pytest.param(True, "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
                                                 not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_sampled_requests_beside_others_give_what_they_give_alone(setup, overlap, device):
    """Seeded sampled requests of different parameters (one with a repetition penalty, one with logprobs) beside
    greedy ones and each other: each one's tokens (and logprobs) are its tokens alone. Their rows sample
    together on the device (sampling.choose_rows: per-row generators of the device, the rows' parameters copied
    in without a sync); with overlap, sampled rows also run in look-ahead steps."""
    model, tok = setup
    if device == "cuda":  # fp32 there too (no TF32 in matmuls): the rows' logits do not depend on the batch
        model = tiny_model(seed=7, vocab_size=tok.vocab_size).cuda()
    g = torch.Generator().manual_seed(21)
    V = model.config.vocab_size
    hot = SamplingParams(True, 0.8, top_k=30, top_p=0.9)
    specs = [(5, 14, SamplingParams(True, 1.0), 1, None), (11, 9, hot, 2, None), (3, 17, hot, 3, None),
             (8, 12, SamplingParams(), None, None), (6, 10, SamplingParams(True, 0.7, min_p=0.1), 4, 2),
             (9, 6, SamplingParams(True, 1.1, repetition_penalty=1.3), 5, None), (4, 15, hot, 6, None)]
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n, *_ in specs]

    def run(which):
        sched = Scheduler(model, tok, max_slots=8, max_context=128, prefill_chunk=8, prefix_blocks=0,
                          overlap=overlap)
        logs = []
        for i in which:
            _, m, params, seed, lp = specs[i]
            events, _, sink = collector()
            sched.submit(Request(prompts[i], m, params, seed=seed, logprobs=lp, sink=sink))
            logs.append(events)
        for _ in range(200):
            if all(log and log[-1].finish for log in logs):
                break
            sched.step()
        return sched, [([t for e in log for t in e.token_ids], [lp for e in log for lp in (e.logprobs or [])],
                        log[-1].finish) for log in logs]

    together, got = run(range(len(specs)))
    for i in range(len(specs)):
        alone = run([i])[1][0]
        assert (got[i][0], got[i][2]) == (alone[0], alone[2]), i
        # logprobs: equal up to fp32 rounding (a GEMM's blocking may depend on its row count: seen on AMX CPUs)
        assert [[t for t, _ in top] for _, top in got[i][1]] == [[t for t, _ in top] for _, top in alone[1]], i
        torch.testing.assert_close(torch.tensor([[lp] + [x for _, x in top] for lp, top in got[i][1]]),
                                   torch.tensor([[lp] + [x for _, x in top] for lp, top in alone[1]]),
                                   rtol=0, atol=1e-5)
        assert len(got[i][0]) == specs[i][1] and got[i][2] == "length"
    assert len(got[4][1]) == specs[4][1]  # the logprobs row's
    assert (together.ahead_rows > 0) == overlap  # (rows with logprobs or a penalty hold the look-ahead off)
    sampled = [0, 1, 2, 6]  # sampled rows alone among themselves: all of their steps but the first look ahead
    only, got = run(sampled)
    assert got == [run([i])[1][0] for i in sampled]
    assert (only.ahead_rows > 40) == overlap, only.ahead_rows


def test_sampled_request_is_reproducible_and_follows_seed(setup):
    model, tok = setup
    sched = Scheduler(model, tok, max_slots=2, max_context=128, prefill_chunk=16).start()
    try:
        p = tok.encode("hello world")
        params = SamplingParams(True, 1.0)

        def run(seed):
            return [t for e in run_blocking(sched, Request(p, 12, params, seed=seed), 60) for t in e.token_ids]
        a, b, c = run(1), run(1), run(2)
        assert a == b and a != c
    finally:
        sched.stop()


def test_prefix_cache_is_exact_and_hits(setup):
    model, tok = setup
    torch.manual_seed(1)
    V = model.config.vocab_size
    system = torch.randint(3, V, (40,)).tolist()
    prompts = [system + torch.randint(3, V, (n,)).tolist() for n in (5, 9, 3)]
    outs = {}
    for blocks in (0, 32):
        sched = Scheduler(model, tok, max_slots=2, max_context=128, prefill_chunk=8, prefix_blocks=blocks).start()
        try:
            runs = [run_blocking(sched, Request(p, 10, eos=tuple(tok.eos_token_ids)), 60) for p in prompts]
            again = [run_blocking(sched, Request(p, 1), 60)[-1].cached_tokens for p in prompts]
        finally:
            sched.stop()
        outs[blocks] = [[t for e in r for t in e.token_ids] for r in runs]
        first = [r[-1].cached_tokens for r in runs]
        if blocks:
            assert first == [0, 40, 40]  # the system prompt's 5 blocks of 8
            assert again == [(len(p) - 1) // 8 * 8 for p in prompts]  # each prompt's own full blocks
        else:
            assert first == again == [0, 0, 0]
    assert outs[0] == outs[32]
    assert outs[0] == [alone(model, tok, p, 10) for p in prompts]


def test_queue_bound_and_context_check(setup):
    model, tok = setup
    sched = Scheduler(model, tok, max_slots=1, max_context=64, max_queue=1)  # not started: nothing drains
    sched.submit(Request([5, 6], 4))
    with pytest.raises(QueueFull, match="at capacity"):
        sched.submit(Request([5, 6], 4))
    with pytest.raises(ValueError, match="context of 64"):
        sched.check(60, 5)
    assert sched.metrics.rejected == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("admit_wait, graph_prefill", [(0.0, False), (0.01, False), (0.01, True)])
def test_cuda_graph_decode_equals_alone(setup, admit_wait, graph_prefill):
    """On the GPU the decode steps replay CUDA graphs (per batch size and cache bucket) and prefills of one
    chunk length that meet in a step share a forward over a block of rows (graph_prefill: replayed graphs of
    padded chunks); fp32 keeps the greedy argmax stable across batch sizes."""
    _, tok = setup
    model = tiny_model(seed=7, vocab_size=tok.vocab_size).cuda()
    sched = Scheduler(model, tok, max_slots=8, max_context=512, prefill_chunk=32, admit_wait=admit_wait,
                      graph_prefill=graph_prefill).start()
    try:
        g = torch.Generator().manual_seed(5)
        prompts = [torch.randint(3, tok.vocab_size, (n,), generator=g).tolist() for n in (3, 50, 17, 90, 8, 33)]
        each_alone(sched, model, tok, prompts, [40] * len(prompts))
        graphs = [key for r in sched.prefill.runners.values() for key in getattr(r, "graphs", {})]
        assert bool(graphs) == graph_prefill and all(key[2] in (16, 32) for key in graphs), graphs
    finally:
        sched.stop()


def test_compiled_decode_steps_equal_alone(setup):
    """serve --compile: the decode steps torch.compile'd (on a CPU without graphs: the code CUDA captures), warmed up
    for every batch bucket, then three requests of different lengths over two slots (one waits, rows join and
    leave, steps launched ahead): each request's greedy tokens are its tokens alone."""
    model, tok = setup
    sched = Scheduler(model, tok, max_slots=2, max_context=96, prefill_chunk=16, prefix_blocks=0, compile=True)
    sched.warmup()
    assert sorted(sched.runners) == [1, 2] and all(r.compile for r in sched.runners.values())
    sched.start()
    try:
        g = torch.Generator().manual_seed(9)
        prompts = [torch.randint(3, tok.vocab_size, (n,), generator=g).tolist() for n in (5, 21, 9)]
        each_alone(sched, model, tok, prompts, (12, 20, 7), timeout=300)
        assert sched.ahead_rows > 0
    finally:
        sched.stop()


@pytest.mark.parametrize("speculative_k", [0, 2])
def test_graphed_prefill_equals_alone(setup, speculative_k):
    """graph_prefill: prefill chunks left-padded to 16 tokens (masked) through graph-shaped runners over blocks of
    at least 16 rows (on a CPU the code CUDA captures, run directly), their experts through the sorted pairs, every
    shape made at warm-up; prompts of one, two and three chunks (the last ones partial), some sharing a forward:
    each request's greedy tokens are its tokens alone (with speculation too: its MTP layers primed from the chunks'
    own hidden states)."""
    model, tok = setup
    sched = Scheduler(model, tok, max_slots=4, max_context=128, prefill_chunk=16, prefix_blocks=0,
                      cuda_graphs=True, graph_prefill=True, speculative_k=speculative_k)
    sched.warmup()  # the prefill graphs too: one block of the 4 rows (at least 16), width 16, the whole cache
    want = {("main", 4, 16, sched.cache.S, False, "last")}  # (128 positions, + K with speculation)
    assert {key for r in sched.prefill.runners.values() for key in r.fns} == want
    sched.start()
    try:
        g = torch.Generator().manual_seed(12)
        prompts = [torch.randint(3, tok.vocab_size, (n,), generator=g).tolist() for n in (5, 21, 40, 9)]
        each_alone(sched, model, tok, prompts, [12] * len(prompts))
    finally:
        sched.stop()
    assert all(isinstance(r, GraphRunner) for r in sched.prefill.runners.values())
    assert {key for r in sched.prefill.runners.values() for key in r.fns} == want  # nothing new after warm-up


def test_graphed_prefill_warmup_covers_every_forward_split_asks_for(setup):
    """With 20 slots, 32-token chunks and 512 prefill tokens the warm-up makes the prefill graphs of blocks (0, 16)
    and (16, 20) at widths 16 and 32, and (0, 20) at 16 (20 x 32 tokens are more than 512); every forward that split()
    and block() make of random groups of slots (merged while their block's padded tokens fit) is one of them."""
    import random

    model, tok = setup
    sched = Scheduler(model, tok, max_slots=20, max_context=64, prefill_chunk=32, prefix_blocks=0, cuda_graphs=True,
                      graph_prefill=True, prefill_tokens=512)
    sched.warmup()
    made = {(a, b, key[2]) for (a, b), r in sched.prefill.runners.items() for key in r.fns}
    assert made == {(0, 16, 16), (0, 16, 32), (16, 20, 16), (16, 20, 32), (0, 20, 16)}

    class Slot:
        def __init__(self, i):
            self.i = i

    rng = random.Random(0)
    for _ in range(300):
        T = rng.randint(1, 32)
        rows = sorted(rng.sample(range(20), rng.randint(1, 20)))
        for part in sched.prefill.split(T, [(Slot(i), 0, T) for i in rows]):
            a, b = sched.prefill.block(part[0][0].i, part[-1][0].i + 1)
            assert (a, b, sched.prefill.padded(T)) in made, (rows, T, a, b)


def test_warmup_leaves_no_trace(setup):
    model, tok = setup
    sched = Scheduler(model, tok, max_slots=3, max_context=300, prefill_chunk=16)
    sched.warmup()
    assert sorted(sched.runners) == [1, 2, 3]
    sched.start()
    try:
        p = tok.encode("the quick brown fox")
        got = run_blocking(sched, Request(p, 8, eos=tuple(tok.eos_token_ids)), 60)
        assert [t for e in got for t in e.token_ids] == alone(model, tok, p, 8)
    finally:
        sched.stop()


@pytest.mark.parametrize("overlap", [True, False])
def test_long_prompt_prefills_in_chunks_between_decode_steps(setup, overlap):
    model, tok = setup
    sched = Scheduler(model, tok, max_slots=2, max_context=256, prefill_chunk=16, overlap=overlap)  # by hand
    a_events, _, a_sink = collector()
    b_events, _, b_sink = collector()
    sched.submit(Request([5, 6, 7], 100, sink=a_sink))
    sched.step()  # A prefilled (its first token) and one decode step (its second: in flight with overlap)
    assert len(a_events) == (1 if overlap else 2)
    sched.submit(Request(list(range(3, 203)), 4, sink=b_sink))  # 200 tokens: 13 chunks of <= 16
    steps = 0
    while not b_events:
        before = len(a_events)
        sched.step()
        steps += 1
        assert len(a_events) == before + 1  # A moves every step
    assert steps == 13 and sched.metrics.prompt_tokens == 203


@pytest.mark.parametrize("overlap", [True, False])
def test_prefills_of_one_step_share_a_forward_and_equal_alone(setup, overlap):
    model, tok = setup
    sched = Scheduler(model, tok, max_slots=4, max_context=128, prefill_chunk=16, prefix_blocks=0,
                      overlap=overlap)  # stepped by hand
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in (10, 10, 5, 10)]
    runs = []
    for p in prompts:
        events, _, sink = collector()
        runs.append((Request(p, 9, sink=sink), events))
    for r, _ in runs:
        sched.submit(r)
    sched.step()
    # three chunks of 10 tokens in one forward over rows [0, 4) (row 2 idle), the 5-token one in another
    assert sched.prefill.count == 2
    # first token (prefill) and second (decode step; in flight with overlap)
    assert all(len(ev) == (1 if overlap else 2) for _, ev in runs)
    while any(not any(e.finish for e in ev) for _, ev in runs):
        sched.step()
    for p, (_, ev) in zip(prompts, runs, strict=True):
        assert [t for e in ev for t in e.token_ids] == alone(model, tok, p, 9)


@pytest.mark.parametrize("overlap", [True, False])
def test_admit_wait_admits_arrivals_in_groups(setup, overlap):
    model, tok = setup
    sched = Scheduler(model, tok, max_slots=4, max_context=128, prefill_chunk=16, prefix_blocks=0, admit_wait=2.0,
                      overlap=overlap)
    first = 1 if overlap else 2  # events after a request's first step: the decode step's token is in flight
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, model.config.vocab_size, (6,), generator=g).tolist() for _ in range(5)]
    runs = []
    for p in prompts:
        events, _, sink = collector()
        runs.append((Request(p, 40, sink=sink), events))
    sched.submit(runs[0][0])
    sched.step()  # nothing decoding: admitted at once
    assert sched.running() == 1 and len(runs[0][1]) == first
    sched.submit(runs[1][0])
    sched.step()  # A decodes; B (1 waiting, 3 slots free, waited < 2 s) waits
    assert sched.running() == 1 and len(sched.waiting) == 1 and not runs[1][1]
    sched.submit(runs[2][0])
    sched.submit(runs[3][0])
    before = sched.prefill.count
    sched.step()  # 3 waiting fill the 3 free slots: admitted together, one prefill forward
    assert sched.running() == 4 and sched.prefill.count == before + 1
    assert all(len(ev) == first for _, ev in runs[1:4])
    while any(not any(e.finish for e in ev) for _, ev in runs[:4]):
        sched.step()
    sched.submit(runs[4][0])  # alone again: admitted at once
    sched.step()
    assert runs[4][1]
    while not any(e.finish for e in runs[4][1]):
        sched.step()
    for p, (_, ev) in zip(prompts, runs, strict=True):
        assert [t for e in ev for t in e.token_ids] == alone(model, tok, p, 40)


def test_admit_wait_bounds_the_wait(setup):
    model, tok = setup
    sched = Scheduler(model, tok, max_slots=4, max_context=2048, prefill_chunk=16, prefix_blocks=0, admit_wait=0.5)
    a_events, _, a_sink = collector()
    b_events, _, b_sink = collector()
    a = Request([5, 6, 7], 2000, sink=a_sink)  # still decoding when B is admitted
    sched.submit(a)
    sched.step()
    t0 = time.perf_counter()
    sched.submit(Request([8, 9], 4, sink=b_sink))
    while not b_events:
        sched.step()
    assert time.perf_counter() - t0 >= 0.5  # held back for admit_wait (t0 precedes submit's stamp)
    assert len(a_events) > 2 and not any(e.finish for e in a_events)  # A kept decoding meanwhile
    a.cancel()
    sched.step()
    assert a_events[-1].finish == "cancelled"


def test_bad_admission_settings_are_refused(setup):
    model, tok = setup
    with pytest.raises(ValueError, match="prefill_tokens"):
        Scheduler(model, tok, max_slots=1, max_context=64, prefill_chunk=16, prefill_tokens=8)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="admit_wait"):
            Scheduler(model, tok, max_slots=1, max_context=64, admit_wait=bad)
