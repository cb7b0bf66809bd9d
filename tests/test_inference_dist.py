"""Tensor and expert parallel inference on CPU with gloo: TP=2 (2 processes) and TP=2 x EP=2 (4 processes)
give the single process's logits (fp32, max abs diff <= 1e-5) and tokens: a left-padded batch whose
prompts cross the sliding window several times, greedy (eager and graph-shaped steps), sampled, and with
speculative decoding (K=2). The tiny preset has 1 kv head on its full layers and 2 on its SWA layers, so
TP=2 replicates the full layers' kv head. Each rank also loads its share from an fp32
checkpoint and from an FP8 checkpoint whose 32-row blocks straddle the 48-row heads, and must get exactly
the slices of the single-process model; each rank's peak host memory while loading stays well under the
model's size. The serving scheduler, replicated on every rank and led by rank 0 through a StepBroadcaster,
gives the single process's tokens."""

from __future__ import annotations

import threading

import pytest
import torch

from harness import free_port, needs_peak_rss, run_python, run_ranks
from mimo_flash import MiMoConfig, MiMoForCausalLM
from mimo_flash.checkpoint import load_pretrained, write_synthetic_checkpoint

TOL = 1e-5
NEW = 10


VOCAB = 301  # odd: the vocabulary-parallel shards are padded


def _model() -> MiMoForCausalLM:
    torch.manual_seed(0)
    m = MiMoForCausalLM(MiMoConfig.preset("tiny", num_nextn_predict_layers=2, vocab_size=VOCAB)).eval()
    with torch.no_grad():  # non-zero sinks and norm weights: a wrong slice of them shows
        for n, p in m.named_parameters():
            if "sink" in n or "norm" in n:
                p.normal_(1.0 if "norm" in n else 0.0, 0.5)
    return m


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (3, 31), generator=g)  # window 9: 31 tokens cross it three times
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    mask[2, :19] = 0
    return ids, mask


def _outputs(m: MiMoForCausalLM) -> dict:
    ids, mask = _batch()
    with torch.no_grad():
        out = m(ids, attention_mask=mask, mtp=True)
        gen = dict(max_new_tokens=NEW, prefill_chunk=8)  # chunked prefill over the SWA rings
        return {
            "logits": out.logits, "mtp": torch.stack(out.mtp_logits),
            "greedy": m.generate(ids, attention_mask=mask, **gen, cuda_graphs=False),
            "graphed": m.generate(ids, attention_mask=mask, **gen, cuda_graphs=True),
            "sampled": m.generate(ids, attention_mask=mask, **gen, do_sample=True, top_k=50, seed=7),
            "spec": m.generate(ids, attention_mask=mask, **gen, num_speculative_tokens=2),
            "spec1": m.generate(ids[:1], **gen, num_speculative_tokens=2, cuda_graphs=True),
        }


def _serve(m, tok, leader: bool | None = None) -> list[list[int]] | None:
    """Requests through the continuous-batching scheduler: greedy (speculating, adaptive K: rank 0's choice of
    drafts each step is every rank's), seeded sampling, alongside each other.
    leader None: one process; True: rank 0 of a parallel model, whose steps the others follow (False)."""
    from mimo_flash.distributed.steps import StepBroadcaster
    from mimo_flash.generation.sampling import SamplingParams
    from mimo_flash.serving.requests import Request, run_blocking
    from mimo_flash.serving.scheduler import Scheduler

    sched = Scheduler(m, tok, max_slots=2, max_context=64, prefill_chunk=8, prefix_blocks=4, speculative_k="auto")
    if leader is False:
        StepBroadcaster(sched.follow_step).follow()
        return None
    if leader:
        sched.broadcaster = StepBroadcaster(sched.follow_step)
    sched.start()
    reqs = [Request(list(range(5, 5 + n)), 6, SamplingParams(True, 0.9, top_k=20) if n % 2 else SamplingParams(),
                    seed=n) for n in (3, 12, 20, 7)]
    out = [None] * len(reqs)

    def run(i):
        out[i] = [t for e in run_blocking(sched, reqs[i], timeout=120) for t in e.token_ids]
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sched.stop()
    if leader:
        sched.broadcaster.stop()
    return out


def _rank(rank: int, world: int, tp: int, ep: int, ckpts: dict) -> dict:
    import torch.distributed as dist
    from mimo_flash.distributed import load_parallel, parallelize_for_inference

    res = {}
    dist.init_process_group("gloo")
    from mimo_flash.tokenizer import Tokenizer
    tok = Tokenizer(ckpts["tokenizer"])
    m = _model()
    ref = _outputs(m)
    served = _serve(m, tok)
    parallelize_for_inference(m, tp=tp, ep=ep)
    got = _outputs(m)
    res["served"] = (_serve(m, tok, leader=rank == 0), served)
    from mimo_flash.generation.cache import KVCache
    from mimo_flash.generation.triton_step import unsupported
    res["triton"] = unsupported(m, KVCache(m.kv_config, 1, 64, dtype=torch.float32))
    res["diff"] = {k: (got[k].float() - ref[k].float()).abs().max().item() for k in ("logits", "mtp")}
    res["equal"] = {k: torch.equal(got[k], ref[k]) for k in ref if k not in ("logits", "mtp")}
    layer0 = m.model.layers[0].self_attn
    res["local"] = dict(heads=layer0.heads, kv_heads=layer0.kv_heads,
                        experts=m.model.layers[1].mlp.experts.gate_up_proj.shape[0],
                        cache_kv=m.kv_config.num_key_value_heads)
    # per-rank loading: exactly this rank's slices of the whole checkpoint
    for name, path in ckpts.items():
        if name == "tokenizer":
            continue
        whole = load_pretrained(path, dtype=torch.float32)
        parallelize_for_inference(whole, tp=tp, ep=ep, mesh=plan_mesh(tp, ep))
        mine = load_parallel(path, tp=tp, ep=ep, dtype=torch.float32, mesh=plan_mesh(tp, ep))
        a, b = whole.state_dict(), mine.state_dict()
        assert list(a) == list(b), name
        res[f"load_{name}"] = [n for n in a if not torch.equal(a[n], b[n])]
    # rank 0 leads two sampled steps; the others follow them and must compute the same tokens
    from mimo_flash.distributed.steps import StepBroadcaster
    ran = []
    steps = StepBroadcaster(lambda ids, seed: ran.append(
        m.generate(torch.tensor(ids), max_new_tokens=4, do_sample=True, seed=seed).tolist()))
    if rank == 0:
        steps.step([[5, 6, 7]], seed=11)
        steps.step([[8, 9]], seed=12)
        steps.stop()
    else:
        res["followed"] = steps.follow()
    res["steps"] = ran
    return res


