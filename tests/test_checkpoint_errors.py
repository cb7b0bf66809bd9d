"""Every way a checkpoint can be bad gets a one-line error naming the file and the tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mimo_flash import MiMoConfig, MiMoForCausalLM
from mimo_flash.checkpoint import CheckpointError, CheckpointWarning, load_pretrained, to_hub

F32 = torch.float32
Q = "model.layers.1.self_attn.q_proj.weight"  # [192, 64] in the tiny preset


@pytest.fixture(scope="module")
def model() -> MiMoForCausalLM:
    torch.manual_seed(0)
    return MiMoForCausalLM(MiMoConfig.preset("tiny", num_nextn_predict_layers=1)).eval()


@pytest.fixture
def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone().contiguous() for k, v in to_hub(model.state_dict(), model.config)}


def write(path: Path, state: dict[str, torch.Tensor], config: MiMoConfig | dict) -> Path:
    """A single-file checkpoint: path/model.safetensors + config.json."""
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "model.safetensors"))
    cfg = config if isinstance(config, dict) else config.to_dict()
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def fp8_state(state, block=16):
    """Quantize Q in `state` (crudely) so that FP8 checks have something to bite on."""
    from mimo_flash.checkpoint import quantize
    q, s = quantize(state[Q], (block, block))
    state = dict(state)
    state[Q], state[Q + "_scale_inv"] = q, s
    return state


def fp8_config(model, block=16) -> dict:
    cfg = model.config.to_dict()
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [block, block]}
    return cfg


def test_missing_tensor(model, state, tmp_path):
    del state[Q]
    ck = write(tmp_path / "ck", state, model.config)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: missing 1 tensor.*{Q}"):
        load_pretrained(ck)


def test_missing_expert_tensor(model, state, tmp_path):
    del state["model.layers.2.mlp.experts.3.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"missing 1 tensor.*experts\.3\.up_proj\.weight"):
        load_pretrained(write(tmp_path / "ck", state, model.config))


def test_unexpected_tensor_strict_and_not(model, state, tmp_path):
    state["model.layers.1.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    ck = write(tmp_path / "ck", state, model.config)
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*rotary_emb\.inv_freq \(in model\.safetensors\).*strict=False"):
        load_pretrained(ck)
    with pytest.warns(CheckpointWarning, match=r"rotary_emb\.inv_freq.*ignored"):
        m = load_pretrained(ck, dtype=F32, strict=False)
    assert torch.equal(m.model.layers[1].self_attn.qkv_proj.weight, model.model.layers[1].self_attn.qkv_proj.weight)


def test_wrong_shape(model, state, tmp_path):
    state[Q] = state[Q][:100]
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor {Q} has shape \[100, 64\], "
                                              r"but config\.json implies \[192, 64\]"):
        load_pretrained(write(tmp_path / "ck", state, model.config))


def test_config_not_matching_tensors(model, state, tmp_path):
    ck = write(tmp_path / "ck", state, model.config.replace(hidden_size=96))
    with pytest.raises(CheckpointError, match=r"model\.embed_tokens\.weight has shape \[512, 64\], but config\.json implies \[512, 96\]"):
        load_pretrained(ck)
    cfg = model.config.to_dict()
    cfg.update(num_hidden_layers=5, hybrid_layer_pattern=cfg["hybrid_layer_pattern"][:5],
               moe_layer_freq=cfg["moe_layer_freq"][:5], layer_types=None, mlp_layer_types=None)
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json does not match the checkpoint: num_hidden_layers=5, "
                                              r"but the checkpoint has layers 0\.\.5"):
        load_pretrained(ck)
    cfg = model.config.to_dict()
    cfg["n_routed_experts"] = 4
    cfg["num_experts_per_tok"] = 2
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"n_routed_experts=4, but the checkpoint has experts 0\.\.7"):
        load_pretrained(ck)


def test_invalid_config(model, state, tmp_path):
    ck = write(tmp_path / "ck", state, model.config)
    (ck / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_pretrained(ck)
    (ck / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(ck)


def test_wrong_dtype(model, state, tmp_path):
    state[Q] = state[Q].to(torch.int32)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor {Q} has dtype torch\.int32; expected a floating"):
        load_pretrained(write(tmp_path / "ck", state, model.config))


def test_fp8_without_scale(model, state, tmp_path):
    state = fp8_state(state)
    del state[Q + "_scale_inv"]
    with pytest.raises(CheckpointError, match=rf"tensor {Q} is FP8 .* has no {Q}_scale_inv"):
        load_pretrained(write(tmp_path / "ck", state, fp8_config(model)))


def test_scale_on_unquantized_tensor(model, state, tmp_path):
    state[Q + "_scale_inv"] = torch.ones(12, 4)
    with pytest.raises(CheckpointError, match=rf"{Q}_scale_inv is a scale for a tensor that is not FP8"):
        load_pretrained(write(tmp_path / "ck", state, model.config))


@pytest.mark.parametrize("shape,why", [((11, 4), "too few rows/cols"), ((12, 3), "too few rows/cols"),
                                       ((48,), "does not fit")])
def test_scale_shape_mismatch(model, state, tmp_path, shape, why):
    state = fp8_state(state)
    state[Q + "_scale_inv"] = torch.ones(shape)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor {Q}_scale_inv: scale shape .*{why}"):
        load_pretrained(write(tmp_path / "ck", state, fp8_config(model)))


def test_bad_quantization_config(model, state, tmp_path):
    cfg = fp8_config(model)
    cfg["quantization_config"]["weight_block_size"] = [0, 16]
    with pytest.raises(CheckpointError, match="weight_block_size must be two positive integers"):
        load_pretrained(write(tmp_path / "ck", fp8_state(state), cfg))
    cfg["quantization_config"] = {"quant_method": "awq"}
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="'awq' is not supported"):
        load_pretrained(tmp_path / "ck")


def test_fp8_without_block_size_warns_and_assumes_128(model, state, tmp_path):
    state = fp8_state(state, block=128)
    with pytest.warns(CheckpointWarning, match="assuming 128x128"):
        m = load_pretrained(write(tmp_path / "ck", state, model.config), dtype=F32)
    got, want = m.model.layers[1].self_attn.qkv_proj.weight, model.model.layers[1].self_attn.qkv_proj.weight
    assert ((got - want).abs() <= want.abs() * 2**-4 + 1e-6).all()  # 128x128 blocks, not 16x16


def test_non_finite_values(model, state, tmp_path):
    bad = dict(state)
    bad["model.layers.3.post_attention_layernorm.weight"] = bad["model.layers.3.post_attention_layernorm.weight"].clone()
    bad["model.layers.3.post_attention_layernorm.weight"][5] = float("nan")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.layers\.3\.post_attention_layernorm\.weight has non-finite"):
        load_pretrained(write(tmp_path / "a", bad, model.config))
    bad = fp8_state(state)
    bad[Q + "_scale_inv"][1, 1] = float("inf")
    with pytest.raises(CheckpointError, match=rf"tensor {Q} has non-finite values .*after dequantization"):
        load_pretrained(write(tmp_path / "b", bad, fp8_config(model)))


@pytest.fixture
def sharded(model, tmp_path) -> Path:
    model.save_pretrained(tmp_path / "ck", max_shard_size="200KB")
    return tmp_path / "ck"


def shards(d: Path) -> list[Path]:
    found = sorted(d.glob("model-*.safetensors"))
    assert len(found) >= 3
    return found


def test_index_names_missing_shard(sharded):
    f = shards(sharded)[1]
    f.unlink()
    with pytest.raises(CheckpointError, match=rf"model\.safetensors\.index\.json: names shard "
                                              rf"{f.name}, which does not exist"):
        load_pretrained(sharded)


def test_index_lists_tensor_not_in_its_shard(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = index["weight_map"][Q]
    other = next(f for f in set(index["weight_map"].values()) if f != shard)
    index["weight_map"][Q] = other
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"lists tensor {Q} in {other}, but {other} has no such tensor"):
        load_pretrained(sharded)


def test_corrupt_index(sharded):
    (sharded / "model.safetensors.index.json").write_text('{"weight_map": [1, 2]}')
    with pytest.raises(CheckpointError, match=r"index\.json: expected"):
        load_pretrained(sharded)


def test_truncated_shard(sharded):
    f = shards(sharded)[2]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=rf"{f.name}: file is truncated: tensor \S+ ends at byte"):
        load_pretrained(sharded)
    f.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match=rf"{f.name}: not a valid safetensors file: .*too short"):
        load_pretrained(sharded)


@pytest.mark.parametrize("garbage", [b"\xff" * 64, (20).to_bytes(8, "little") + b"this is not json!!!!" + b"\0" * 50,
                                     (2).to_bytes(8, "little") + b"[]"])
def test_corrupt_header(sharded, garbage):
    f = shards(sharded)[0]
    f.write_bytes(garbage)
    with pytest.raises(CheckpointError, match=rf"{f.name}: not a valid safetensors file"):
        load_pretrained(sharded)


def test_header_offsets_inconsistent(model, state, tmp_path):
    ck = write(tmp_path / "ck", {"a": torch.zeros(4)}, model.config)
    raw = (ck / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8: 8 + n].replace(b'"shape":[4]', b'"shape":[5]')
    (ck / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + n:])
    with pytest.raises(CheckpointError, match=r"tensor a \(F32 \[5\]\) needs 20 bytes, its offsets span 16"):
        load_pretrained(ck)


def test_pickle_refused(model, state, tmp_path):
    (tmp_path / "ck").mkdir()
    torch.save(state, tmp_path / "ck" / "model.pt")
    model.config.save_pretrained(tmp_path / "ck")
    with pytest.raises(CheckpointError, match=r"model\.pt: pickle checkpoints .* refused.*allow_pickle=True"):
        load_pretrained(tmp_path / "ck" / "model.pt")
    (tmp_path / "ck" / "model.pt").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match=r"model\.pt: cannot be loaded with torch\.load\(weights_only=True\)"):
        load_pretrained(tmp_path / "ck", allow_pickle=True)


def test_errors_are_value_errors_without_chained_tracebacks(model, state, tmp_path):
    state[Q] = state[Q][:100]
    ck = write(tmp_path / "ck", state, model.config)
    with pytest.raises(ValueError) as info:
        MiMoForCausalLM.from_pretrained(ck)
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)
    (ck / "model.safetensors").write_bytes(b"\x01" * 9)
    with pytest.raises(ValueError) as info:
        MiMoForCausalLM.from_pretrained(ck)
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)
