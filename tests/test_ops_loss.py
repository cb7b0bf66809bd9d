"""ops.loss.cross_entropy_sum (the loss that never builds fp32 logits) against F.cross_entropy on
logits.float(), values and gradients, on CPU; and the model's return_logits=False training path.
The Triton kernels of the same formulas (ops/kernels/loss.py): test_ops_gpu.py (and the interpreter test at
the end)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import run_in_triton_interpreter
from mimo_flash import MiMoConfig, MiMoForCausalLM
from mimo_flash.ops import loss as loss_mod
from mimo_flash.ops.loss import cross_entropy_sum


def reference(logits, targets):
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                           reduction="sum")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("inplace", [False, True])
def test_cross_entropy_sum_matches_f_cross_entropy(dtype, inplace, monkeypatch):
    monkeypatch.setattr(loss_mod, "CHUNK_ROWS", 7)  # several chunks and a ragged last one
    g = torch.Generator().manual_seed(0)
    N, V = 45, 301
    base = (torch.randn(N, V, generator=g) * 3).to(dtype)
    t = torch.randint(0, V, (N,), generator=g)
    t[::5] = -100
    grad_out = torch.tensor(0.37)
    want_leaf = base.clone().requires_grad_()
    want = reference(want_leaf, t)
    (want * grad_out).backward()
    leaf = base.clone().requires_grad_()
    x = leaf * 1  # a non-leaf the backward may overwrite
    got = cross_entropy_sum(x, t, inplace=inplace)
    (got * grad_out).backward()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype != torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    assert leaf.grad.dtype == dtype
    # same gradient as autograd's fp32 softmax cast back to the logits' dtype
    torch.testing.assert_close(leaf.grad, want_leaf.grad, atol=1e-6 if dtype != torch.bfloat16 else 4e-3, rtol=0)
    assert (leaf.grad[::5] == 0).all()  # ignored rows get no gradient
    if inplace:
        assert torch.equal(x.detach(), leaf.grad)  # the gradient was written over the logits
    else:
        assert torch.equal(x.detach(), base * 1)


def test_cross_entropy_sum_no_targets_and_3d():
    x = torch.randn(2, 5, 11, requires_grad=True)
    t = torch.full((2, 5), -100)
    got = cross_entropy_sum(x, t)
    got.backward()
    assert got.item() == 0 and (x.grad == 0).all()
    t = torch.randint(0, 11, (2, 5))
    torch.testing.assert_close(cross_entropy_sum(x, t), reference(x, t))
    with pytest.raises(ValueError):
        cross_entropy_sum(x, t[:, :4])


@pytest.mark.parametrize("mtp", [False, True])
def test_return_logits_false_gives_the_same_loss_and_gradients(mtp):
    cfg = MiMoConfig.preset("tiny", num_nextn_predict_layers=2)
    torch.manual_seed(0)
    model = MiMoForCausalLM(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    results = []
    for keep in (True, False):
        m = copy.deepcopy(model)
        out = m(ids, attention_mask=mask, labels=ids, mtp=mtp, return_logits=keep)
        out.loss.backward()
        results.append((out, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = results
    assert b.logits is None and b.mtp_logits == [] and a.logits is not None
    assert len(b.mtp_losses) == (2 if mtp else 0)
    torch.testing.assert_close(b.loss, a.loss, atol=0, rtol=0)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], atol=1e-6, rtol=1e-5, msg=n)
    with pytest.raises(ValueError):
        model(ids, return_logits=False)


_INTERPRETED = r'''
import os
os.environ["TRITON_INTERPRET"] = "1"
import torch, torch.nn.functional as F
from mimo_flash.ops.kernels.loss import CE_FWD_BLOCK, ce_backward, ce_forward
g = torch.Generator().manual_seed(0)
# rows of 2.25 blocks (the forward's loop over blocks, a partial last one), of one block, of less than one
for N, V in ((3, CE_FWD_BLOCK * 9 // 4), (5, 64), (4, 1000)):
    x = torch.randn(N, V, generator=g) * 4
    t = torch.randint(0, V, (N,), generator=g)
    t[1] = -100
    lse, rows = ce_forward(x, t, -100)
    leaf = x.clone().requires_grad_()
    want = F.cross_entropy(leaf, t, ignore_index=-100, reduction="none")
    (want.sum() * 0.5).backward()
    assert torch.allclose(rows, want, atol=1e-5), (rows, want)
    assert torch.allclose(lse, x.logsumexp(-1), atol=1e-5)
    out = torch.empty_like(x)
    ce_backward(x, t, lse, torch.tensor(0.5), out, -100)
    assert torch.allclose(out, leaf.grad, atol=1e-6), (out - leaf.grad).abs().max()
    ce_backward(x, t, lse, torch.tensor(0.5), x, -100)  # in place
    assert torch.allclose(x, leaf.grad, atol=1e-6)
print("ok")
'''


def test_cross_entropy_triton_kernels_in_the_interpreter():
    """The two Triton cross-entropy kernels in Triton's CPU interpreter, fp32, against F.cross_entropy."""
    run_in_triton_interpreter(_INTERPRETED)
