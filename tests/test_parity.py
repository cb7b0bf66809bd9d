"""Logit parity with transformers 5.23.0 MiMoV2FlashForCausalLM (fp32, CPU, same weights).

The transformers twin is built by loading a directory our save_pretrained wrote, so every test here
also checks that such a directory loads in transformers and means the same model.
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model, transformers_twin

TOL = 1e-4
W = 9  # the tiny preset's window (keys per SWA query)


def compare(ours, theirs, ids, backend="auto", attention_mask=None, position_ids=None):
    """Max abs logit difference over real tokens, and the two losses."""
    ours.set_backends(attention=backend)
    labels = ids if attention_mask is None else ids.masked_fill(attention_mask == 0, -100)
    with torch.no_grad():
        a = ours(ids, attention_mask=attention_mask, labels=labels)
        b = theirs(ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels)
    keep = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    diff = (a.logits - b.logits)[keep].abs().max().item()
    return diff, a.loss, b.loss


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("T", [1, 5, W, 3 * W])
def test_lengths_around_the_window(tmp_path, backend, T):
    ours = tiny_model(seed=T)
    theirs = transformers_twin(ours, tmp_path)
    ids = torch.randint(0, ours.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(T))
    diff, la, lb = compare(ours, theirs, ids, backend)
    assert diff <= TOL
    if T > 1:
        assert abs(la.item() - lb.item()) <= 1e-5


@pytest.mark.parametrize("overrides", [
    dict(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2),
    dict(norm_topk_prob=False),
    dict(routed_scaling_factor=2.5),
    dict(norm_topk_prob=False, routed_scaling_factor=0.5, n_routed_experts=16, num_experts_per_tok=3,
         n_group=2, topk_group=1),
    dict(sliding_window=6),  # a vLLM-style window (previous tokens only) is a config choice
    dict(num_hidden_layers=7, hybrid_layer_pattern=[0, 1, 1, 0, 1, 1, 0], moe_layer_freq=[0, 1, 1, 1, 0, 1, 1]),
], ids=["grouped-routing", "no-norm-topk", "scaled", "grouped-unnormed-scaled", "window-6", "custom-pattern"])
def test_router_and_layout_variants(tmp_path, overrides):
    ours = tiny_model(seed=1, **overrides)
    theirs = transformers_twin(ours, tmp_path)
    ids = torch.randint(0, ours.config.vocab_size, (3, 2 * W + 4), generator=torch.Generator().manual_seed(1))
    for backend in ("reference", "auto"):
        diff, la, lb = compare(ours, theirs, ids, backend)
        assert diff <= TOL, backend
        assert abs(la.item() - lb.item()) <= 1e-5


def test_left_padding_matches_transformers_and_running_alone(tmp_path):
    ours = tiny_model(seed=2)
    theirs = transformers_twin(ours, tmp_path)
    g = torch.Generator().manual_seed(2)
    lengths = [3 * W, W + 2, 1, 5]
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    rows = []
    for r, n in enumerate(lengths):
        row = torch.randint(1, ours.config.vocab_size, (n,), generator=g)
        rows.append(row)
        ids[r, T - n:] = row
        mask[r, T - n:] = 1
    # transformers does not derive positions from the mask; hand it the ones each row has alone
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    for backend in ("reference", "auto"):
        diff, la, lb = compare(ours, theirs, ids, backend, attention_mask=mask, position_ids=pos)
        assert diff <= TOL
        # transformers also scores the prediction made at the last padding position; ours does not
        labels = ids.masked_fill(mask == 0, -100)
        labels[torch.arange(len(lengths)), T - torch.tensor(lengths)] = -100
        with torch.no_grad():
            lb = theirs(ids, attention_mask=mask, position_ids=pos, labels=labels).loss
        assert abs(la.item() - lb.item()) <= 1e-5
        with torch.no_grad():
            batched = ours(ids, attention_mask=mask).logits
            for r, row in enumerate(rows):
                alone = ours(row[None]).logits[0]
                assert (batched[r, T - len(row):] - alone).abs().max().item() <= 1e-5
