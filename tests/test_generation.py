"""KV cache, chunked prefill, decoding, MTP speculative decoding (greedy and sampling), errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from conftest import tiny_model, transformers_twin
from mimo_flash import MiMoConfig
from mimo_flash.generation import GenerationStats, KVCache, cache_bytes, generate
from mimo_flash.generation import speculative as spec_mod
from mimo_flash.generation.attention import cache_attention
from mimo_flash.generation.cache import MAIN, bytes_report
from mimo_flash.generation import engine
from mimo_flash.generation.engine import prefill
from mimo_flash.generation.runner import Runner
from mimo_flash.generation.sampling import (SamplingParams, choose_rows, process, sample_from_probs, sample_token,
                                            uniforms)
from mimo_flash.ops.attention import AttnMeta, attention_reference


def full_argmax_check(model, out, prompt_cols, mask=None):
    """Every generated token is the argmax of one full forward over the sequence before it."""
    m = None if mask is None else torch.cat([mask, torch.ones_like(out[:, prompt_cols:])], 1)
    with torch.no_grad():
        logits = model(out[:, :-1], attention_mask=None if m is None else m[:, :-1]).logits
    pred = logits[:, prompt_cols - 1:].argmax(-1)
    return torch.equal(pred, out[:, prompt_cols:])


# ---------------------------------------------------------------------------- attention / cache
@pytest.mark.parametrize("window,sink", [(None, False), (5, True), (5, False)])
def test_cache_attention_matches_reference(window, sink):
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, Tq, S, D, Dv = 2, 4, 2, 3, 11, 16, 8
    q = torch.randn(B, H, Tq, D, generator=g)
    k, v = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, Dv, generator=g)
    k_pos = torch.randperm(S, generator=g).expand(B, S).clone()
    k_seg = torch.zeros(B, S, dtype=torch.long)
    k_seg[1, :4] = -1  # empty / rolled-back slots
    q_pos = torch.tensor([[7, 8, 9], [8, 9, 10]])
    q_seg = torch.tensor([[0, 0, 0], [-2, 0, 0]])  # an invalid query sees nothing
    meta = AttnMeta(q_pos=q_pos, k_pos=k_pos, q_seg=q_seg, k_seg=k_seg, aligned=False)
    s = torch.randn(H, generator=g) if sink else None
    ours = cache_attention(q, k, v, meta, D ** -0.5, window, s)
    ref = attention_reference(q, k, v, meta, D ** -0.5, window, s)
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


def test_cache_layout_ring_is_exactly_the_window():
    c = MiMoConfig.preset("tiny")
    cache = KVCache(c, 2, 100, dtype=torch.float32)
    for i in range(c.num_hidden_layers):
        slots = cache.layer_slots(i)
        assert slots.k.shape[1] == (c.sliding_window if c.is_swa(i) else 100)
        assert slots.ring == c.is_swa(i)
    spec = KVCache(c, 1, 100, num_mtp=2, slack=4)
    assert spec.layer_slots(c.num_hidden_layers).k.shape[1] == c.sliding_window + 4


def test_one_token_tables_rule_is_what_step_does():
    """KVCache.one_token_tables: the rule its docstring gives (what the Triton step's table kernel applies) leaves
    the tables exactly as step() does for one valid token of a single row, the ring wrapping included."""
    c = MiMoConfig.preset("tiny")
    by_step, by_rule = KVCache(c, 1, 64, dtype=torch.float32), KVCache(c, 1, 64, dtype=torch.float32)
    for p in range(c.sliding_window + 5):  # past the ring's end
        by_step.step(MAIN, torch.tensor([[p]]), None, p + 1)
        tab = by_rule.one_token_tables()
        assert tab.ring == by_rule.ring_size()
        tab.full_valid[p] = True
        tab.ring_valid[p % tab.ring] = True
        tab.ring_pos[p % tab.ring] = p
        for i in range(c.num_hidden_layers):
            a, b = by_rule.layer_slots(i), by_step.layer_slots(i)
            assert torch.equal(a.valid, b.valid) and torch.equal(a.pos, b.pos), (p, i)


def test_bytes_report_flash_is_the_real_allocation():
    c = MiMoConfig.preset("flash")
    full = [i for i in range(48) if not c.is_swa(i)]
    assert len(full) == 9
    for n in (4096, 32768, 262144):
        # every buffer and table has one scratch slot (where masked tokens write) after its rows
        kv_full = 9 * (4 * n + 1) * (192 + 128) * 2
        kv_swa = 39 * (8 * 129 + 1) * (192 + 128) * 2
        tables = (n + 1) * 1 + 130 * (8 + 1)  # validity of full slots, positions + validity of the ring
        assert cache_bytes(c, n) == kv_full + kv_swa + tables
        glob = cache_bytes(c, n, sliding=False)
        assert glob == kv_full + 39 * (8 * n + 1) * 320 * 2 + n + 1
    r = bytes_report(c)
    assert r[-1]["saving"] > 9  # 256k context: ~9.6x smaller than every layer global


# ---------------------------------------------------------------------------- plain decoding
@pytest.mark.parametrize("chunk", [4, 16, 512])
def test_greedy_with_cache_is_full_forward_argmax(chunk):
    """Far past the window (9): 7 prompt tokens + 40 new; chunks below and above the ring size."""
    model = tiny_model()
    ids = torch.randint(0, 512, (1, 7), generator=torch.Generator().manual_seed(1))
    out = generate(model, ids, max_new_tokens=40, prefill_chunk=chunk)
    assert out.shape == (1, 47)
    assert full_argmax_check(model, out, 7)


def test_greedy_batched_left_padding():
    model = tiny_model()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 512, (3, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :11] = 0
    out = generate(model, ids, attention_mask=mask, max_new_tokens=30, prefill_chunk=6)
    assert full_argmax_check(model, out, 13, mask)
    for b in range(3):  # and each row alone, without padding
        alone = generate(model, ids[b:b + 1, mask[b].bool()], max_new_tokens=30)
        assert torch.equal(alone[0, -30:], out[b, -30:])


def test_decode_logits_match_full_forward():
    """Logits through the cache (chunked prefill + one-token steps) vs one full forward, past the window."""
    model = tiny_model()
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids).logits
        cache = KVCache(model.config, 2, 40, dtype=torch.float32)
        runner = Runner(model, cache, 40)
        last, _ = prefill(runner, ids[:, :12], None, 5, keep_hidden=False)
        assert torch.allclose(last, ref[:, 11], atol=1e-4)
        for t in range(12, 40):
            lg, _ = runner.main(ids[:, t:t + 1], torch.full((2, 1), t), None, t + 1)
            assert torch.allclose(lg[:, 0], ref[:, t], atol=1e-4), (t, (lg[:, 0] - ref[:, t]).abs().max())


def test_eos_and_padding_like_transformers(tmp_path):
    model = tiny_model()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 512, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    free = generate(model, ids, attention_mask=mask, max_new_tokens=12)
    eos = int(free[0, 9 + 3])  # row 0 produces it at step 4
    ours = generate(model, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    tf = transformers_twin(model, tmp_path)
    theirs = tf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                         pad_token_id=0)
    assert torch.equal(ours, theirs)
    assert ours[0, 9 + 4:].eq(0).all()  # padded after its EOS


# ---------------------------------------------------------------------------- speculative decoding
@pytest.mark.parametrize("K", [1, 2, 3])
def test_speculative_greedy_equals_plain(K):
    """Small vocabulary so that random MTP drafts are often right: both branches of acceptance run."""
    model = tiny_model(vocab_size=6)
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 6, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :10] = 0  # a 2-token prompt: MTP positions before 0 are masked
    plain = generate(model, ids, attention_mask=mask, max_new_tokens=40, prefill_chunk=5)
    out, stats = generate(model, ids, attention_mask=mask, max_new_tokens=40, num_speculative_tokens=K,
                          prefill_chunk=5, return_stats=True)
    assert torch.equal(out, plain)
    assert stats.accepted > 0 and stats.accepted < stats.drafted
    assert stats.steps < 39  # fewer verification forwards than tokens
    one = generate(model, ids[:1], max_new_tokens=40, num_speculative_tokens=K)
    assert torch.equal(one, plain[:1])


def test_speculative_chunks_of_graphed_steps_equal_plain(monkeypatch):
    """generate()'s greedy speculative steps in chunks of up to SPEC_CHUNK per graph (cuda_graphs=True runs the
    graph-shaped code on the CPU): plain greedy's tokens, on a left-padded batch, with an EOS met inside a chunk
    (rows then finish at different steps); the last steps, near the cache's end, one at a time."""
    from mimo_flash.generation import engine

    sizes = []
    orig = engine.spec_chunk_launch
    monkeypatch.setattr(engine, "spec_chunk_launch", lambda runner, st, n, frozen=None, *sampling: sizes.append(n) or
                        orig(runner, st, n, frozen, *sampling))
    model = tiny_model(vocab_size=6)
    ids = torch.randint(0, 6, (3, 12), generator=torch.Generator().manual_seed(16))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    for K in (1, 3):
        plain = generate(model, ids, attention_mask=mask, max_new_tokens=40, eos_token_id=[])
        out = generate(model, ids, attention_mask=mask, max_new_tokens=40, eos_token_id=[], num_speculative_tokens=K,
                       cuda_graphs=True)
        assert torch.equal(out, plain), K
        eos = int(plain[0, 12 + 17])
        plain = generate(model, ids, attention_mask=mask, max_new_tokens=40, eos_token_id=eos, pad_token_id=0)
        out = generate(model, ids, attention_mask=mask, max_new_tokens=40, eos_token_id=eos, pad_token_id=0,
                       num_speculative_tokens=K, cuda_graphs=True)
        assert torch.equal(out, plain), K
    # chunks whose steps cross the 256-key bucket (the graph's bucket covers the chunk's last step)
    wide = tiny_model(vocab_size=256)
    long = torch.randint(0, 256, (1, 253), generator=torch.Generator().manual_seed(17))
    plain = generate(wide, long, max_new_tokens=30, eos_token_id=[])
    assert torch.equal(generate(wide, long, max_new_tokens=30, eos_token_id=[], num_speculative_tokens=1,
                                cuda_graphs=True), plain)
    assert sizes.count(engine.SPEC_CHUNK) >= 5 and min(sizes) >= 2


