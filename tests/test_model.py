"""The model beyond transformers' reach: MTP against SPEC.md's formula, routing, dtypes, I/O, training hooks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from mimo_flash import MiMoConfig, MiMoForCausalLM
from mimo_flash.ops.moe import experts, route


def rms(x, w, eps):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def rope(x, pos, theta, r):
    """NeoX partial rotation of the first r dims of x [T, H, D] at positions pos [T]."""
    inv = 1.0 / theta ** (torch.arange(0, r, 2, dtype=torch.float64) / r)
    ang = pos[:, None].double() * inv  # [T, r/2]
    c, s = ang.cos()[:, None], ang.sin()[:, None]
    x1, x2, rest = x[..., : r // 2], x[..., r // 2: r], x[..., r:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], dim=-1)


def mtp_by_formula(model: MiMoForCausalLM, ids: torch.Tensor, h_main: torch.Tensor) -> list[torch.Tensor]:
    """SPEC.md's MTP written out in float64 for one sequence ids [T]; h_main [T, D] after model.norm."""
    c = model.config
    P = {n: p.detach().double() for n, p in model.named_parameters()}
    T = ids.shape[0]
    emb = P["model.embed_tokens.weight"]
    d = c.attn_dims(True)
    H, KV, Dq, Dv, W, r = d["heads"], d["kv_heads"], d["qk_dim"], d["v_dim"], d["window"], d["rotary_dim"]
    pos = torch.arange(T)
    h_prev, out = h_main.double(), []
    for k in range(c.num_nextn_predict_layers):
        p = lambda n: P[f"model.mtp.layers.{k}.{n}"]
        nxt = torch.cat([ids[k + 1:], torch.zeros(k + 1, dtype=torch.long)])  # token t + k + 1
        h = torch.cat([rms(emb[nxt], p("enorm.weight"), c.rms_norm_eps),
                       rms(h_prev, p("hnorm.weight"), c.rms_norm_eps)], -1) @ p("eh_proj.weight").T
        x = rms(h, p("input_layernorm.weight"), c.rms_norm_eps)
        wq, wk, wv = p("self_attn.qkv_proj.weight").split([H * Dq, KV * Dq, KV * Dv])  # rows q, k, v
        q = rope((x @ wq.T).view(T, H, Dq), pos, c.swa_rope_theta, r)
        kk = rope((x @ wk.T).view(T, KV, Dq), pos, c.swa_rope_theta, r)
        v = (x @ wv.T).view(T, KV, Dv) * c.attention_value_scale
        sink = p("self_attn.attention_sink_bias")
        att = torch.zeros(T, H, Dv, dtype=torch.float64)
        for i in range(T):
            js = torch.arange(max(0, i - W + 1), i + 1)
            for hh in range(H):
                a = (kk[js, hh // (H // KV)] @ q[i, hh]) / Dq ** 0.5
                pr = a.exp() / (a.exp().sum() + sink[hh].exp())
                att[i, hh] = pr @ v[js, hh // (H // KV)]
        h = h + att.reshape(T, H * Dv) @ p("self_attn.o_proj.weight").T
        x = rms(h, p("pre_mlp_layernorm.weight"), c.rms_norm_eps)
        wg, wu = p("mlp.gate_up_proj.weight").chunk(2)  # gate rows, then up rows
        g, u = x @ wg.T, x @ wu.T
        h = h + (F.silu(g) * u) @ p("mlp.down_proj.weight").T
        out.append(rms(h, p("final_layernorm.weight"), c.rms_norm_eps) @ P["lm_head.weight"].T)
        h_prev = h
    return out


def test_mtp_matches_the_formula_and_its_loss():
    model = tiny_model(seed=3)
    T = 2 * model.config.sliding_window + 3
    ids = torch.randint(0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(ids, labels=ids, mtp=True)
    assert len(out.mtp_logits) == 3
    for b in range(2):
        want = mtp_by_formula(model, ids[b], out.hidden_states[b])
        for k in range(3):
            assert (out.mtp_logits[k][b].double() - want[k]).abs().max().item() < 1e-4
    for k in range(3):  # layer k at t predicts token t + k + 2
        ce = F.cross_entropy(out.mtp_logits[k][:, : T - k - 2].reshape(-1, model.config.vocab_size),
                             ids[:, k + 2:].reshape(-1))
        torch.testing.assert_close(out.mtp_losses[k], ce)
    lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, model.config.vocab_size), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.lm_loss, lm)
    torch.testing.assert_close(out.loss, lm + 0.3 * torch.stack(out.mtp_losses).mean())
    plain = model(ids, labels=ids)
    assert plain.mtp_logits == [] and torch.equal(plain.loss, out.lm_loss)


def test_router_bias_only_chooses():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 16, generator=g), torch.randn(8, 16, generator=g)
    bias = torch.zeros(8)
    bias[6] = 100.0  # expert 6 always chosen, but weighed by its own score
    idx, wt, scores = route(x, w, bias, top_k=2, n_group=1, topk_group=1, norm_topk_prob=False, scaling=1.0)
    s = torch.sigmoid(x @ w.T)
    assert (idx == 6).any(-1).all()
    torch.testing.assert_close(wt, s.gather(1, idx))
    other = s.clone()
    other[:, 6] = -1
    assert set(map(tuple, idx.sort(-1).values.tolist())) == {
        tuple(sorted((6, j))) for j in other.argmax(-1).tolist()}
    idx, wt, _ = route(x, w, torch.zeros(8), 3, 4, 2, True, 2.5)
    torch.testing.assert_close(wt.sum(-1), torch.full((5,), 2.5))
    groups = idx // 2
    assert all(len(set(r)) <= 2 for r in groups.tolist())  # experts from at most topk_group groups


def test_expert_backends_agree():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 16, generator=g, dtype=torch.float64)
    gate_up, down = torch.randn(6, 20, 16, generator=g, dtype=torch.float64), torch.randn(6, 16, 10, generator=g,
                                                                                         dtype=torch.float64)
    idx = torch.stack([torch.randperm(6, generator=g)[:3] for _ in range(37)])
    w = torch.rand(37, 3, generator=g, dtype=torch.float64)
    ref = experts(x, idx, w, gate_up, down, "reference")
    manual = torch.zeros_like(x)
    for t in range(37):
        for j in range(3):
            e = idx[t, j]
            gg, uu = (gate_up[e] @ x[t]).chunk(2)
            manual[t] += w[t, j] * (down[e] @ (F.silu(gg) * uu))
    torch.testing.assert_close(ref, manual)
    torch.testing.assert_close(experts(x, idx, w, gate_up, down, "grouped"), ref)
    with pytest.raises(ValueError, match="unknown expert backend"):
        experts(x, idx, w, gate_up, down, "nope")


