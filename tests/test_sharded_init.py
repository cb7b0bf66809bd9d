"""Sharded from the start: a model built on the meta device, sharded (FSDP2 over 4 gloo ranks, experts over the 4
with EP), then each rank fills only its shards from an FP8 checkpoint: every rank's peak host memory stays well
under the model's size, and its shards equal the same rows of the whole model loaded by load_pretrained. The
seeded init draws the same values whatever rows a rank holds."""

from __future__ import annotations

import ctypes
import os

import torch

from harness import needs_peak_rss, peak_rss_growth, run_ranks
from mimo_flash import MiMoConfig, MiMoForCausalLM
from mimo_flash.checkpoint import write_synthetic_checkpoint
from mimo_flash.distributed.materialize import CheckpointInit, SeededInit, local_rows

WORLD = 4
MB = 1 << 20
BIG = dict(vocab_size=16384, hidden_size=256, intermediate_size=1024, n_routed_experts=16,
           moe_intermediate_size=256, num_nextn_predict_layers=1)


def _sharded(path, ctx) -> torch.nn.Module:
    from mimo_flash.distributed.training import parallelize_for_training

    init = CheckpointInit(path)
    with torch.device("meta"):
        model = MiMoForCausalLM(init.config())
    parallelize_for_training(model, ctx)
    init.fill(model, ctx.device)
    return model


def _rank(rank: int, world: int, root: str) -> dict:
    from mimo_flash.checkpoint import load_pretrained
    from mimo_flash.distributed import init_distributed

    res = {}
    ctx = init_distributed(ep=world, device="cpu")
    _sharded(os.path.join(root, "small"), ctx)  # first use of every code path is not the loader's memory
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # heap the parent freed before the fork: not counted
    model, res["extra"] = peak_rss_growth(_sharded, os.path.join(root, "big"), ctx)
    state = model.state_dict()
    res["local"] = sum(local_rows(t)[0].numel() * 4 for t in state.values())
    ref = load_pretrained(os.path.join(root, "big"), dtype=torch.float32, progress=False).state_dict()
    res["model"] = sum(t.numel() * 4 for t in ref.values())
    res["names_match"] = sorted(state) == sorted(ref)
    res["experts_split"] = local_rows(state["model.layers.1.mlp.experts.gate_up_proj"])[0].shape[0]
    worst = 0.0
    for name, t in state.items():
        local, lo, hi = local_rows(t)
        worst = max(worst, float((local - ref[name][lo:hi]).abs().max()) if local.numel() else 0.0)
    res["worst"] = worst
    return res


@needs_peak_rss
def test_each_rank_reads_and_holds_only_its_shards(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        write_synthetic_checkpoint(tmp_path / "small", MiMoConfig.preset("tiny"), fp8=True, block_size=(16, 16))
        write_synthetic_checkpoint(tmp_path / "big", MiMoConfig.preset("tiny", **BIG), fp8=True,
                                   max_shard_size="10MB")
    finally:
        torch.set_num_threads(threads)
    results = run_ranks(_rank, WORLD, str(tmp_path), timeout=300)  # fork: this process never starts a process group
    for r in range(WORLD):
        res = results[r]
        shown = {k: round(v / MB, 1) if k in ("extra", "local", "model") else v for k, v in res.items()}
        assert res["names_match"] and res["experts_split"] == 4, shown  # 16 experts over EP 4
        assert res["worst"] == 0.0, shown  # the same dequantized values as the whole-model loader's
        assert res["model"] > 80 * MB, shown  # large enough that a whole copy would show
        assert res["local"] < 0.3 * res["model"], shown  # a quarter of everything
        # its own shards, the pages of the rows it reads, one dequantized block, allocator slack
        assert res["extra"] < 0.45 * res["model"], shown
        assert res["extra"] > 0.8 * res["local"], shown  # the measurement does see the shards


def test_seeded_init_does_not_depend_on_the_rows_a_rank_holds():
    init = SeededInit(3)
    shape = (5000, 300)  # blocks of 3495 rows: a shard may start and end inside a block
    whole = init.rows("w", shape, 0.02, 0, shape[0])
    for lo, hi in [(0, 1250), (1250, 2500), (3400, 3600), (4999, 5000)]:
        assert torch.equal(init.rows("w", shape, 0.02, lo, hi), whole[lo:hi])
    assert not torch.equal(SeededInit(4).rows("w", shape, 0.02, 0, 10), whole[:10])
    assert not torch.equal(init.rows("v", shape, 0.02, 0, 10), whole[:10])
    assert abs(float(whole.std()) - 0.02) < 1e-3 and abs(float(whole.mean())) < 1e-3

    with torch.device("meta"):
        model = MiMoForCausalLM(MiMoConfig.preset("tiny"))
    init.fill(model, torch.device("cpu"))
    state = model.state_dict()
    for name, t in state.items():
        assert not t.is_meta and torch.isfinite(t).all(), name
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            assert torch.equal(t, torch.ones_like(t)), name
        elif name.endswith("e_score_correction_bias"):
            assert torch.equal(t, torch.zeros_like(t)), name
        else:  # drawn from N(0, initializer_range)
            std = model.config.initializer_range
            assert t.std() > 0 and (t.numel() < 1000 or abs(float(t.std()) - std) < 0.1 * std), name
    with torch.device("meta"):  # the same draw twice
        again = MiMoForCausalLM(MiMoConfig.preset("tiny"))
    init.fill(again, torch.device("cpu"))
    for name, t in again.state_dict().items():
        assert torch.equal(t, state[name]), name