def test_pipelined_speculation_runs_the_steps_of_the_synchronous_loop(monkeypatch):
    """generate() makes each speculative launch (a graphed chunk of greedy or sampled steps, or one step) before it
    reads the last one's counts: the same tokens, sampled ones included, and the same statistics as the loop that
    reads every step's counts before the next (which a `stopping` callback selects); no launch once every row is
    done (without EOS), and with EOS at most one more, whose tokens are dropped."""
    idle = []  # per chunk launched: whether every row was done before it
    orig = engine.spec_chunk_launch
    monkeypatch.setattr(engine, "spec_chunk_launch", lambda runner, st, n, frozen, *sampling:
                        idle.append(bool(frozen.all())) or orig(runner, st, n, frozen, *sampling))
    model = tiny_model(vocab_size=2)  # (two tokens: about 1.7 tokens a step, so rows may end before a chunk does)
    ids = torch.randint(0, 2, (3, 12), generator=torch.Generator().manual_seed(16))
    mask = torch.ones_like(ids)
    mask[2, :3] = 0

    def never(rows):  # (a stopping callback: the synchronous loop, one host read per step)
        return [False] * len(rows)

    for K, new_tokens, sample in ((1, 23, False), (1, 40, False), (2, 23, False), (2, 40, False), (2, 30, True)):
        kw = dict(attention_mask=mask, max_new_tokens=new_tokens, num_speculative_tokens=K, return_stats=True,
                  cuda_graphs=True, do_sample=sample, seed=5)
        ref, rs = generate(model, ids, eos_token_id=[], stopping=never, **kw)
        idle.clear()
        out, st = generate(model, ids, eos_token_id=[], **kw)
        assert torch.equal(out, ref), (K, new_tokens, sample)
        assert (st.row_steps, st.emitted, st.accepted) == (rs.row_steps, rs.emitted, rs.accepted), K
        assert st.accepted > 0
        assert st.steps == rs.steps, (K, new_tokens)  # (no chunk steps past the batch's last row)
        assert len(idle) >= 2 and not any(idle), (K, new_tokens, idle)  # (sampled steps too run as chunks)
    for sample in (False, True):
        kw["do_sample"] = sample
        eos = int(ref[1, 12 + 9])
        ref, rs = generate(model, ids, eos_token_id=eos, pad_token_id=0, stopping=never, **kw)
        out, st = generate(model, ids, eos_token_id=eos, pad_token_id=0, **kw)
        assert torch.equal(out, ref) and (st.row_steps, st.emitted) == (rs.row_steps, rs.emitted), sample
        assert rs.steps <= st.steps < rs.steps + 2 * engine.SPEC_CHUNK