def plan_mesh(tp: int, ep: int):
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cpu", (ep, tp), mesh_dim_names=("ep", "tp"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_ckpt")
    _model().save_pretrained(root / "fp32", dtype=torch.float32, max_shard_size="200KB")
    write_synthetic_checkpoint(root / "fp8", MiMoConfig.preset("tiny", num_nextn_predict_layers=2), fp8=True,
                               block_size=(32, 32), max_shard_size="200KB")
    from serving_helpers import make_tokenizer
    make_tokenizer(root)
    return {"fp32": str(root / "fp32"), "fp8": str(root / "fp8"), "tokenizer": str(root)}


@pytest.mark.parametrize("tp,ep", [(2, 1), (2, 2)])
def test_parallel_matches_single_process(tp, ep, checkpoints):
    results = run_ranks(_rank, tp * ep, tp, ep, checkpoints, start="spawn", timeout=300)
    for rank, res in enumerate(results):
        assert res["diff"]["logits"] <= TOL and res["diff"]["mtp"] <= TOL, (rank, res["diff"])
        assert all(res["equal"].values()), (rank, res["equal"])
        # 4 q heads -> 2; the full layer's single kv head is replicated; 8 experts over ep ranks
        assert res["local"] == dict(heads=2, kv_heads=1, experts=8 // ep, cache_kv=1), res["local"]
        assert res["load_fp32"] == [] and res["load_fp8"] == [], (res["load_fp32"], res["load_fp8"])
        if rank == 0:  # the scheduler's replicas on the other ranks followed rank 0's steps
            par, one = res["served"]
            assert all(len(t) == 6 for t in par + one)
            # greedy requests (2 and 3) equal the one-process run's; a sampled request's tokens depend on how many
            # drafts each step took, which adaptive K chooses from measured step times (not the same in two runs)
            assert par[1:3] == one[1:3], (par, one)
        assert "parallel" in res["triton"]  # the one-process batch-1 Triton step declines, the graph path serves
        assert len(res["steps"]) == 2 and res["steps"] == results[0]["steps"], (rank, res["steps"])
        assert rank == 0 or res["followed"] == 2


MEM_CHILD = r"""
import json, sys, torch, torch.distributed as dist
from harness import peak_rss_growth
from mimo_flash.distributed import leave_distributed, load_parallel

torch.set_num_threads(1)
dist.init_process_group("gloo")
fp8 = sys.argv[3:] == ["fp8"]  # FP8-resident shards
load_parallel(sys.argv[1], tp=2, dtype=torch.bfloat16, fp8=fp8, progress=False)  # warm up: imports, first use
model, extra = peak_rss_growth(load_parallel, sys.argv[2], tp=2, dtype=torch.bfloat16, fp8=fp8, progress=False)
sizes = [t.numel() * t.element_size() for t in model.state_dict().values()]
print(json.dumps({"rank": dist.get_rank(), "extra": extra, "local": sum(sizes), "largest": max(sizes)}))
leave_distributed()
"""

MB = 1 << 20


@needs_peak_rss
def test_each_rank_loads_only_its_share(tmp_path):
    config = MiMoConfig.preset("tiny", vocab_size=16384, hidden_size=256, intermediate_size=1024,
                               n_routed_experts=16, moe_intermediate_size=256, num_nextn_predict_layers=1)
    write_synthetic_checkpoint(tmp_path / "tiny", MiMoConfig.preset("tiny"), block_size=(16, 16))
    write_synthetic_checkpoint(tmp_path / "big", config, fp8=False, max_shard_size="10MB")
    full = sum(t.numel() * t.element_size() for t in load_pretrained(tmp_path / "big").state_dict().values())
    check_two_rank_load(tmp_path, full)


def check_two_rank_load(tmp_path, full: int, *child_args: str) -> None:
    """Two torchrun ranks load tmp_path/big (after a warm-up load of tmp_path/tiny): each one's peak host memory
    rises by its share plus about one tensor, well under the whole model (`full` bytes, as loaded)."""
    (tmp_path / "child.py").write_text(MEM_CHILD)
    results = run_python("-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
                         str(tmp_path / "child.py"), str(tmp_path / "tiny"), str(tmp_path / "big"), *child_args)
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert full > 40 * MB  # a second copy of the model, or of half of it, would show
    for r in results:
        shown = {k: round(v / MB, 1) for k, v in {**r, "full": full}.items()}
        extra = r["extra"]
        assert r["local"] < 0.6 * full, shown  # the rank keeps about half of the model
        assert extra > r["local"], shown  # the measurement sees the rank's share
        # its share, one tensor's file pages while copied (FP8: or a requantized shard's fp32 staging),
        # allocator slack: well under the whole model
        assert extra < r["local"] + r["largest"] + 16 * MB, shown
        assert extra < 0.75 * full, shown