def test_bf16_keeps_router_in_fp32_and_runs():
    model = tiny_model().to(torch.bfloat16)
    gate = model.model.layers[1].mlp.gate
    assert gate.weight.dtype == torch.float32 and gate.e_score_correction_bias.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 512, (2, 20))
    out = model(ids, labels=ids, mtp=True)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)


def test_init_and_gradients_reach_every_parameter():
    model = MiMoForCausalLM(MiMoConfig.preset("tiny")).train()
    std = model.config.initializer_range
    assert abs(model.model.embed_tokens.weight.std().item() - std) < 0.1 * std
    assert abs(model.model.layers[1].mlp.experts.gate_up_proj.std().item() - std) < 0.1 * std
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    assert not model.model.layers[1].mlp.gate.e_score_correction_bias.any()
    ids = torch.randint(0, 512, (2, 30))
    model(ids, labels=ids, mtp=True).loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    loads = [m.expert_load for m in model.modules() if hasattr(m, "expert_load") and m.expert_load is not None]
    assert len(loads) == 5 and all(int(l.sum()) == 2 * 30 * 2 for l in loads)


@pytest.mark.parametrize("shard", ["5GB", "200KB"])
def test_save_load_round_trip_is_exact(tmp_path, shard):
    model = tiny_model(seed=4)
    model.save_pretrained(tmp_path / "ck", max_shard_size=shard)
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert ("model.safetensors.index.json" in files) == (shard == "200KB")
    again = MiMoForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32)
    for (n, a), (m, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert n == m and torch.equal(a, b), n
    ids = torch.randint(0, 512, (1, 25))
    assert torch.equal(model(ids, mtp=True).mtp_logits[2], again(ids, mtp=True).mtp_logits[2])


def test_bad_inputs():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, seq\]"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(torch.ones(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 3))


def test_router_stays_fp32_under_autocast():
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(64, 32, generator=g), torch.randn(16, 32, generator=g)
    want = route(x, w, torch.zeros(16), 4, 1, 1, True, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = route(x, w, torch.zeros(16), 4, 1, 1, True, 1.0)
    assert got[2].dtype == torch.float32
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=0)


def test_moe_leaves_out_tokens_that_are_not_there():
    """MoE(x, present): the absent tokens' output is exactly 0, the others' what they are without the mask, with
    both router paths (the default's, and route_decode's ranks); their choices still count in expert_load.
    Through the model, a left-padded row's tokens keep the logits they have alone."""
    from mimo_flash.model.moe import MoE
    from mimo_flash.options import override
    model = tiny_model(3)
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    x = torch.randn(2, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    present = torch.rand(2, 7, generator=torch.Generator().manual_seed(1)) > 0.4
    assert present.any() and not present.all()
    for router in ("auto", "decode"):
        with override(router=router):
            full, part = moe(x), moe(x, present)
        assert torch.equal(part[~present], torch.zeros_like(part[~present]))
        torch.testing.assert_close(part[present], full[present], rtol=0, atol=0)
    moe.train()
    moe(x, present)
    assert int(moe.expert_load.sum()) == x.shape[0] * x.shape[1] * model.config.num_experts_per_tok
    moe.eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    out = model(ids, attention_mask=mask).logits
    alone = model(ids[:1, 4:]).logits
    torch.testing.assert_close(out[0, 4:], alone[0], rtol=1e-5, atol=1e-5)