@pytest.mark.parametrize("eos", [[], [3], [3, 5]])
def test_output_takes_a_chunk_of_steps_as_its_steps_one_by_one(eos):
    """Output.add_steps (a graphed chunk's n steps at once) keeps what n add() calls keep (tokens, counts, done:
    EOS cut, max_new reached mid-chunk, rows done before the chunk), and returns the rows still emitting before
    each step, as read between the calls. Without EOS, a runner's compiling glue (here torch.compile, fullgraph)
    runs add_steps' arithmetic as one traced function, in place: the same again."""
    from mimo_flash.generation.output import Output

    compiled = {}

    def glue(key, fn):
        return compiled.setdefault(key, torch.compile(fn, fullgraph=True, dynamic=False))

    g = torch.Generator().manual_seed(1)
    for trial in range(30):
        B, C, n, max_new = 5, 3, 4, 9
        one, many = (Output(B, max_new, eos, 0, None, None, "cpu") for _ in range(2))
        traced = Output(B, max_new, eos, 0, None, None, "cpu", glue)
        for chunk in range(4):
            new = torch.randint(1, 8, (n, B, C), generator=g)
            count = torch.randint(1, C + 1, (n, B), generator=g)
            active = []
            for j in range(n):
                active.append(~one.done)
                one.add(new[j], count[j])
            got = many.add_steps(new, count)
            assert torch.equal(got, torch.stack(active)), (trial, chunk)
            assert torch.equal(one.count, many.count) and torch.equal(one.done, many.done), (trial, chunk)
            assert torch.equal(one.tokens[:, :max_new], many.tokens[:, :max_new]), (trial, chunk)
            assert torch.equal(traced.add_steps(new, count), got)
            assert all(torch.equal(getattr(traced, a), getattr(many, a)) for a in ("tokens", "count", "done"))
        assert torch.equal(one.result(torch.zeros(B, 2, dtype=torch.long)),
                           many.result(torch.zeros(B, 2, dtype=torch.long)))
    assert bool(many.done.all())  # (the chunks reach every row's end: max_new or EOS)
    assert list(compiled) == ([] if eos else [("output", n, B, C)])  # (with EOS the host reads the tokens: eager)


