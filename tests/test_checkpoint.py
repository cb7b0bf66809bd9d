"""Checkpoint I/O: round trips, FP8 (de)quantization, layouts, MTP, atomic saves, convert."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mimo_flash import MiMoConfig, MiMoForCausalLM
from mimo_flash.checkpoint import (CheckpointError, CheckpointWarning, convert_checkpoint, dequantize,
                                   is_quantized, load_pretrained, quantize, to_hub, write_synthetic_checkpoint)
from mimo_flash.checkpoint import files as ckfiles
from mimo_flash.quant.blocks import FP8, scale_grid

F32 = torch.float32


@pytest.fixture(scope="module")
def model() -> MiMoForCausalLM:
    torch.manual_seed(0)
    m = MiMoForCausalLM(MiMoConfig.preset("tiny")).eval()
    with torch.no_grad():  # non-trivial values everywhere (norms, router bias) so that mix-ups show
        for name, t in m.state_dict().items():
            if "norm" in name or "bias" in name:
                t.copy_(torch.randn_like(t) * 0.1 + (1.0 if "norm" in name else 0.0))
    return m


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, read with the safetensors library itself."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                out[k] = fh.get_tensor(k)
    return out


def assert_same_state(a: MiMoForCausalLM, b: MiMoForCausalLM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def reference_dequant(q: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float64 reference: w[r, c] = q[r, c] * s[r // br, c // bc] (2-D only)."""
    R, C = q.shape
    rows = torch.arange(R) // block[0]
    cols = torch.arange(C) // block[1]
    return q.double() * s.double()[rows][:, cols]


# ----------------------------------------------------------------------------------------- round trips
def test_hub_roundtrip_is_exact_and_uses_release_names(model, tmp_path):
    model.save_pretrained(tmp_path / "ck", max_shard_size="300KB")
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / "ck" / s).is_file() for s in shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors_of(tmp_path / "ck").values())
    c = model.config
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in names
    assert "model.layers.1.mlp.experts.0.down_proj.weight" in names
    assert "model.layers.1.self_attn.attention_sink_bias" in names  # SWA layer
    assert "model.layers.0.self_attn.attention_sink_bias" not in names  # full attention: no sink
    assert "model.layers.0.mlp.gate_proj.weight" in names  # dense layer 0
    assert f"model.mtp.layers.{c.num_nextn_predict_layers - 1}.final_layernorm.weight" in names
    assert not any("gate_up_proj" in n or n.endswith("experts.down_proj") or "sinks" in n for n in names)
    # the hub tensors are exactly ours, split per expert
    on_disk = tensors_of(tmp_path / "ck")
    ours = dict(to_hub(model.state_dict(), model.config))
    assert set(on_disk) == set(ours)
    for k, t in ours.items():
        assert torch.equal(on_disk[k], t), k
    again = MiMoForCausalLM.from_pretrained(tmp_path / "ck", dtype=F32)
    assert_same_state(model, again)
    ids = torch.randint(0, c.vocab_size, (2, 3 * c.sliding_window))
    with torch.no_grad():
        assert torch.equal(model(ids, mtp=True).mtp_logits[-1], again(ids, mtp=True).mtp_logits[-1])


