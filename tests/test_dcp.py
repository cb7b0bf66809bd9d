"""Distributed training checkpoints (torch.distributed.checkpoint) and the streaming hub export, on CPU with gloo:
saved by 2 FSDP2 ranks, loaded on 1 and 4 ranks with the same full parameters and optimizer states; a save that
dies midway leaves no step directory; the export equals the model's full weights (and its FP8 form the
quantizer's)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from harness import run_ranks
from mimo_flash import MiMoConfig, MiMoForCausalLM
from mimo_flash.training import dcp as ckpt
from mimo_flash.training.sharded_export import export_sharded


def _model(seed: int) -> MiMoForCausalLM:
    torch.manual_seed(seed)
    return MiMoForCausalLM(MiMoConfig.preset("tiny", num_hidden_layers=3))


def _shard(model: MiMoForCausalLM, experts_on_dim1: bool = False) -> MiMoForCausalLM:
    """FSDP2 units as training/parallel.py makes them. experts_on_dim1: the fused expert tensors [E, 2I, D] /
    [E, D, I] are split on dim 1 instead of dim 0 (so the export gathers them whole, and loading reshards
    between layouts)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    place = (lambda p: Shard(1) if p.dim() == 3 else None) if experts_on_dim1 else None
    for layer in model.model.mtp.layers:  # called outside its layer's forward (by mtp_step): a unit of its own
        fully_shard(layer.final_layernorm)
    for layer in list(model.model.layers) + list(model.model.mtp.layers):
        fully_shard(layer, shard_placement_fn=place)
    fully_shard(model)
    return model


def _full_state(model, opt) -> dict[str, torch.Tensor]:
    """Every parameter, buffer and optimizer state as one flat dict of full tensors (rank 0's view)."""
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out = {f"model.{k}": v.clone() for k, v in msd.items()}
    for name, st in osd.get("state", {}).items():  # empty on ranks other than 0
        for k, v in st.items():
            out[f"optim.{name}.{k}"] = torch.as_tensor(v).clone()
    return out


def _local_state(model, opt) -> dict:
    """Like _full_state, but each sharded tensor as (this rank's shard,) and nothing gathered."""
    from torch.distributed.tensor import DTensor

    msd, osd = get_state_dict(model, opt)
    flat = {f"model.{k}": v for k, v in msd.items()}
    for name, st in osd["state"].items():
        for k, v in st.items():
            flat[f"optim.{name}.{k}"] = v
    return {k: (v.to_local(),) if isinstance(v, DTensor) else torch.as_tensor(v) for k, v in flat.items()}


def _train_step(model, opt, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=g)
    model(ids, labels=ids, mtp=True).loss.backward()
    opt.step()
    opt.zero_grad()


def _rank(rank: int, world: int, root: str) -> dict:
    dist.init_process_group("gloo", rank=rank, world_size=world)
    res = {}
    if world == 2:  # train one step sharded, save, export
        model = _shard(_model(0), experts_on_dim1=True)
        res["expert_local"] = tuple(model.model.layers[1].mlp.experts.gate_up_proj.to_local().shape)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        _train_step(model, opt, 1)
        ckpt.save(root, 1, model, opt, extra={"data": {"epoch": 0, "position": 7}})
        full = _full_state(model, opt)
        export_sharded(model, os.path.join(root, "export"))
        export_sharded(model, os.path.join(root, "export-fp8"), fp8=True)
        if rank == 0:
            torch.save(full, os.path.join(root, "reference.pt"))
        res["local_rows"] = model.model.embed_tokens.weight.to_local().shape[0]
    else:  # a different model and optimizer, sharded over 4, filled from the checkpoint
        model = _shard(_model(1))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        res["extra"] = ckpt.load(root, model, opt)
        # each rank checks its own shards against the saved full tensors (no gathering)
        ref = torch.load(os.path.join(root, "reference.pt"))
        mine = _local_state(model, opt)
        res["keys_equal"] = sorted(ref) == sorted(mine)
        worst = 0.0
        for k, v in mine.items():
            expect = torch.chunk(ref[k], world)[rank] if isinstance(v, tuple) else ref[k]  # FSDP2's dim-0 split
            got = v[0] if isinstance(v, tuple) else v
            assert got.shape == expect.shape, (k, got.shape, expect.shape)
            worst = max(worst, float((got.float() - expect.float()).abs().max()) if got.numel() else 0.0)
        res["max_diff"] = worst
    return res


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("dcp")
    res = run_ranks(_rank, 2, str(root))  # fork: this process never starts a process group or CUDA
    return root, res