def test_graphed_steps_with_and_without_frozen_rows_share_one_function():
    """A batch's graphed verification steps take a valid mask whether or not rows are frozen (all True when none
    is): speculative steps with EOS (rows then freeze) and without build one step function per shape, not one with
    and one without a mask (each a whole-model compile and graph on CUDA)."""
    from mimo_flash.generation import engine

    model = tiny_model(vocab_size=6)
    ids = torch.randint(0, 6, (3, 12), generator=torch.Generator().manual_seed(16))
    plain = generate(model, ids, max_new_tokens=30, eos_token_id=[])
    eos = int(plain[0, 12 + 9])
    engine._RUNNERS.pop(model, None)
    for K in (0, 1):
        for stop in ([], eos):  # no row frozen / rows frozen at the EOS
            generate(model, ids, max_new_tokens=30, eos_token_id=stop, pad_token_id=0, num_speculative_tokens=K,
                     cuda_graphs=True)
    keys = [k for r in engine._RUNNERS.pop(model).values() for k in r.fns if k[0] == "main"]
    assert any(k[2] == 2 for k in keys) and all(k[4] is False for k in keys if k[2] > 1), keys  # (k[4]: no mask)
    assert len(keys) == len({k[:4] + k[5:] for k in keys}), keys


def test_speculative_with_eos_and_repetition_penalty():
    model = tiny_model(vocab_size=6)
    ids = torch.randint(0, 6, (2, 8), generator=torch.Generator().manual_seed(7))
    for kw in (dict(eos_token_id=3, pad_token_id=5), dict(repetition_penalty=1.3)):
        plain = generate(model, ids, max_new_tokens=25, **kw)
        for K in (1, 3):
            assert torch.equal(generate(model, ids, max_new_tokens=25, num_speculative_tokens=K, **kw), plain)