def test_default_dtype_is_bf16_router_stays_fp32(model, tmp_path):
    model.save_pretrained(tmp_path / "ck", dtype="bf16")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and "quantization_config" not in cfg
    disk = tensors_of(tmp_path / "ck")
    assert disk["model.layers.1.mlp.gate.weight"].dtype == F32
    assert disk["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == F32
    assert disk["model.layers.1.self_attn.q_proj.weight"].dtype == torch.bfloat16
    m = MiMoForCausalLM.from_pretrained(tmp_path / "ck")
    assert m.dtype == torch.bfloat16 and m.config.torch_dtype == "bfloat16"
    assert m.model.layers[1].mlp.gate.weight.dtype == F32
    assert torch.equal(m.model.layers[1].mlp.gate.weight, model.model.layers[1].mlp.gate.weight)
    assert torch.equal(m.lm_head.weight, model.lm_head.weight.bfloat16())


def test_transformers_layout_roundtrip(model, tmp_path):
    """Our writer's transformers layout (fused experts, `sinks`) loads back exactly."""
    model.save_pretrained(tmp_path / "tf", layout="transformers")
    names = set(tensors_of(tmp_path / "tf"))
    assert "model.layers.1.mlp.experts.gate_up_proj" in names and "model.layers.1.self_attn.sinks" in names
    assert not any(".experts.0." in n or "attention_sink_bias" in n for n in names)
    assert_same_state(model, MiMoForCausalLM.from_pretrained(tmp_path / "tf", dtype=F32))


def test_single_file_path_and_mixed_layout(model, tmp_path):
    """A path to the .safetensors file works; a checkpoint mixing fused and per-expert tensors too."""
    state = dict(to_hub(model.state_dict(), model.config))
    fused = "model.layers.2.mlp.experts.gate_up_proj"
    for k in [k for k in state if k.startswith("model.layers.2.mlp.experts.") and "down" not in k]:
        del state[k]
    state[fused] = model.state_dict()[fused]
    state["model.layers.3.self_attn.sinks"] = state.pop("model.layers.3.self_attn.attention_sink_bias")
    (tmp_path / "ck").mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "ck" / "weights.safetensors"))
    model.config.save_pretrained(tmp_path / "ck")
    assert_same_state(model, load_pretrained(tmp_path / "ck" / "weights.safetensors", dtype=F32))


# -------------------------------------------------------------------------------------------------- FP8
@pytest.mark.parametrize("shape,block", [((37, 50), (16, 16)), ((200, 300), (128, 128)), ((96, 64), (128, 128)),
                                         ((64, 48), (16, 32))])
def test_dequantize_matches_float64_reference(shape, block):
    g = torch.Generator().manual_seed(1)
    q = (torch.randn(shape, generator=g) * 100).clamp(-448, 448).to(FP8)
    grid = scale_grid(shape, block)
    s = (torch.randperm(math.prod(grid), generator=g).float() + 1).view(grid) * 1e-3  # all distinct
    ref = reference_dequant(q, s, block)
    assert torch.equal(dequantize(q, s, block), ref.float())  # one rounding of an exact product
    bf = dequantize(q, s, block, dtype=torch.bfloat16)
    assert torch.equal(bf, ref.float().bfloat16())
    # extra trailing scale rows/cols are ignored, in place output into a view works
    big = torch.full((grid[0] + 2, grid[1] + 1), 1e6)
    big[: grid[0], : grid[1]] = s
    out = torch.zeros(2, *shape)
    dequantize(q, big, block, out=out[1])
    assert torch.equal(out[1], ref.float()) and not out[0].any()


def test_quantize_real_block_scales_and_zero_blocks():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(40, 70, generator=g, dtype=torch.float64).float()
    w[:16, :16] *= 1e-4   # a block of small weights keeps its precision (no unit scale)
    w[16:32, 16:32] = 0   # an all-zero block
    q, s = quantize(w, (16, 16))
    assert q.dtype == FP8 and s.dtype == F32 and s.shape == (3, 5)
    for i in range(3):
        for j in range(5):
            blk = w[i * 16:(i + 1) * 16, j * 16:(j + 1) * 16]
            if blk.abs().max() == 0:
                assert s[i, j] > 0 and not q[i * 16:(i + 1) * 16, j * 16:(j + 1) * 16].float().any()
            else:
                assert s[i, j] == blk.abs().max() / 448  # amax / 448: the block's largest maps to 448
                assert q[i * 16:(i + 1) * 16, j * 16:(j + 1) * 16].float().abs().max() == 448
    back = dequantize(q, s, (16, 16))
    assert torch.equal(back[16:32, 16:32], torch.zeros(16, 16))
    err = (back - w).abs()
    scale = s.repeat_interleave(16, 0).repeat_interleave(16, 1)[:40, :70]
    assert (err <= w.abs() * 2**-4 + scale * 2**-10).all()  # e4m3: 3 mantissa bits, subnormal step 2^-9
    assert (err[:16, :16] <= w[:16, :16].abs() * 2**-4 + 1e-9).all()


