"""FSDP2 over the expert shards (CPU, gloo): 4 ranks with EP 2, so each expert-parallel shard is split again over
the 2 ranks of its "edp" group. Every rank holds 1/4 of the experts (rows r E/2 + d E/4 .. + E/4 for "ep" rank r,
"edp" rank d) and their AdamW moments; the step's gradients and the loss curve equal one process's (fp32, 1e-5),
from a meta-built model filled by the seeded init. A DCP checkpoint written on that layout resumes on 4 ranks
with EP 4 and on 2 ranks with EP 2 and continues the uninterrupted curve; the streamed export holds the trained
weights, and CheckpointInit fills the 2-D shards from it. Experts that the "edp" ranks cannot split evenly are
refused with a clear error."""

from __future__ import annotations

import os

import pytest
import torch

from harness import run_ranks
from mimo_flash import MiMoConfig, MiMoForCausalLM
from mimo_flash.distributed.materialize import CheckpointInit, SeededInit
from mimo_flash.training import Document, TrainConfig, Trainer, init_distributed, pack_documents

TOL = 1e-5
STEPS = 4
SAVED = 2  # the step the other layouts resume from


def _rows():
    g = torch.Generator().manual_seed(3)
    docs = [Document(torch.randint(3, 300, (n,), generator=g).tolist()) for n in [50, 70, 120, 33, 90, 21] * 2]
    return pack_documents(docs, 64)


def _meta_model():
    with torch.device("meta"):
        return MiMoForCausalLM(MiMoConfig.preset("tiny", num_hidden_layers=3))  # 8 routed experts


def _cfg(dp: int, **kw) -> TrainConfig:
    # 8 rows a step whatever the layout: 2 micro-batches (the expert units skip their reduce-scatter on the first)
    return TrainConfig(**{**dict(steps=STEPS, batch_size=4 // dp, grad_accum=2, warmup_steps=1, lr=3e-3,
                                 bias_update_rate=1e-2, progress=False, plot=False), **kw})


def _curve(hist):
    return [(r["loss"], r["lm_loss"], r["grad_norm"], r["load_maxvio"]) for r in hist]


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _grads_then_fit(trainer: Trainer) -> dict:
    """The next step's finished gradients (full tensors), then the loss curve of a fit."""
    from mimo_flash.distributed.training import parameter_name

    parts, denom, _ = trainer.compute_gradients()
    trainer.ctx.all_reduce_(parts)
    grads = {parameter_name(n): _full(p.grad).clone() for n, p in trainer.model.named_parameters()}
    trainer.optimizer.zero_grad(set_to_none=True)
    return {"parts": parts / denom.double(), "grads": grads, "curve": _curve(trainer.fit())}