def record_drafts(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A list that gets (N [B], drafts [B, k]) at every draft of speculative decoding (the state after it)."""
    log = []
    orig = spec_mod._draft

    def spy(runner, st, *rest):
        stash = orig(runner, st, *rest)
        log.append((st.N.clone(), st.drafts.clone()))
        return stash

    monkeypatch.setattr(spec_mod, "_draft", spy)
    return log


def test_mtp_drafts_follow_the_training_forward(monkeypatch):
    """The chained MTP caches hold what the training forward computes: at each step, layer k's draft is
    the argmax of the full forward's mtp_logits[k] at position N-1 whenever d_1..d_k were right."""
    model = tiny_model(vocab_size=6)
    K = 3
    log = record_drafts(monkeypatch)
    ids = torch.randint(0, 6, (1, 15), generator=torch.Generator().manual_seed(8))
    out = generate(model, ids, max_new_tokens=40, num_speculative_tokens=K)
    with torch.no_grad():
        mtp_logits = model(out, mtp=True).mtp_logits
    checked = [0] * K
    for N, d in log:
        n = int(N[0])
        for k in range(K):
            if n + k + 1 >= out.shape[1] or not torch.equal(d[0, :k], out[0, n + 1:n + 1 + k]):
                break
            assert int(d[0, k]) == int(mtp_logits[k][0, n - 1].argmax())
            checked[k] += 1
    assert len(log) > 5 and all(c > 0 for c in checked), checked


def test_rollback_keeps_the_window():
    """Ring with slack: write speculative tokens, roll back, continue: attention equals a clean cache."""
    c = MiMoConfig.preset("tiny")
    W, K = c.sliding_window, 3
    g = torch.Generator().manual_seed(9)
    swa = next(i for i in range(c.num_hidden_layers) if c.is_swa(i))
    H, D, Dv = c.swa_num_key_value_heads, c.swa_head_dim, c.swa_v_head_dim
    kv = {p: (torch.randn(1, H, 1, D, generator=g), torch.randn(1, H, 1, Dv, generator=g)) for p in range(40)}
    bad = (torch.randn(1, H, K + 1, D, generator=g), torch.randn(1, H, K + 1, Dv, generator=g))

    def put(cache, p0, k, v):
        T = k.shape[2]
        meta = cache.step(MAIN, torch.arange(p0, p0 + T)[None], None, p0 + T)
        return cache.update(swa, k, v, meta)

    clean, dirty = KVCache(c, 1, 64, slack=2 * K, dtype=torch.float32), KVCache(c, 1, 64, slack=2 * K,
                                                                                dtype=torch.float32)
    for p in range(30):
        put(clean, p, *kv[p])
        put(dirty, p, *kv[p])
        if p % 7 == 3:  # verify K + 1 wrong tokens at p+1.., reject all of them
            put(dirty, p + 1, *bad)
            dirty.rollback(torch.tensor([p + 1]))
    q = torch.randn(1, c.swa_num_attention_heads, 1, D, generator=g)
    k1, v1, m1 = put(clean, 30, *kv[30])
    k2, v2, m2 = put(dirty, 30, *kv[30])
    o1 = cache_attention(q, k1, v1, m1, 0.1, W, None)
    o2 = cache_attention(q, k2, v2, m2, 0.1, W, None)
    assert torch.allclose(o1, o2, atol=1e-6)


def peaked_model():
    """A vocabulary-4 model whose untrained MTP layers draft a distribution distinct from its peaked target (the
    sampling distribution tests), and their prompt."""
    model = tiny_model(vocab_size=4, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(60)
    return model, [1, 3, 0, 2, 2, 1]


def _target_joint(model, prompt, n, params):
    """Exact distribution of the next n tokens [V] * n under `params` (enumerating prefixes)."""
    V = model.config.vocab_size
    joint = {(): 1.0}
    for _ in range(n):
        prefixes = list(joint)
        seqs = torch.tensor([list(prompt) + list(p) for p in prefixes])
        with torch.no_grad():
            probs = process(model(seqs).logits[:, -1], params, None).softmax(-1)
        nxt = {}
        for i, p in enumerate(prefixes):
            for t in range(V):
                nxt[p + (t,)] = joint[p] * float(probs[i, t])
        joint = nxt
    return joint


def _chi2_pvalue(counts: dict, probs: dict, n: int) -> float:
    """Pearson chi-square over cells with expected count >= 5 (the rest pooled)."""
    stat, dof, rest_obs, rest_exp = 0.0, -1, 0.0, 0.0
    for cell, p in probs.items():
        e, o = n * p, counts.get(cell, 0)
        if e >= 5:
            stat += (o - e) ** 2 / e
            dof += 1
        else:
            rest_obs, rest_exp = rest_obs + o, rest_exp + e
    if rest_exp > 0:
        stat += (rest_obs - rest_exp) ** 2 / rest_exp
        dof += 1
    # survival function of chi-square via the regularised upper incomplete gamma (series / continued fraction)
    return _gammaincc(dof / 2, stat / 2)


def _gammaincc(a: float, x: float) -> float:
    if x <= 0:
        return 1.0
    if x < a + 1:  # series for P, then Q = 1 - P
        term = s = 1.0 / a
        ap = a
        for _ in range(1000):
            ap += 1
            term *= x / ap
            s += term
            if abs(term) < abs(s) * 1e-15:
                break
        return 1.0 - s * math.exp(-x + a * math.log(x) - math.lgamma(a))
    b, c, d = x + 1 - a, 1e300, 1 / (x + 1 - a)
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1e-300 if abs(d) < 1e-300 else d
        c = b + an / c
        c = 1e-300 if abs(c) < 1e-300 else c
        d = 1 / d
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return math.exp(-x + a * math.log(x) - math.lgamma(a)) * h


@pytest.mark.parametrize("K,extra", [(2, {}), (3, dict(temperature=0.8, top_p=0.9))])
def test_speculative_sampling_keeps_the_target_distribution(K, extra):
    """Joint distribution of 3 new tokens (vocab 4: 64 cells) from 6000 sampled rows vs the exact target.

    The MTP layers are untrained, so drafts disagree with the target often (both accept and reject run);
    the same test rejects the draft distribution itself (power check)."""
    model, prompt = peaked_model()
    params = SamplingParams(do_sample=True, **extra)
    target = _target_joint(model, prompt, 3, params)
    n = 6000
    out, stats = generate(model, torch.tensor([prompt] * n), max_new_tokens=3, do_sample=True,
                          num_speculative_tokens=K, seed=1234, return_stats=True, **extra)
    counts: dict = {}
    for row in out[:, -3:].tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    assert 0.02 < stats.acceptance_rate < 0.95, stats.acceptance_rate  # both branches run often
    p = _chi2_pvalue(counts, target, n)
    tv = 0.5 * sum(abs(counts.get(c, 0) / n - q) for c, q in target.items())
    assert p > 1e-3, (p, tv)
    assert tv < 0.05
    # power: the same samples reject a nearby distribution (temperature x 1.25)
    near = _target_joint(model, prompt, 3, SamplingParams(do_sample=True, **{**extra, "temperature":
                                                                             1.25 * extra.get("temperature", 1.0)}))
    assert _chi2_pvalue(counts, near, n) < 1e-6


def test_plain_sampling_distribution_and_seed():
    model, prompt = peaked_model()
    params = SamplingParams(do_sample=True, top_k=3)
    target = _target_joint(model, prompt, 2, params)
    n = 4000
    out = generate(model, torch.tensor([prompt] * n), max_new_tokens=2, do_sample=True, top_k=3, seed=7)
    counts: dict = {}
    for row in out[:, -2:].tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    assert _chi2_pvalue(counts, target, n) > 1e-3
    again = generate(model, torch.tensor([prompt] * 8), max_new_tokens=5, do_sample=True, seed=3)
    assert torch.equal(again, generate(model, torch.tensor([prompt] * 8), max_new_tokens=5, do_sample=True, seed=3))


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_sampling_stops_at_eos_read_one_step_late(cuda_graphs):
    """Sampled decoding with EOS reads the rows' done flags one step late (the next step is launched first; on a
    GraphRunner one chunk of steps late, the chunks graphed as greedy ones are): the output is the EOS-free run's
    (the same draws) cut after each row's EOS and padded, and it ends where the last row's EOS is (step by step,
    with its step count; in chunks, at most two chunks of steps later: the chunk run past it, and the one
    launched before it was read)."""
    model = tiny_model(vocab_size=16)
    ids = torch.randint(0, 16, (3, 6), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=40, do_sample=True, temperature=1.5, seed=11, cuda_graphs=cuda_graphs)
    free = generate(model, ids, eos_token_id=[], **kw)[:, 6:]
    eos = int(free[0, 4])  # row 0 meets it at step 5 at the latest
    ends = [next((j for j, t in enumerate(row) if t == eos), None) for row in free.tolist()]
    assert all(e is not None for e in ends) and len(set(ends)) > 1  # every row ends, not all at once
    out, stats = generate(model, ids, eos_token_id=eos, pad_token_id=0, return_stats=True, **kw)
    assert out.shape[1] == 6 + max(ends) + 1
    if cuda_graphs:
        assert max(ends) <= stats.steps < max(ends) + 2 * engine.GREEDY_CHUNK
        assert torch.equal(free, generate(model, ids, eos_token_id=[], **{**kw, "cuda_graphs": False})[:, 6:])
    else:
        assert stats.steps == max(ends)
    for row, e in zip(range(3), ends):
        assert torch.equal(out[row, 6:6 + e + 1], free[row, :e + 1])
        assert out[row, 6 + e + 1:].eq(0).all()


def test_graphed_greedy_starts_each_run_with_a_short_chunk(monkeypatch):
    """Plain greedy decoding on a GraphRunner (on the CPU its chunks run directly, as compiled code would) launches
    chunks of 4, 8, then GREEDY_CHUNK steps (runner.graph_steps: the GPU waits only for the short first launch),
    and gives the step-by-step tokens, with an EOS inside the first, second, third or a later chunk."""
    from mimo_flash.generation.runner import GraphRunner, graph_steps

    assert graph_steps(49, 16) == [4, 8, 16, 16, 5] and graph_steps(3, 32) == [3]
    assert graph_steps(99, 32) == [4, 8, 16, 32, 32, 7] and graph_steps(0, 16) == []
    model = tiny_model(vocab_size=64)
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(14))
    launches, real = [], GraphRunner.run_step

    def spy(self, key, *args, **kwargs):
        if key[0] == "greedy":
            launches.append(key[-1])
        return real(self, key, *args, **kwargs)

    monkeypatch.setattr(GraphRunner, "run_step", spy)
    free = generate(model, ids, max_new_tokens=50, eos_token_id=[], cuda_graphs=True)
    assert launches == [4, 8, 16, 16, 5]
    assert torch.equal(free, generate(model, ids, max_new_tokens=50, eos_token_id=[]))
    for col in (2, 9, 20, 35):
        eos = int(free[0, 10 + col])
        eager = generate(model, ids[:1], max_new_tokens=50, eos_token_id=eos)
        launches.clear()
        graphed = generate(model, ids[:1], max_new_tokens=50, eos_token_id=eos, cuda_graphs=True)
        assert torch.equal(eager, graphed), col
        assert graphed.shape[1] <= 10 + col + 1 and graphed[0, -1] == eos
        assert launches == [4, 8, 16, 16, 5][:len(launches)] and sum(launches[:-1]) < col + 1 + 16, (col, launches)


def test_processors_match_transformers():
    tr = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(3, 50, generator=g) * 3
    ids = torch.randint(0, 50, (3, 7), generator=g)
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, ids, True)
    p = SamplingParams(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.3)
    procs = tr.LogitsProcessorList([
        tr.RepetitionPenaltyLogitsProcessor(1.3), tr.TemperatureLogitsWarper(0.7), tr.TopKLogitsWarper(20),
        tr.TopPLogitsWarper(0.8), tr.MinPLogitsWarper(0.05)])
    ref = procs(ids, logits.clone())
    ours = process(logits, p, seen)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    fin = torch.isfinite(ref)
    assert torch.allclose(ours[fin], ref[fin], atol=1e-5)