def test_quantize_rejects_non_finite():
    w = torch.ones(4, 4)
    w[1, 2] = float("nan")
    with pytest.raises(ValueError, match="w0.*non-finite"):
        quantize(w, (2, 2), name="w0")


def test_fp8_export_quantizes_exactly_the_release_tensors(model, tmp_path):
    model.save_pretrained(tmp_path / "ck", fp8=True, dtype="bf16")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": [128, 128]}
    disk = tensors_of(tmp_path / "ck")
    ours = dict(to_hub(model.state_dict(), model.config))
    fp8_names = {k for k, t in disk.items() if t.dtype == FP8}
    expected = {k for k in ours if any(p in k for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj",
                                                        "down_proj"))}
    assert fp8_names == expected
    assert all(is_quantized(k) for k in expected) and "model.layers.0.mlp.down_proj.weight" in expected
    assert "model.mtp.layers.0.mlp.up_proj.weight" in expected
    for k in ("lm_head.weight", "model.embed_tokens.weight", "model.layers.1.self_attn.o_proj.weight",
              "model.mtp.layers.0.eh_proj.weight", "model.layers.1.self_attn.attention_sink_bias",
              "model.norm.weight"):
        assert disk[k].dtype == torch.bfloat16 and k + "_scale_inv" not in disk, k
    assert disk["model.layers.1.mlp.gate.weight"].dtype == F32
    for k in expected:  # real per-block scales: amax / 448 over the (partial, 128x128) block
        w = ours[k].double()
        s = disk[k + "_scale_inv"]
        assert s.dtype == F32 and tuple(s.shape) == scale_grid(tuple(w.shape), (128, 128))
        for i in range(s.shape[0]):
            for j in range(s.shape[1]):
                amax = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].abs().max()
                assert s[i, j].item() == pytest.approx(amax.item() / 448, rel=1e-6), k
    back = MiMoForCausalLM.from_pretrained(tmp_path / "ck", dtype=F32)
    assert back.config.quantization_config is None
    for k, t in dict(to_hub(back.state_dict(), back.config)).items():
        w = ours[k]
        if k in expected:
            grid = disk[k + "_scale_inv"].repeat_interleave(128, 0).repeat_interleave(128, 1)
            s = grid[: w.shape[0], : w.shape[1]]
            assert ((t - w).abs() <= w.abs() * 2**-4 + s * 2**-10).all(), k
            assert torch.equal(t, reference_dequant(disk[k], disk[k + "_scale_inv"], (128, 128)).float()), k
        elif t.dtype == F32 and ("mlp.gate." in k):
            assert torch.equal(t, w), k
        else:
            assert torch.equal(t, w.bfloat16().float()), k


@pytest.mark.parametrize("layout", ["hub", "transformers"])
def test_load_synthetic_fp8_against_float64_reference(tmp_path, layout):
    """Block 16 on tiny shapes (edges partial), distinct scale per block; fused FP8 experts too."""
    config = MiMoConfig.preset("tiny")
    write_synthetic_checkpoint(tmp_path / "ck", config, block_size=(16, 16), max_shard_size="200KB", layout=layout)
    disk = tensors_of(tmp_path / "ck")
    scales = [v for k, v in disk.items() if k.endswith("_scale_inv")]
    flat = torch.cat([s.flatten() for s in scales])
    assert len(flat.unique()) > 0.99 * len(flat)  # distinct per block (bar float coincidences)
    m = load_pretrained(tmp_path / "ck", dtype=F32)
    assert m.config.num_nextn_predict_layers == config.num_nextn_predict_layers
    ours = dict(to_hub(m.state_dict(), m.config))
    checked = 0
    for k, t in ours.items():
        if layout == "transformers" and ".experts." in k:
            continue
        if k in disk and disk[k].dtype == FP8:
            ref = reference_dequant(disk[k], disk[k + "_scale_inv"], (16, 16))
            assert torch.equal(t, ref.float()), k
            checked += 1
        elif k in disk:
            assert torch.equal(t, disk[k].float()), k
    if layout == "transformers":
        q, s = disk["model.layers.1.mlp.experts.gate_up_proj"], disk["model.layers.1.mlp.experts.gate_up_proj_scale_inv"]
        for e in range(config.n_routed_experts):
            got = m.model.layers[1].mlp.experts.gate_up_proj[e]
            assert torch.equal(got, reference_dequant(q[e], s[e], (16, 16)).float())
            checked += 1
    assert checked > 20


