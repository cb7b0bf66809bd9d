"""Context parallelism on CPU with gloo: 2 and 4 processes each hold a zigzag shard of the sequence; attention
outputs and the gradients of q, k, v and the sink, and a whole model's losses and gradients (MTP included),
equal one process's (fp32, 1e-5), alone and combined with FSDP2 over the same ranks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from harness import run_ranks
from mimo_flash.distributed.context_parallel import (ContextParallel, apply_context_parallel, cp_loss, shard,
                                                     shard_batch, unshard, zigzag_index)
from mimo_flash.ops.attention import AttnMeta, attention

TOL = 1e-5
# (seq_len, window or None, sink, packed documents, backend); window 9 -> a halo of 8 keys
ATTN_CASES = [
    (48, 9, True, True, "auto"),  # halo within one chunk at 2 ranks (C = 12), over two at 4 ranks (C = 6)
    (48, 9, True, False, "reference"),
    (40, 9, False, True, "auto"),  # 4 ranks: C = 5, the halo spans two chunks
    (24, 17, True, True, "auto"),  # halo longer than a whole shard: from up to four chunks
    (48, None, True, True, "auto"),
    (40, None, False, False, "auto"),
]


def _segments(B: int, T: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed documents of random lengths: positions restart at 0 in each. -> positions, segments [B, T]."""
    pos, seg = torch.empty(B, T, dtype=torch.long), torch.empty(B, T, dtype=torch.long)
    for b in range(B):
        t, s = 0, 0
        while t < T:
            n = min(int(torch.randint(3, 30, (1,), generator=g)), T - t)
            pos[b, t:t + n], seg[b, t:t + n] = torch.arange(n), s
            t, s = t + n, s + 1
    return pos, seg


def _attention_case(cp: ContextParallel, T: int, window, use_sink: bool, packed: bool, backend: str) -> dict:
    g = torch.Generator().manual_seed(T * 7 + (window or 0))
    B, H, Hkv, Dqk, Dv = 2, 4, 2, 12, 8
    q, k = torch.randn(B, H, T, Dqk, generator=g), torch.randn(B, Hkv, T, Dqk, generator=g)
    v, go = torch.randn(B, Hkv, T, Dv, generator=g), torch.randn(B, H, T, Dv, generator=g)
    sink = torch.randn(H, generator=g) if use_sink else None
    if packed:
        pos, seg = _segments(B, T, g)
    else:
        pos, seg = torch.arange(T).expand(B, T), None
    scale = Dqk ** -0.5

    # one process, the whole sequence
    leaves = [t.clone().requires_grad_() for t in (q, k, v)] + ([sink.clone().requires_grad_()] if use_sink else [])
    meta = AttnMeta(q_pos=pos, k_pos=pos, q_seg=seg, k_seg=seg, plain=not packed)
    ref = attention(*leaves[:3], meta, scale, window, leaves[3] if use_sink else None, backend)
    (ref * go).sum().backward()

    # the CP group, each rank its shard
    local = [cp.shard(t, 2).requires_grad_() for t in (q, k, v)] + ([sink.clone().requires_grad_()] if use_sink else [])
    lpos, lseg = cp.shard(pos), cp.shard(seg) if seg is not None else None
    lmeta = AttnMeta(q_pos=lpos, k_pos=lpos, q_seg=lseg, k_seg=lseg)
    att = apply_context_parallel(_Holder(), cp).attn.context_parallel
    out = att.attention(*local[:3], lmeta, scale, window, local[3] if use_sink else None, backend)
    (out * cp.shard(go, 2)).sum().backward()
    diffs = {"out": (out - cp.shard(ref, 2)).abs().max()}
    for name, a, b in zip("qkv", local[:3], leaves[:3], strict=True):
        diffs[f"d{name}"] = (a.grad - cp.shard(b.grad, 2)).abs().max()
    if use_sink:
        dist.all_reduce(local[3].grad)
        diffs["dsink"] = (local[3].grad - leaves[3].grad).abs().max()
    # the whole output put back together equals the reference too
    diffs["gathered"] = (cp.gather(out.detach(), 2) - ref).abs().max()
    return {k: float(v.detach()) for k, v in diffs.items()}


class _Holder(torch.nn.Module):
    """A module holding one Attention, for apply_context_parallel."""

    def __init__(self):
        super().__init__()
        from mimo_flash import MiMoConfig
        from mimo_flash.model.attention import Attention

        self.attn = Attention(MiMoConfig.preset("tiny"), 0, swa=True)