def test_sample_from_probs_is_multinomials_draw():
    """The same samples as torch.multinomial(probs, 1) from the same generator state (without its host check)."""
    g = torch.Generator().manual_seed(4)
    for V in (2, 7, 300, 2048):
        probs = (torch.randn(5, V, generator=g) * 3).softmax(-1)
        for seed in range(20):
            want = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed))[:, 0]
            assert torch.equal(sample_from_probs(probs, torch.Generator().manual_seed(seed)), want)


def test_uniforms_and_samples_per_row_generator():
    """With a list of generators, row j's numbers come from generators[j] alone, as a [1, k] (or [1, V]) draw
    of its own; rows without one share the default generator."""
    probs = (torch.randn(4, 50, generator=torch.Generator().manual_seed(1)) * 2).softmax(-1)
    gens = lambda: [torch.Generator().manual_seed(3), None, torch.Generator().manual_seed(5), None]  # noqa: E731
    u = uniforms(4, 3, gens(), "cpu")
    assert torch.equal(u[0], torch.rand(1, 3, generator=torch.Generator().manual_seed(3))[0])
    assert torch.equal(u[2], torch.rand(1, 3, generator=torch.Generator().manual_seed(5))[0])
    assert ((u >= 0) & (u < 1)).all() and not torch.equal(u[1], u[3])
    t = sample_from_probs(probs, gens())
    assert t[0] == sample_from_probs(probs[:1], torch.Generator().manual_seed(3))[0]
    assert t[2] == sample_from_probs(probs[2:3], torch.Generator().manual_seed(5))[0]