def test_kproj_extra_scale_rows_one_warning(tmp_path):
    config = MiMoConfig.preset("tiny")
    write_synthetic_checkpoint(tmp_path / "ck", config, block_size=(16, 16), kproj_extra_scale=(2, 1))
    disk = tensors_of(tmp_path / "ck")
    k0 = "model.layers.0.self_attn.k_proj.weight"
    assert disk[k0 + "_scale_inv"].shape == (48 // 16 + 2, 64 // 16 + 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = load_pretrained(tmp_path / "ck", dtype=F32)
    ours = [w for w in caught if issubclass(w.category, CheckpointWarning)]
    assert len(ours) == 1
    msg = str(ours[0].message)
    assert k0 + "_scale_inv" in msg and "model.layers.5.self_attn.k_proj.weight_scale_inv" in msg
    assert "model.layers.1.self_attn.k_proj" not in msg  # SWA layers have standard scales
    ref = reference_dequant(disk[k0], disk[k0 + "_scale_inv"][:3, :4], (16, 16))
    d = config.attn_dims(False)
    q = d["heads"] * d["qk_dim"]  # the k rows of the fused q/k/v weight follow the q rows
    k_rows = m.model.layers[0].self_attn.qkv_proj.weight[q:q + d["kv_heads"] * d["qk_dim"]]
    assert torch.equal(k_rows, ref.float())
    assert k_rows.abs().max() < 1  # the 1e6 extras were not used


# ------------------------------------------------------------------------------------------------- MTP
def _drop_config_key(path: Path, key: str) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop(key)
    (path / "config.json").write_text(json.dumps(cfg))


def test_mtp_count_from_checkpoint_when_config_lacks_it(tmp_path):
    torch.manual_seed(0)
    m1 = MiMoForCausalLM(MiMoConfig.preset("tiny", num_nextn_predict_layers=1))
    m1.save_pretrained(tmp_path / "ck")
    _drop_config_key(tmp_path / "ck", "num_nextn_predict_layers")
    got = load_pretrained(tmp_path / "ck", dtype=F32)
    assert got.config.num_nextn_predict_layers == 1 and len(got.model.mtp.layers) == 1
    assert_same_state(m1, got)


def test_mtp_load_skip_and_mismatch(model, tmp_path):
    model.save_pretrained(tmp_path / "ck")
    no_mtp = load_pretrained(tmp_path / "ck", dtype=F32, load_mtp=False)  # strict, yet MTP tensors are fine
    assert no_mtp.config.num_nextn_predict_layers == 0 and len(no_mtp.model.mtp.layers) == 0
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 2
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json.*num_nextn_predict_layers=2.*3 MTP layer"):
        load_pretrained(tmp_path / "ck")


def test_checkpoint_without_mtp_warns_and_builds_without(model, tmp_path):
    model.save_pretrained(tmp_path / "full")
    convert_checkpoint(tmp_path / "full", tmp_path / "ck", load_mtp=False)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 0
    cfg["num_nextn_predict_layers"] = 3
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(CheckpointWarning, match="no MTP weights"):
        m = load_pretrained(tmp_path / "ck", dtype=F32)
    assert len(m.model.mtp.layers) == 0


# ---------------------------------------------------------------------------------------- atomic saves
def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}


