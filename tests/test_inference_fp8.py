"""FP8-resident weights under tensor and expert parallel inference, on CPU with gloo.

A config whose attention heads (128 rows), kv heads and intermediate shares are whole 128x128 FP8 blocks on
every rank: TP=2 and TP=2 x EP=2 slice the FP8 bytes with their block scales, nothing is requantized, so the
sharded model gives the single-process FP8-resident model's logits (fp32 rounding) and greedy tokens. Each
rank also loads its share straight from the FP8 checkpoint (with the k_proj scale trap) and must hold exactly
the bytes and scales that slicing the single-process model gives. The tiny preset's 48-row heads and 32-wide
expert shares are not whole blocks: such shards are requantized (shard_fp8; the loader likewise) and are
checked against the single-process model within FP8 rounding. `torchrun ... generate --fp8 --tp 2` runs.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from mimo_flash import MiMoConfig, MiMoForCausalLM
from mimo_flash.checkpoint import load_pretrained, write_synthetic_checkpoint
from mimo_flash.checkpoint.slices import Piece
from mimo_flash.quant.blocks import FP8, dequantize, quantize
from mimo_flash.quant.modules import FP8Experts, FP8Linear, shard_fp8

from harness import SRC, free_port, needs_peak_rss, run_ranks
from test_inference_dist import check_two_rank_load

TOL = 1e-5
VOCAB = 301
# every rank's q heads (2 x 128 rows), its kv head's k and v rows (128 each) and its intermediate shares
# (dense 256 / 2, experts 256 / 2) are whole 128-row blocks
ALIGNED = dict(vocab_size=VOCAB, hidden_size=128, head_dim=128, v_head_dim=128, swa_head_dim=128,
               swa_v_head_dim=128, intermediate_size=256, moe_intermediate_size=256, num_hidden_layers=3,
               num_nextn_predict_layers=1)


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (2, 21), generator=g)  # window 9: crosses it twice
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    return ids, mask


def _outputs(m: MiMoForCausalLM) -> dict:
    ids, mask = _batch()
    with torch.no_grad():
        out = m(ids, attention_mask=mask, mtp=True)
        gen = dict(attention_mask=mask, max_new_tokens=6, prefill_chunk=8)
        return {"logits": out.logits, "mtp": torch.stack(out.mtp_logits),
                "greedy": m.generate(ids, **gen, cuda_graphs=False),
                "graphed": m.generate(ids, **gen, cuda_graphs=True),
                "spec": m.generate(ids, **gen, num_speculative_tokens=1)}


def _fp8_state(m) -> dict:
    return {n: t for n, t in m.state_dict().items() if t.dtype == FP8 or n.endswith("_scale_inv")}


def _rank(rank: int, world: int, tp: int, ep: int, ckpts: dict) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from mimo_flash.distributed import load_parallel, parallelize_for_inference
    from mimo_flash.distributed.inference import FP8ExpertParallelInference

    res = {}
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (ep, tp), mesh_dim_names=("ep", "tp"))
    # aligned: the single-process FP8-resident model, then its shards
    m = load_pretrained(ckpts["aligned"], dtype=torch.float32, fp8=True, progress=False)
    ref = _outputs(m)
    parallelize_for_inference(m, tp=tp, ep=ep, mesh=mesh)
    got = _outputs(m)
    res["diff"] = {k: (got[k] - ref[k]).abs().max().item() for k in ("logits", "mtp")}
    res["equal"] = {k: torch.equal(got[k], ref[k]) for k in ref if k not in ("logits", "mtp")}
    experts = m.model.layers[1].mlp.experts
    qkv = m.model.layers[0].self_attn.qkv_proj
    res["modules"] = dict(experts=type(experts).__name__, dispatcher=type(experts.dispatcher).__name__,
                          local_experts=experts.gate_up_proj.shape[0], qkv=type(qkv).__name__,
                          qkv_rows=qkv.weight.shape[0], out_features=qkv.out_features,
                          dtypes=sorted({str(t.dtype) for t in _fp8_state(m).values()}))
    assert isinstance(experts, FP8Experts) and isinstance(qkv, FP8Linear)
    assert isinstance(experts.dispatcher, FP8ExpertParallelInference)  # tp alone: each expert's share, summed
    # the per-rank loader: the same bytes and scales, read from the checkpoint's covering blocks only
    mine = load_parallel(ckpts["aligned"], tp=tp, ep=ep, dtype=torch.float32, fp8=True, mesh=mesh,
                         progress=False)
    a, b = m.state_dict(), mine.state_dict()
    assert list(a) == list(b)
    res["load_differs"] = [n for n in a if a[n].dtype != b[n].dtype or not torch.equal(a[n], b[n])]
    res["loaded_logits"] = (_outputs(mine)["logits"] - ref["logits"]).abs().max().item()
    # unaligned (tiny preset: 48-row heads, 32-wide expert shares): shards requantized with their own scales
    u = load_pretrained(ckpts["unaligned"], dtype=torch.float32, fp8=True, progress=False)
    uref = _outputs(u)["logits"]
    parallelize_for_inference(u, tp=tp, ep=ep, mesh=mesh)
    uload = load_parallel(ckpts["unaligned"], tp=tp, ep=ep, dtype=torch.float32, fp8=True, mesh=mesh,
                          progress=False)
    res["unaligned"] = dict(sliced=(_outputs(u)["logits"] - uref).abs().max().item(),
                            loaded=(_outputs(uload)["logits"] - uref).abs().max().item(),
                            scale=uref.abs().max().item())
    return res


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_fp8")
    write_synthetic_checkpoint(root / "aligned", MiMoConfig.preset("tiny", **ALIGNED), fp8=True,
                               kproj_extra_scale=(1, 0), max_shard_size="400KB", seed=1)
    write_synthetic_checkpoint(root / "unaligned", MiMoConfig.preset("tiny", vocab_size=VOCAB,
                                                                     num_nextn_predict_layers=1), fp8=True)
    return {"aligned": str(root / "aligned"), "unaligned": str(root / "unaligned")}


@pytest.mark.parametrize("tp,ep", [(2, 1), (2, 2)])
def test_fp8_resident_parallel_matches_single_process(tp, ep, checkpoints):
    results = run_ranks(_rank, tp * ep, tp, ep, checkpoints, timeout=300)
    for rank, res in enumerate(results):
        assert res["diff"]["logits"] <= TOL and res["diff"]["mtp"] <= TOL, (rank, res["diff"])
        assert all(res["equal"].values()), (rank, res["equal"])
        # 2 of 4 q heads (256 rows) + the replicated full-layer kv head's k and v rows (128 each)
        assert res["modules"] == dict(experts="FP8Experts", local_experts=8 // ep, qkv="FP8Linear",
                                      qkv_rows=512, out_features=512, dtypes=["torch.float32", "torch.float8_e4m3fn"],
                                      dispatcher="FP8ExpertParallelInference"), res["modules"]
        assert res["load_differs"] == [], (rank, res["load_differs"])
        assert res["loaded_logits"] <= TOL, (rank, res["loaded_logits"])
        un = res["unaligned"]
        # requantized shards: an FP8 rounding of the same weights, not the same numbers (measured ~1-3%)
        assert 0 < un["sliced"] < 0.1 * un["scale"] and 0 < un["loaded"] < 0.1 * un["scale"], (rank, un)


def test_shard_fp8_copies_aligned_blocks_and_requantizes_the_rest():
    torch.manual_seed(0)
    w = torch.randn(3, 384, 200)
    q, s = quantize(w, (128, 128))
    exact = dequantize(q, s, (128, 128))
    # rows [128, 384) of experts 1..2 then the column tail of expert 0 rows [0, 128): whole blocks
    rows = [Piece((slice(0, 2), slice(0, 256), slice(0, 200)), (slice(1, 3), slice(128, 384), slice(0, 200)))]
    ql, sl = shard_fp8(q, s, rows, (2, 256, 200))
    assert torch.equal(ql.view(torch.uint8), q[1:, 128:].view(torch.uint8)) and torch.equal(sl, s[1:, 1:])
    cols = [Piece((slice(0, 1), slice(0, 384), slice(0, 72)), (slice(0, 1), slice(0, 384), slice(128, 200)))]
    ql, sl = shard_fp8(q, s, cols, (1, 384, 72))
    assert torch.equal(ql.view(torch.uint8), q[:1, :, 128:].view(torch.uint8)) and torch.equal(sl, s[:1, :, 1:])
    # rows [192, 384) (a 192-row head starting inside a block) followed by rows [0, 64): requantized
    odd = [Piece((slice(0, 3), slice(0, 192), slice(0, 200)), (slice(0, 3), slice(192, 384), slice(0, 200))),
           Piece((slice(0, 3), slice(192, 256), slice(0, 200)), (slice(0, 3), slice(0, 64), slice(0, 200)))]
    ql, sl = shard_fp8(q, s, odd, (3, 256, 200))
    want = torch.cat([exact[:, 192:], exact[:, :64]], dim=1)
    got = dequantize(ql, sl, (128, 128))
    assert sl.shape == (3, 2, 2) and not torch.equal(got, want)
    # e4m3 keeps 3 mantissa bits: each value within 1/16 of itself plus the block's smallest step
    assert ((got - want).abs() <= want.abs() / 16 + sl.repeat_interleave(128, 1).repeat_interleave(128, 2)[:, :, :200]
            * 2 ** -9).all()


def test_torchrun_generate_fp8_tp2_on_cpu(tmp_path):
    from test_generation_cli import write_tokenizer

    torch.manual_seed(0)
    MiMoForCausalLM(MiMoConfig.preset("tiny", **{**ALIGNED, "vocab_size": 512})).save_pretrained(tmp_path)
    write_tokenizer(tmp_path)
    src = str(SRC)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    args = ["generate", "--model", str(tmp_path), "--prompt", "w1 w2 w3", "--max-new-tokens", "5", "--device", "cpu",
            "--fp8"]
    par = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(free_port()), "-m", "mimo_flash.cli", *args, "--tp", "2"],
                         capture_output=True, text=True, env=env, timeout=240)
    assert par.returncode == 0, par.stderr[-3000:]
    from mimo_flash.tokenizer import Tokenizer

    tok = Tokenizer(tmp_path)
    one = MiMoForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, fp8=True, progress=False)
    ids = torch.tensor([tok.encode("w1 w2 w3")])
    out = one.generate(ids, max_new_tokens=5, eos_token_id=tok.eos_token_ids, pad_token_id=tok.pad_token_id)
    # rank 0 alone prints, and the same text as the single-process FP8-resident model
    assert par.stdout.strip() == tok.decode(out[0, 3:].tolist()).strip() != ""


@needs_peak_rss
def test_each_rank_loads_only_its_fp8_share(tmp_path):
    """Two ranks load an FP8 checkpoint FP8-resident: each one's peak host memory is its share plus about one
    tensor, well under the whole FP8-resident model (expert and dense MLP shares copied as blocks; the qkv
    shards of 48-row heads go through a shard-sized fp32 staging)."""
    from mimo_flash.quant import quantize_model_

    # experts of 256 KiB (FP8) per projection: the kernel's 64 KiB fault-around of file pages next to the ones
    # read (which the loader's release does not drop) would dominate a checkpoint of tiny tensors
    config = MiMoConfig.preset("tiny", vocab_size=8192, hidden_size=512, intermediate_size=1024,
                               n_routed_experts=16, moe_intermediate_size=512, num_nextn_predict_layers=1)
    write_synthetic_checkpoint(tmp_path / "tiny", MiMoConfig.preset("tiny"))
    write_synthetic_checkpoint(tmp_path / "big", config, max_shard_size="10MB")
    with torch.device("meta"):
        whole = MiMoForCausalLM(config).to(torch.bfloat16)
    quantize_model_(whole)
    full = sum(t.numel() * t.element_size() for t in whole.state_dict().values())
    check_two_rank_load(tmp_path, full, "fp8")