def test_choose_rows_is_each_rows_own_choice():
    """A batch of rows with their own parameters, generators and seen tokens: each seeded row's token is what
    sample_token gives it alone; unseeded rows sample from their own processed distribution."""
    g = torch.Generator().manual_seed(8)
    V = 64
    logits = torch.randn(9, V, generator=g) * 3
    seen = [torch.zeros(1, V, dtype=torch.bool).index_fill_(1, torch.randint(0, V, (6,), generator=g), True)
            for _ in range(9)]
    hot = SamplingParams(True, 0.7, top_k=20, top_p=0.8, min_p=0.05)
    rows = [None,  # greedy
            (SamplingParams(True, 0.9), 11, None),
            (hot, 12, None),
            (SamplingParams(repetition_penalty=1.5), None, seen[3]),  # greedy with a penalty
            (hot, 13, None),  # the same parameters as row 2: processed with it
            (SamplingParams(True, 1.3, repetition_penalty=1.2), 14, seen[5]),
            (hot, None, None),  # unseeded
            None,
            (SamplingParams(True, 0.9), None, None)]

    def gen(r):
        return None if r is None or r[1] is None else torch.Generator().manual_seed(r[1])
    for trial in range(30):
        shift = torch.randn(9, V, generator=g)
        x = logits + shift
        got = choose_rows(x, [None if r is None else (r[0], gen(r), r[2]) for r in rows])
        for i, r in enumerate(rows):
            p, s = (SamplingParams(), None) if r is None else (r[0], r[2])
            proc = process(x[i:i + 1], p, s)
            if r is None or r[1] is not None:
                assert got[i] == sample_token(x[i:i + 1], p, s, gen(r))[0], (trial, i)
            else:
                assert torch.isfinite(proc[0, got[i]]), (trial, i)  # a token the row's warpers kept
    assert choose_rows(logits, []).shape == (0,)
    # unseeded rows follow their own distribution: the top-k = 2 row of a peaked pair, 4000 draws
    two = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    picks = choose_rows(two, [(SamplingParams(True, top_k=2), None, None)] * 4000)
    assert set(picks.tolist()) == {0, 1}
    share = (picks == 0).float().mean().item()
    assert abs(share - 1 / (1 + math.exp(-1))) < 0.03


def test_streamer_and_stopping_hooks():
    model = tiny_model()
    ids = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(11))

    class Rec:
        def __init__(self):
            self.got, self.ended = [], False

        def put(self, t):
            self.got.extend(t)

        def end(self):
            self.ended = True

    # (adaptive K with costly drafts: plain steps one by one, each token out as it comes)
    plain_k = dict(num_speculative_tokens=2, adaptive=True, step_costs=[1, 9, 9])
    want = generate(model, ids, max_new_tokens=10)
    for kw in (dict(num_speculative_tokens=0), dict(num_speculative_tokens=2), plain_k,
               dict(num_speculative_tokens="auto")):
        r = Rec()
        out = generate(model, ids, max_new_tokens=10, streamer=r, **kw)
        assert r.got == out[0, 6:].tolist() == want[0, 6:].tolist() and r.ended, kw
    stop_after = lambda rows: [len(x) >= 4 for x in rows]  # noqa: E731
    for kw in ({}, plain_k):
        out = generate(model, ids, max_new_tokens=10, stopping=stop_after, **kw)
        assert torch.equal(out, want[:, :6 + 4]), kw


# ---------------------------------------------------------------------------- errors
def test_generate_errors():
    model = tiny_model()
    ids = torch.randint(0, 512, (1, 5))
    cases = [
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "empty prompt"),
        (dict(input_ids=ids, attention_mask=torch.zeros_like(ids)), "empty prompt"),
        (dict(input_ids=ids, attention_mask=torch.tensor([[1, 1, 1, 0, 0]])), "left padding"),
        (dict(input_ids=torch.full((1, 5000), 3)), "longer than the model's max_position_embeddings"),
        (dict(input_ids=ids, max_new_tokens=5000), "exceeds the model's max_position_embeddings"),
        (dict(input_ids=ids + 1000), "outside [0, 512)"),
        (dict(input_ids=ids, temperature=0.0, do_sample=True), "temperature"),
        (dict(input_ids=ids, top_p=1.5, do_sample=True), "top_p"),
        (dict(input_ids=ids, top_k=0, do_sample=True), "top_k"),
        (dict(input_ids=ids, min_p=-0.1, do_sample=True), "min_p"),
        (dict(input_ids=ids, repetition_penalty=0.0), "repetition_penalty"),
        (dict(input_ids=ids, max_new_tokens=-1), "max_new_tokens"),
        (dict(input_ids=ids, num_speculative_tokens=4), "MTP layers"),
        (dict(input_ids=ids.repeat(2, 1), streamer=object()), "batch of one"),
        (dict(input_ids=ids, cuda_graphs="yes"), "cuda_graphs must be"),
        (dict(input_ids=torch.rand(1, 5)), "integer token ids"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=None) as e:
            generate(model, **kw)
        assert msg in str(e.value), (kw.keys(), str(e.value))


