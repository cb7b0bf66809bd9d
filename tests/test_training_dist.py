"""Distributed training on CPU with gloo: 2 processes with FSDP2, and with expert parallelism (EP=2,
experts split over the ranks, tokens through all-to-all), reproduce the 1-process loss curve, every run
starting from a model built on the meta device whose shards the seeded init fills (the same weights on any
layout); a DCP checkpoint saved on 2 ranks with EP=2 resumes on 2 ranks with EP=2 or without EP and on 1
process, continuing the uninterrupted curve; the streamed export matches the 1-process one."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from harness import run_ranks
from mimo_flash import MiMoConfig, MiMoForCausalLM
from mimo_flash.distributed.materialize import SeededInit
from mimo_flash.training import Document, TrainConfig, Trainer, init_distributed, pack_documents

STEPS = 5


def _rows():
    g = torch.Generator().manual_seed(1)
    docs = [Document(torch.randint(3, 300, (n,), generator=g).tolist()) for n in [50, 70, 120, 33, 90] * 3]
    return pack_documents(docs, 64)


def _model():
    with torch.device("meta"):
        return MiMoForCausalLM(MiMoConfig.preset("tiny", num_hidden_layers=4))


def _trainer(ctx, **kw) -> Trainer:
    return Trainer(_model(), _rows(), _cfg(ctx.world if ctx else 1, **kw), ctx, init=SeededInit(0))


def _cfg(world: int, **kw) -> TrainConfig:
    # the global batch is 4 rows per step whatever the number of processes, in 2 micro-batches
    base = dict(steps=STEPS, batch_size=2 // world, grad_accum=2, warmup_steps=2, lr=3e-3, bias_update_rate=1e-2,
                progress=False, plot=False)
    return TrainConfig(**{**base, **kw})


def _curve(hist):
    return [(r["loss"], r["lm_loss"], r["grad_norm"], r["load_maxvio"]) for r in hist]


def _rank(rank: int, world: int, out: str) -> dict:
    res = {}
    for ep in (1, 2):
        ctx = init_distributed(ep=ep, device="cpu")
        run = os.path.join(out, f"ep{ep}")
        tr = _trainer(ctx, out_dir=run, activation_checkpointing=ep == 2)
        if ep == 2:
            local = tr.model.model.layers[1].mlp.experts.gate_up_proj.to_local().shape[0]
            res["local_experts"] = local
        res[f"ep{ep}"] = _curve(tr.fit())
        tr.export(os.path.join(run, "final"))
    # resume the EP run from a mid-run checkpoint: same curve as the uninterrupted one, on the same layout,
    # without EP, and (in the parent) on one process
    ctx = init_distributed(ep=2, device="cpu")
    run = os.path.join(out, "resume")
    first = _trainer(ctx, out_dir=run)
    first.cfg.steps = 2  # stop early, as a killed run would (the LR schedule still spans STEPS)
    first.fit()
    res["first"] = _curve(first.history)
    if rank == 0:
        for copy in ("resume-ep1", "resume-1proc"):
            shutil.copytree(os.path.join(run, "checkpoints"), os.path.join(out, copy, "checkpoints"))
    ctx.barrier()
    second = _trainer(ctx, out_dir=run, resume=True)
    res["resumed"] = _curve(first.history + second.fit())
    ctx = init_distributed(ep=1, device="cpu")
    third = _trainer(ctx, out_dir=os.path.join(out, "resume-ep1"), resume=True)
    res["resumed_ep1"] = _curve(first.history + third.fit())
    return res


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    res = run_ranks(_rank, 2, str(out), start="spawn")[0]
    return res, out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    tr = _trainer(None, out_dir=str(out))
    hist = tr.fit()
    tr.export(out / "final")
    return _curve(hist), out


def _close(a, b):
    for ra, rb in zip(a, b, strict=True):
        assert ra[0] == pytest.approx(rb[0], rel=2e-5, abs=1e-5)  # loss
        assert ra[1] == pytest.approx(rb[1], rel=2e-5, abs=1e-5)  # main-head CE
        assert ra[2] == pytest.approx(rb[2], rel=1e-3, abs=1e-5)  # gradient norm
        assert ra[3] == pytest.approx(rb[3], abs=1e-9)  # expert load (routing identical)


def test_fsdp_reproduces_single_process(two_process_results, one_process):
    res, _ = two_process_results
    _close(res["ep1"], one_process[0])


def test_expert_parallel_reproduces_single_process(two_process_results, one_process):
    res, _ = two_process_results
    assert res["local_experts"] == 4  # 8 experts, 4 on each rank
    _close(res["ep2"], one_process[0])


def test_distributed_resume_and_export(two_process_results, one_process):
    res, out = two_process_results
    _close(res["resumed"], res["ep2"])
    _close(res["resumed_ep1"], res["ep2"])  # resharded: experts from EP=2 onto FSDP's layout
    single = _trainer(None, out_dir=str(out / "resume-1proc"), resume=True)  # saved by 2 ranks, EP=2
    _close(res["first"] + _curve(single.fit()), res["ep2"])
    single = MiMoForCausalLM.from_pretrained(one_process[1] / "final", dtype=torch.float32)
    for name in ("ep1", "ep2"):
        dist_model = MiMoForCausalLM.from_pretrained(out / name / "final", dtype=torch.float32)
        want, got = single.state_dict(), dist_model.state_dict()
        assert list(got) == list(want), name
        for n, p in want.items():
            torch.testing.assert_close(got[n], p, atol=1e-4, rtol=1e-3, msg=f"{name}: {n}")
