"""Random cases of speculative decoding against plain greedy decoding: generate() (fixed, adaptive and scripted K,
eager and graph-shaped, left padding, EOS) and the serving scheduler (K = 0 .. 3 and auto, context limits, prefix
cache, graphed prefill, overlap, EOS). Models whose MTP layers agree with them from never to always, so rows run
ahead of each other, finish inside graphed chunks and reach the context limit while others go on (the cases
that once ran positions past the cache's end). The default run takes a few cases; `-m slow` many more."""

from __future__ import annotations

import random
import warnings

import pytest
import torch

from mimo_flash.generation import generate
from mimo_flash.serving.requests import Request
from mimo_flash.serving.scheduler import Scheduler
from serving_helpers import make_tokenizer
from test_adaptive import ScriptedK
from test_serving_speculative import alone, drafting_model, ids_of, run_all

EPS = (0.0, 0.1, 0.3, 1.0)  # how far the main layers' outputs pull away from what the MTP layers draft


@pytest.mark.parametrize("seed,cases", [(0, 12), pytest.param(1, 150, marks=pytest.mark.slow)])
def test_generate_speculative_equals_plain_greedy(seed, cases):
    rng = random.Random(seed)
    V = 40
    models = {e: drafting_model(V, eps=e) for e in EPS}
    for case in range(cases):
        eps = rng.choice(EPS)
        B, P = rng.randint(1, 4), rng.randint(2, 20)
        ids = torch.randint(1, V, (B, P), generator=torch.Generator().manual_seed(1000 * seed + case))
        mask = torch.ones_like(ids)
        for b in range(B):
            mask[b, :rng.randint(0, P - 1)] = 0
        K = rng.choice([1, 2, 3])
        mode = rng.choice(["fixed", "auto", "script"])
        adaptive = {"fixed": {}, "auto": dict(adaptive=True),
                    "script": dict(adaptive=ScriptedK(K, [rng.randint(0, K) for _ in range(rng.randint(1, 6))]))}
        kw = dict(attention_mask=mask, max_new_tokens=rng.randint(1, 60), pad_token_id=0,
                  eos_token_id=rng.choice([[], [rng.randrange(1, V)]]), prefill_chunk=rng.choice([4, 8, 64]))
        graphs = rng.choice([False, True])
        what = (case, eps, B, P, K, mode, graphs, kw["max_new_tokens"], kw["eos_token_id"])
        plain = generate(models[eps], ids, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a graphed step that fails (and falls back) warns: a failure here
            out, stats = generate(models[eps], ids, num_speculative_tokens=K, cuda_graphs=graphs, return_stats=True,
                                  **kw, **adaptive[mode])
        assert torch.equal(out, plain), what
        assert stats.notes == [], what


@pytest.mark.parametrize("seed,cases", [(0, 5), pytest.param(1, 40, marks=pytest.mark.slow)])
def test_scheduler_speculative_equals_alone(tmp_path, seed, cases):
    rng = random.Random(seed)
    tok = make_tokenizer(tmp_path)
    V = tok.vocab_size
    models = {e: drafting_model(V, eps=e) for e in EPS[:3]}
    for case in range(cases):
        eps = rng.choice(EPS[:3])
        S = rng.choice([48, 64, 80])
        reqs = []
        for _ in range(rng.randint(2, 7)):
            n = rng.randint(1, S - 2)
            eos = rng.choice([(), tuple(tok.eos_token_ids), (rng.randrange(3, V),)])
            reqs.append(Request([rng.randrange(3, V) for _ in range(n)], rng.randint(1, S - n), eos=eos))
        settings = dict(max_slots=rng.choice([2, 3, 4]), max_context=S, prefill_chunk=rng.choice([8, 16]),
                        speculative_k=rng.choice([0, 1, 2, 3, "auto"]), cuda_graphs=rng.choice([False, True]),
                        prefix_blocks=rng.choice([0, 8]), graph_prefill=rng.choice([False, True]),
                        overlap=rng.choice([False, True]), admit_wait=rng.choice([0.0, 0.005]))
        events = run_all(Scheduler(models[eps], tok, **settings), reqs)
        for r, ev in zip(reqs, events, strict=True):
            what = (case, eps, settings, len(r.prompt), r.max_tokens, r.eos)
            assert ev[-1].error is None, what
            assert ids_of(ev) == alone(models[eps], r.prompt, r.max_tokens, r.eos), what
