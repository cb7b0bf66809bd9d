"""The Trainer with context parallelism (CPU, gloo): cp 2 on 2 ranks (activation checkpointing: the recomputation
repeats the halo exchange and K/V gather), and cp 2 x 2 data-parallel groups on 4 ranks
(FSDP2 over all 4, experts split over 2 with EP), each from a meta-built model filled by the seeded init; the step's
loss parts and every parameter's gradient equal one process's (fp32, 1e-5), and so does the loss curve."""

from __future__ import annotations

import pytest
import torch

from harness import run_ranks
from mimo_flash import MiMoConfig, MiMoForCausalLM
from mimo_flash.distributed.materialize import SeededInit
from mimo_flash.training import Document, TrainConfig, Trainer, init_distributed, pack_documents

TOL = 1e-5
STEPS = 3
SEQ = 64  # divisible by 2 * cp


def _rows():
    g = torch.Generator().manual_seed(2)
    docs = [Document(torch.randint(3, 300, (n,), generator=g).tolist()) for n in [50, 70, 120, 33, 90, 21] * 2]
    return pack_documents(docs, SEQ)


def _meta_model():
    with torch.device("meta"):
        # 6 layers, SWA (window 9: halos of 8 keys) and full ones; 3 MTP layers
        return MiMoForCausalLM(MiMoConfig.preset("tiny"))


def _cfg(dp: int, ac: bool = False) -> TrainConfig:
    # 4 rows a step whatever the layout: 2 micro-batches of 2 // dp rows on each data-parallel rank
    return TrainConfig(steps=STEPS, batch_size=2 // dp, grad_accum=2, warmup_steps=1, lr=3e-3,
                       bias_update_rate=1e-2, progress=False, plot=False, activation_checkpointing=ac)


def _run(trainer: Trainer) -> dict:
    from torch.distributed.tensor import DTensor

    parts, denom, _ = trainer.compute_gradients()
    trainer.ctx.all_reduce_(parts)
    from mimo_flash.distributed.training import parameter_name

    grads = {parameter_name(n): (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
             for n, p in trainer.model.named_parameters()}
    trainer.optimizer.zero_grad(set_to_none=True)
    curve = [(r["loss"], r["lm_loss"], r["grad_norm"], r["load_maxvio"]) for r in trainer.fit()]
    return {"parts": parts / denom.double(), "grads": grads, "curve": curve}


def _rank(rank: int, world: int, cp: int, ep: int, ac: bool) -> dict:
    ctx = init_distributed(ep=ep, device="cpu", cp=cp)
    tr = Trainer(_meta_model(), _rows(), _cfg(ctx.dp_world, ac), ctx, init=SeededInit(7))
    assert tr.cp is not None and tr.cp.world == cp
    res = {k: v.numpy() if torch.is_tensor(v) else v for k, v in _run(tr).items()}  # by value through the queue
    res["grads"] = {n: g.numpy() for n, g in res["grads"].items()}
    return res


@pytest.fixture(scope="module")
def one_process():
    return _run(Trainer(_meta_model(), _rows(), _cfg(1), init=SeededInit(7)))


@pytest.mark.parametrize("world,cp,ep,ac", [(2, 2, 1, True), (4, 2, 2, False)],
                         ids=["cp2-activation-checkpointing", "cp2xdp2-ep2"])
def test_trainer_with_context_parallelism_matches_one_process(one_process, world, cp, ep, ac):
    results = run_ranks(_rank, world, cp, ep, ac, timeout=300)  # fork: this process never starts a process group
    want = one_process
    assert len(want["parts"]) == 4  # the main head and 3 MTP layers
    for r in range(world):
        got = results[r]
        got["parts"] = torch.from_numpy(got["parts"])
        got["grads"] = {n: torch.from_numpy(g) for n, g in got["grads"].items()}
        assert (got["parts"] - want["parts"]).abs().max() <= TOL, (r, got["parts"], want["parts"])
        assert got["grads"].keys() == want["grads"].keys()
        for name, g in want["grads"].items():
            assert g.abs().max() > 0, name  # every parameter is trained (sinks, MTP, router included)
            torch.testing.assert_close(got["grads"][name], g, atol=TOL, rtol=1e-4, msg=f"rank {r}: {name}")
        for a, b in zip(got["curve"], want["curve"], strict=True):
            assert a[0] == pytest.approx(b[0], abs=TOL) and a[1] == pytest.approx(b[1], abs=TOL)
            assert a[2] == pytest.approx(b[2], rel=1e-4)
            assert a[3] == pytest.approx(b[3], abs=1e-9)  # the same routing