def _storage(tr: Trainer, rank: int, world: int, ep: int) -> dict:
    """Per expert tensor: its local rows, whether they are the rows expected of this rank's mesh coordinates,
    and the rows of its AdamW moments."""
    from mimo_flash.model.moe import Experts

    E = tr.config.n_routed_experts
    r, d = rank % ep, rank // ep  # ep_mesh is (world // ep, ep): "ep" rank, "edp" rank
    lo = r * E // ep + d * E // world
    out = {}
    for name, m in tr.model.named_modules():
        if not isinstance(m, Experts):
            continue
        for attr in ("gate_up_proj", "down_proj"):
            p = getattr(m, attr)
            local, full = p.to_local(), p.full_tensor()
            state = tr.optimizer.state[p]
            out[f"{name}.{attr}"] = (local.shape[0], torch.equal(local, full[lo:lo + E // world]),
                                     state["exp_avg"].to_local().shape[0], state["exp_avg_sq"].to_local().shape[0])
    return out


def _rank(rank: int, world: int, ep: int, root: str) -> dict:
    from mimo_flash.training.sharded_export import export_sharded

    ctx = init_distributed(ep=ep, device="cpu")
    ckpt = os.path.join(root, "run", "checkpoints", f"step-{SAVED:08d}")
    if world == 2:  # resume the 4-rank EP 2 checkpoint on 2 ranks with EP 2
        tr = Trainer(_meta_model(), _rows(), _cfg(ctx.dp_world), ctx, init=SeededInit(7))
        tr.resume(ckpt)
        return {"resumed": _curve(tr.fit())}
    from mimo_flash.distributed.training import parallelize_for_training

    with torch.device("meta"):  # 2 experts: one per "ep" rank, which its 2 "edp" ranks cannot split
        few = MiMoForCausalLM(MiMoConfig.preset("tiny", num_hidden_layers=3, n_routed_experts=2))
    with pytest.raises(ValueError) as err:
        parallelize_for_training(few, ctx)
    tr = Trainer(_meta_model(), _rows(), _cfg(ctx.dp_world, out_dir=os.path.join(root, "run"), save_every=SAVED),
                 ctx, init=SeededInit(7))
    res = _grads_then_fit(tr)
    res["few_experts_error"] = str(err.value)
    res["storage"] = _storage(tr, rank, world, ep)
    trained = {n: _full(t).clone() for n, t in tr.model.state_dict().items()}  # collective: every rank
    if rank == 0:
        res["trained"] = trained
    export_sharded(tr.model, os.path.join(root, "export"), dtype="float32")
    # the export read back into the same layout: every rank's shards equal the trained model's
    init = CheckpointInit(os.path.join(root, "export"))
    with torch.device("meta"):
        again = MiMoForCausalLM(init.config())
    parallelize_for_training(again, ctx)
    init.fill(again, ctx.device)
    want = tr.model.state_dict()
    res["reloaded_equal"] = {n: torch.equal(_local(t), _local(want[n])) for n, t in again.state_dict().items()}
    ctx = init_distributed(ep=world, device="cpu")  # the same 4 ranks, EP 4 (no edp copies)
    tr = Trainer(_meta_model(), _rows(), _cfg(ctx.dp_world), ctx, init=SeededInit(7))
    tr.resume(ckpt)
    res["resumed_ep4"] = _curve(tr.fit())
    return {k: _numpy(v) for k, v in res.items()}  # by value through the queue


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _numpy(v):
    if torch.is_tensor(v):
        return v.numpy()
    if isinstance(v, dict):
        return {k: _numpy(x) for k, x in v.items()}
    return v


def _tensors(v):
    return torch.from_numpy(v) if not torch.is_tensor(v) and hasattr(v, "dtype") else v


@pytest.fixture(scope="module")
def one_process():
    return _grads_then_fit(Trainer(_meta_model(), _rows(), _cfg(1), init=SeededInit(7)))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("edp")
    res = run_ranks(_rank, 4, 2, str(root), timeout=400)  # fork: this process never starts a process group
    resumed = run_ranks(_rank, 2, 2, str(root), timeout=300)
    return res, resumed, root


def _same_curve(got, want):
    for a, b in zip(got, want, strict=True):
        assert a[0] == pytest.approx(b[0], abs=TOL) and a[1] == pytest.approx(b[1], abs=TOL)
        assert a[2] == pytest.approx(b[2], rel=1e-4)
        assert a[3] == pytest.approx(b[3], abs=1e-9)  # the same routing


def test_each_rank_holds_a_quarter_of_the_experts(four_ranks):
    from mimo_flash.model.moe import Experts

    res, _, _ = four_ranks
    E = MiMoConfig.preset("tiny").n_routed_experts
    for r in range(4):
        storage = res[r]["storage"]
        assert len(storage) == 2 * sum(isinstance(m, Experts) for m in _meta_model().modules()) > 0
        for name, (rows, right_rows, m_rows, v_rows) in storage.items():
            assert (rows, m_rows, v_rows) == (E // 4,) * 3, (r, name)  # not E / 2: no copies over edp
            assert right_rows, (r, name)
        assert "1 experts per expert-parallel rank cannot be split over the 2 ranks" in res[r]["few_experts_error"]


def test_fsdp_over_expert_shards_reproduces_one_process(four_ranks, one_process):
    res, _, _ = four_ranks
    want = one_process
    for r in range(4):
        got = res[r]
        assert (_tensors(got["parts"]) - want["parts"]).abs().max() <= TOL, r
        assert got["grads"].keys() == want["grads"].keys()
        for name, g in want["grads"].items():
            assert g.abs().max() > 0, name
            torch.testing.assert_close(_tensors(got["grads"][name]), g, atol=TOL, rtol=1e-4, msg=f"rank {r}: {name}")
        _same_curve(got["curve"], want["curve"])


def test_checkpoint_resumes_on_other_layouts_and_exports(four_ranks):
    res, resumed, root = four_ranks
    uninterrupted = res[0]["curve"]
    for r in range(4):
        _same_curve(res[r]["resumed_ep4"], uninterrupted[SAVED:])
    for r in range(2):
        _same_curve(resumed[r]["resumed"], uninterrupted[SAVED:])
    exported = MiMoForCausalLM.from_pretrained(root / "export", dtype=torch.float32).state_dict()
    trained = {n: _tensors(t) for n, t in res[0]["trained"].items()}
    assert sorted(exported) == sorted(trained)
    for n, t in trained.items():
        assert torch.equal(exported[n], t), n
    for r in range(4):
        assert res[r]["reloaded_equal"] and all(res[r]["reloaded_equal"].values()), r