def _model_case(cp: ContextParallel) -> dict:
    from conftest import tiny_model

    model = tiny_model(seed=3, num_hidden_layers=6).train()
    assert {layer.swa for layer in model.model.layers} == {True, False}
    g = torch.Generator().manual_seed(5)
    B, T = 2, 48
    ids = torch.randint(3, model.config.vocab_size, (B, T), generator=g)
    pos, seg = _segments(B, T, g)
    labels = ids.masked_fill(torch.rand(B, T, generator=g) < 0.2, -100)
    out = model(ids, labels=labels, position_ids=pos, segment_ids=seg, mtp=True)
    out.loss.backward()

    twin = copy.deepcopy(model)
    twin.zero_grad()
    apply_context_parallel(twin, cp)
    batch = shard_batch(cp, ids, labels, pos, seg, n_mtp=model.config.num_nextn_predict_layers)
    res = cp_loss(twin, cp, batch)
    res.loss.backward()
    diffs = {"loss": abs(float(res.total - out.loss)), "lm_loss": abs(float(res.lm_loss - out.lm_loss))}
    diffs["mtp_losses"] = max(abs(float(a - b)) for a, b in zip(res.mtp_losses, out.mtp_losses, strict=True))
    worst = 0.0
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None, name
        dist.all_reduce(q.grad)
        worst = max(worst, float((p.grad - q.grad).abs().max()))
    diffs["param_grads"] = worst
    # the summed CEs per head (what the Trainer divides by its step's counts): each rank's local sums add up to
    # one process's sums of model.loss.head_loss
    from mimo_flash.distributed.context_parallel import cp_head_sums
    from mimo_flash.model.loss import head_loss

    with torch.no_grad():
        heads = [out.logits] + out.mtp_logits
        expect = torch.stack([head_loss(lg, labels, s, seg, reduction="sum") for s, lg in enumerate(heads, start=1)])
        got = torch.stack(cp_head_sums(twin, batch))
        dist.all_reduce(got)
    diffs["head_sums"] = float((got - expect).abs().max() / expect.abs().max())

    # combined with FSDP2 over the same ranks (cp_loss calls the model's parts, so each part the loss path calls
    # directly is a unit of its own: MiMoModel reads model.norm.weight itself; mtp_step calls embed_tokens,
    # lm_head and final_layernorm); FSDP averages the gradients over its ranks, hence the factor
    from torch.distributed.fsdp import fully_shard

    sharded = copy.deepcopy(model)
    sharded.zero_grad()
    apply_context_parallel(sharded, cp)
    m = sharded
    for unit in ([m.model.embed_tokens, m.lm_head] + [layer.final_layernorm for layer in m.model.mtp.layers]
                 + list(m.model.layers) + list(m.model.mtp.layers) + [m.model, m]):
        fully_shard(unit)
    res = cp_loss(sharded, cp, batch)
    res.loss.backward()
    diffs["fsdp_loss"] = abs(float(res.total - out.loss))
    diffs["fsdp_param_grads"] = max(float((p.grad - cp.world * q.grad.full_tensor()).abs().max())
                                    for p, q in zip(model.parameters(), sharded.parameters(), strict=True))
    diffs["n_mtp"] = len(res.mtp_losses)
    return diffs


def _rank(rank: int, world: int) -> dict:
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cp = ContextParallel()
    res = {case: _attention_case(cp, *case) for case in ATTN_CASES}
    res["model"] = _model_case(cp)
    return res


@pytest.fixture(scope="module", params=[2, 4])
def cp_results(request):
    world = request.param
    return world, run_ranks(_rank, world)  # fork: this process never starts a process group or CUDA


@pytest.mark.parametrize("case", ATTN_CASES, ids=[f"T{c[0]}-W{c[1]}-sink{int(c[2])}-packed{int(c[3])}-{c[4]}"
                                                   for c in ATTN_CASES])
def test_attention_matches_one_process(cp_results, case):
    world, results = cp_results
    for r in range(world):
        d = results[r][case]
        expect = {"out", "dq", "dk", "dv", "gathered"} | ({"dsink"} if case[2] else set())
        assert set(d) == expect
        assert max(d.values()) <= TOL, (r, d)


def test_model_loss_and_gradients_match_one_process(cp_results):
    world, results = cp_results
    for r in range(world):
        d = results[r]["model"]
        assert d.pop("n_mtp") == 3
        assert max(d.values()) <= TOL, (r, d)


def test_shard_unshard_roundtrip_and_balance():
    x = torch.arange(2 * 48).view(2, 48)
    for world in (1, 2, 3, 4):
        parts = [shard(x, world, r) for r in range(world)]
        assert all(p.shape == (2, 48 // world) for p in parts)
        torch.testing.assert_close(unshard(parts), x)
        # zigzag: rank r holds chunks r and 2N-1-r, so every rank's causal work (sum of positions + 1) is equal
        work = [int((zigzag_index(48, world, r) + 1).sum()) for r in range(world)]
        assert len(set(work)) == 1, work
    idx = torch.cat([zigzag_index(48, 4, r) for r in range(4)])
    assert sorted(idx.tolist()) == list(range(48))


def test_sequence_length_must_divide_into_chunks():
    with pytest.raises(ValueError, match="divisible by 2 \\* 4 = 8"):
        zigzag_index(44, 4, 0)
    with pytest.raises(ValueError, match="divisible"):
        shard(torch.zeros(1, 30), 4, 1)