def test_resave_keeps_foreign_files_and_drops_stale_shards(model, tmp_path):
    ck = tmp_path / "ck"
    model.save_pretrained(ck, max_shard_size="300KB")
    (ck / "tokenizer.json").write_text('{"tok": 1}')
    (ck / "extras").mkdir()
    (ck / "extras" / "notes.txt").write_text("keep me")
    model.save_pretrained(ck)  # one shard now
    names = sorted(p.name for p in ck.iterdir())
    assert names == ["config.json", "extras", "model.safetensors", "tokenizer.json"]
    assert (ck / "tokenizer.json").read_text() == '{"tok": 1}'
    assert (ck / "extras" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary directories left
    assert_same_state(model, load_pretrained(ck, dtype=F32))


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_interrupted_save_leaves_previous_checkpoint(model, tmp_path, monkeypatch, exc):
    ck = tmp_path / "ck"
    model.save_pretrained(ck, max_shard_size="300KB")
    (ck / "tokenizer.json").write_text("{}")
    before = _snapshot(ck)
    calls = {"n": 0}
    real = ckfiles._write_tensor

    def failing(f, t, *a, **k):
        calls["n"] += 1
        if calls["n"] == 40:
            raise exc("interrupted")
        return real(f, t, *a, **k)

    monkeypatch.setattr(ckfiles, "_write_tensor", failing)
    with pytest.raises(exc):
        model.save_pretrained(ck, dtype="bf16", max_shard_size="300KB")
    assert _snapshot(ck) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    calls["n"] = 0
    with pytest.raises(exc):
        model.save_pretrained(tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # nothing half-written at a new path


# --------------------------------------------------------------------------------------------- convert
def test_convert_cli_fp8_hub_to_bf16_fp8_and_no_mtp(tmp_path, capsys):
    from mimo_flash.cli import main

    config = MiMoConfig.preset("tiny")
    src = tmp_path / "src"
    write_synthetic_checkpoint(src, config, block_size=(16, 16), kproj_extra_scale=(2, 0))
    (src / "tokenizer.json").write_text('{"t": 1}')
    (src / "generation_config.json").write_text("{}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        reference = load_pretrained(src)  # bf16, dequantized

        assert main(["convert", str(src), str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
        assert "wrote" in capsys.readouterr().out
        cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
        assert "quantization_config" not in cfg and cfg["torch_dtype"] == "bfloat16"
        assert (tmp_path / "bf16" / "tokenizer.json").read_text() == '{"t": 1}'
        assert (tmp_path / "bf16" / "generation_config.json").exists()
        assert not any(t.dtype == FP8 for t in tensors_of(tmp_path / "bf16").values())
        assert_same_state(reference, load_pretrained(tmp_path / "bf16"))

        # FP8 -> FP8 with the same blocks is an exact copy (k_proj scales trimmed to the standard grid)
        assert main(["convert", str(src), str(tmp_path / "fp8"), "--fp8", "--no-mtp"]) == 0
        a, b = tensors_of(src), tensors_of(tmp_path / "fp8")
        assert not any(k.startswith("model.mtp.") for k in b)
        assert json.loads((tmp_path / "fp8" / "config.json").read_text())["num_nextn_predict_layers"] == 0
        for k, t in b.items():
            if k.endswith("k_proj.weight_scale_inv") and (k.startswith("model.layers.0.")
                                                         or k.startswith("model.layers.5.")):
                assert torch.equal(t, a[k][:3])
            else:
                assert torch.equal(t.view(torch.uint8) if t.dtype == FP8 else t,
                                   a[k].view(torch.uint8) if a[k].dtype == FP8 else a[k]), k
    # bf16 hub -> transformers layout fp32 -> back to hub: all the same numbers
    assert main(["convert", str(tmp_path / "bf16"), str(tmp_path / "tf"), "--layout", "transformers",
                 "--dtype", "fp32"]) == 0
    assert "model.layers.1.mlp.experts.gate_up_proj" in tensors_of(tmp_path / "tf")
    assert main(["convert", str(tmp_path / "tf"), str(tmp_path / "hub"), "--dtype", "bf16"]) == 0
    assert_same_state(reference, load_pretrained(tmp_path / "hub"))


def test_convert_cli_bad_input_is_one_line(tmp_path, capsys):
    from mimo_flash.cli import main

    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mimo-flash convert: error:") and "nope" in err and "\n" not in err
    (tmp_path / "empty").mkdir()
    assert main(["convert", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- pickle
def test_pickle_refused_unless_allowed(model, tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    torch.save({k: v.clone() for k, v in to_hub(model.state_dict(), model.config)}, ck / "pytorch_model.bin")
    model.config.save_pretrained(ck)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*allow_pickle=True"):
        load_pretrained(ck)
    assert_same_state(model, load_pretrained(ck, dtype=F32, allow_pickle=True))