def test_logits_to_keep():
    model = tiny_model()
    ids = torch.randint(0, 512, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(ids, logits_to_keep=2).logits, model(ids).logits[:, -2:])
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, labels=ids, logits_to_keep=1)


def test_model_generate_method_and_stats():
    model = tiny_model()
    ids = torch.randint(0, 512, (2, 5))
    out, stats = model.generate(ids, max_new_tokens=4, return_stats=True)
    assert out.shape == (2, 9) and isinstance(stats, GenerationStats)
    assert stats.new_tokens == 8 and stats.cache_bytes > 0
    assert torch.equal(model.generate(ids, max_new_tokens=0), ids)


@pytest.mark.slow
def test_compiled_steps_match_eager():
    """torch.compile(fullgraph) of the decode / verify / MTP steps traces (CPU here; CUDA graphs on GPU)."""
    model = tiny_model(vocab_size=6)
    ids = torch.randint(0, 6, (2, 10), generator=torch.Generator().manual_seed(12))
    for K, rows in ((0, 1), (0, 2), (2, 2)):  # one row: GEMVs and decode attention as fused reductions
        eager = generate(model, ids[:rows], max_new_tokens=12, num_speculative_tokens=K)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            compiled = generate(model, ids[:rows], max_new_tokens=12, num_speculative_tokens=K, compile=True)
        assert torch.equal(compiled, eager)
        assert not [str(w.message) for w in seen if "falling back" in str(w.message)]  # the traced path ran


@pytest.mark.gpu
def test_cuda_graph_decode_matches_eager():
    model = tiny_model(vocab_size=6).cuda()
    ids = torch.randint(0, 6, (3, 10), generator=torch.Generator().manual_seed(13)).cuda()
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    for K in (0, 2):
        eager = generate(model, ids, attention_mask=mask, max_new_tokens=30, num_speculative_tokens=K,
                         cuda_graphs=False)
        graphed = generate(model, ids, attention_mask=mask, max_new_tokens=30, num_speculative_tokens=K,
                           cuda_graphs=True)
        assert torch.equal(eager, graphed)
        eos = int(eager[0, 10 + 13])  # (rows end at different steps; graphed chunks read their counts late)
        eager = generate(model, ids, attention_mask=mask, max_new_tokens=30, num_speculative_tokens=K,
                         eos_token_id=eos, pad_token_id=0, cuda_graphs=False)
        graphed = generate(model, ids, attention_mask=mask, max_new_tokens=30, num_speculative_tokens=K,
                           eos_token_id=eos, pad_token_id=0, cuda_graphs=True)
        assert torch.equal(eager, graphed), K


@pytest.mark.gpu
def test_cuda_graph_sampling_draws_what_eager_draws():
    """Sampled decoding in captured chunks (plain and speculative) draws inside the graphs from the runner's seeded
    generator, or the default one: the tokens equal the eager step-by-step ones, call after call (the warm-up runs
    of a capture draw nothing that counts), compiled steps too."""
    model = tiny_model(vocab_size=64).cuda()
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(15)).cuda()
    for K in (0, 1, 2):
        kw = dict(max_new_tokens=40, num_speculative_tokens=K, do_sample=True, temperature=1.2, top_p=0.9)
        for seed in (4, 5, 4):
            eager = generate(model, ids, seed=seed, cuda_graphs=False, **kw)
            assert torch.equal(eager, generate(model, ids, seed=seed, cuda_graphs=True, **kw)), (K, seed)
        if K < 2:  # compiled steps (their sampling arithmetic fused by runner.glue, the draws made outside it)
            assert torch.equal(eager, generate(model, ids, seed=4, compile=True, **kw)), K
        torch.manual_seed(8)
        eager = generate(model, ids, cuda_graphs=False, **kw)
        torch.manual_seed(8)
        assert torch.equal(eager, generate(model, ids, cuda_graphs=True, **kw)), K


@pytest.mark.gpu
def test_cuda_graph_greedy_stops_at_eos_like_eager():
    """Graphed greedy decoding checks EOS one chunk late (the next chunk runs meanwhile): the output is still
    the step-by-step one, for an EOS met in the first, third or fourth chunk (4, 8, 16, 16 steps), batch 1 and 3."""
    model = tiny_model(vocab_size=64).cuda()
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(14)).cuda()
    free = generate(model, ids, max_new_tokens=50, eos_token_id=[], cuda_graphs=True)
    for B in (1, 3):
        for col in (3, 20, 35):
            eos = int(free[0, 10 + col])
            eager = generate(model, ids[:B], max_new_tokens=50, eos_token_id=eos, cuda_graphs=False)
            graphed = generate(model, ids[:B], max_new_tokens=50, eos_token_id=eos, cuda_graphs=True)
            assert torch.equal(eager, graphed), (B, col)
            assert (graphed[0, 10:] == eos).any()
            if B == 1:
                assert graphed.shape[1] <= 10 + col + 1  # stopped at the EOS
