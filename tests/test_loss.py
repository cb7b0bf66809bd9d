"""model.loss: the one definition of the targets (shift, -100, padding, documents, MTP offsets), checked
against losses computed without it: a packed row's losses are the token-weighted means of its documents'
own losses, each document run through the model alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from loss_reference import document_loss_sums
from mimo_flash.model.loss import IGNORE, head_loss, shifted_targets, target_counts


def _loop_loss(logits, labels, shift, seg, mask):
    """The target rule written as loops over positions: mean CE, in fp64."""
    B, T, _ = logits.shape
    terms = []
    for b in range(B):
        for t in range(T - shift):
            u = t + shift
            if labels[b, u] == IGNORE:
                continue
            if seg is not None and seg[b, t] != seg[b, u]:
                continue
            if mask is not None and not (mask[b, t] and mask[b, u]):
                continue
            terms.append(F.cross_entropy(logits[b, t].double(), labels[b, u]))
    return torch.stack(terms).mean() if terms else torch.zeros((), dtype=torch.float64)


@pytest.mark.parametrize("shift", [1, 2, 4])
@pytest.mark.parametrize("segments", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_head_loss_matches_the_rule_written_as_loops(shift, segments, masked):
    g = torch.Generator().manual_seed(shift)
    B, T, V = 3, 13, 50
    base = torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 4] = IGNORE
    seg = torch.tensor([[0] * 5 + [1] * 1 + [2] * 7, [0] * 13, [0] * 3 + [1] * 10]) if segments else None
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    mask[2, 10:] = 0  # right padding
    mask = mask if masked else None
    x = base.clone().requires_grad_()
    got = head_loss(x, labels, shift, seg, mask)
    got.backward()
    ref_x = base.clone().requires_grad_()
    want = _loop_loss(ref_x, labels, shift, seg, mask)
    want.backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x.grad, ref_x.grad.float(), atol=1e-7, rtol=1e-5)
    assert (x.grad[:, T - shift:] == 0).all()
    total = head_loss(base, labels, shift, seg, mask, reduction="sum")
    n = target_counts(labels, shift, seg, mask)[:, shift - 1].sum()
    torch.testing.assert_close(total.double() / max(int(n), 1), want, atol=1e-6, rtol=1e-6)


def test_shifted_targets_rejects_mismatched_shapes():
    labels = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="segment_ids"):
        shifted_targets(labels, 1, segment_ids=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        shifted_targets(labels, 1, attention_mask=torch.ones(1, 5))
    with pytest.raises(ValueError, match="shift"):
        shifted_targets(labels, 0)
    assert (shifted_targets(labels, 5) == IGNORE).all() and shifted_targets(labels, 5).shape == (2, 5)


# several documents of different lengths: 1 and 2 are shorter than every MTP offset (2, 3, 4), 3 than two of them
LENGTHS = [[9, 1, 14, 2, 3, 11], [20, 4, 2, 14], [40]]


@pytest.mark.parametrize("lengths", LENGTHS)
def test_packed_row_losses_are_token_weighted_means_of_document_losses(lengths):
    model = tiny_model(seed=3)  # fp32; 3 MTP layers (offsets 2, 3, 4)
    K = model.config.num_nextn_predict_layers
    assert K == 3
    g = torch.Generator().manual_seed(sum(lengths) + len(lengths))
    T = sum(lengths)
    row = torch.randint(0, model.config.vocab_size, (T,), generator=g)
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    pos = torch.cat([torch.arange(n) for n in lengths])
    labels = row.clone()
    labels[3] = IGNORE  # the caller's own mask still applies
    sums, counts = document_loss_sums(model, row, seg, labels, K)
    with torch.no_grad():
        out = model(row[None], position_ids=pos[None], segment_ids=seg[None], labels=labels[None], mtp=True)
    assert len(out.mtp_losses) == K
    assert out.lm_loss.item() == pytest.approx(sums[0] / counts[0], abs=1e-6, rel=1e-6)
    for k in range(K):
        want = sums[1 + k] / counts[1 + k] if counts[1 + k] else 0.0
        assert out.mtp_losses[k].item() == pytest.approx(want, abs=1e-6, rel=1e-6), f"MTP layer {k}"
    assert out.loss.item() == pytest.approx(
        sums[0] / counts[0] + model.config.mtp_loss_weight * sum(s / c for s, c in zip(sums[1:], counts[1:],
                                                                                         strict=True)) / K,
        abs=1e-6, rel=1e-6)


def test_padded_rows_lose_what_their_tokens_alone_lose():
    """Left and right padding (attention_mask 0) neither predict nor are predicted: each row's losses are
    those of its tokens run alone."""
    model = tiny_model(seed=4)
    K = model.config.num_nextn_predict_layers
    g = torch.Generator().manual_seed(7)
    T = 16
    ids = torch.randint(0, model.config.vocab_size, (2, T), generator=g)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[0, :5] = 0  # left padding
    mask[1, 11:] = 0  # right padding
    sums, counts = [0.0] * (1 + K), [0] * (1 + K)
    for b in range(2):
        real = mask[b].bool()
        s, c = document_loss_sums(model, ids[b][real], torch.zeros(int(real.sum()), dtype=torch.long),
                                  ids[b][real], K)
        sums = [a + x for a, x in zip(sums, s, strict=True)]
        counts = [a + x for a, x in zip(counts, c, strict=True)]
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=ids, mtp=True)
    got = [out.lm_loss.item()] + [m.item() for m in out.mtp_losses]
    want = [s / c for s, c in zip(sums, counts, strict=True)]
    assert got == pytest.approx(want, abs=1e-6, rel=1e-6)