def test_saved_by_two_ranks_each_writing_its_shards(saved):
    root, res = saved
    assert res[0]["local_rows"] == res[1]["local_rows"] == 256  # the embedding's 512 rows, half each
    assert res[0]["expert_local"] == (8, 32, 64)  # 8 experts x (2 x 32 of 64 rows) x hidden 64
    d = ckpt.step_dir(root, 1)
    assert ckpt.latest(root) == 1
    assert sorted(p.name for p in d.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not list(root.glob(".step-*"))


def test_loads_on_four_ranks(saved):
    root, _ = saved
    res = run_ranks(_rank, 4, str(root))
    assert res[0]["extra"] == {"step": 1, "data": {"epoch": 0, "position": 7}}
    assert res[0]["keys_equal"]
    assert res[0]["max_diff"] == 0.0


def test_loads_on_one_process_unsharded(saved):
    root, _ = saved
    model = _model(2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    assert ckpt.load(root, model, opt)["step"] == 1
    ref = torch.load(root / "reference.pt")
    full = _full_state(model, opt)
    assert sorted(ref) == sorted(full)
    assert any(k.endswith("exp_avg_sq") for k in ref)
    for k in ref:
        assert torch.equal(ref[k], full[k]), k
    # and training goes on from there as it would have from the saved state
    _train_step(model, opt, 3)


def test_export_streams_the_full_weights(saved):
    root, _ = saved
    ref = torch.load(root / "reference.pt")
    model = MiMoForCausalLM.from_pretrained(root / "export", dtype=torch.float32)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[f"model.{k}"]), k


def test_export_fp8_has_real_block_scales(saved):
    from safetensors import safe_open

    from mimo_flash.quant.blocks import dequantize

    root, _ = saved
    ref = torch.load(root / "reference.pt")
    files = list((root / "export-fp8").glob("*.safetensors"))
    with safe_open(str(files[0]), "pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        s = f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale_inv")
        e = f.get_tensor("model.layers.1.mlp.experts.3.up_proj.weight")
        es = f.get_tensor("model.layers.1.mlp.experts.3.up_proj.weight_scale_inv")
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    w = ref["model.model.layers.0.self_attn.qkv_proj.weight"][: q.shape[0]]  # q_proj: the fused tensor's first rows
    assert s.shape == (-(-w.shape[0] // 128), -(-w.shape[1] // 128))
    assert torch.allclose(s.flatten()[0], w.abs().max() / 448)  # one block: scale = amax / 448
    back = dequantize(q, s, (128, 128), dtype=torch.float32)
    assert (back - w).abs().max() <= w.abs().max() / 16  # e4m3: 3 mantissa bits
    gate_up = ref["model.model.layers.1.mlp.experts.gate_up_proj"]
    up = gate_up[3, gate_up.shape[1] // 2:]
    assert torch.allclose(es.flatten()[0], up.abs().max() / 448)
    assert e.shape == up.shape


def test_a_save_that_dies_midway_leaves_no_step(tmp_path, monkeypatch):
    model = _model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train_step(model, opt, 1)
    ckpt.save(tmp_path, 1, model, opt)
    real_save = ckpt.dcp.save

    def dies(state, checkpoint_id):
        real_save({"model": state["model"]}, checkpoint_id=checkpoint_id)  # some shards written...
        raise KeyboardInterrupt("killed while saving")

    _train_step(model, opt, 2)
    monkeypatch.setattr(ckpt.dcp, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(tmp_path, 2, model, opt)
    monkeypatch.setattr(ckpt.dcp, "save", real_save)
    assert not ckpt.step_dir(tmp_path, 2).exists()
    assert ckpt.latest(tmp_path) == 1
    fresh, fopt = _model(5), None
    assert ckpt.load(tmp_path, fresh, fopt)["step"] == 1
    # the next save of that step replaces the leftover
    ckpt.save(tmp_path, 2, model, opt)
    assert ckpt.latest(tmp_path) == 2 and not list(tmp_path.glob(".step-*"))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt.load(tmp_path / "nothing", fresh)
