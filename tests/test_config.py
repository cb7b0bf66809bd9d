"""MiMoConfig: presets, both config formats, round trips, validation."""

from __future__ import annotations

import json

import pytest
import torch

from mimo_flash import MiMoConfig, MiMoForCausalLM

# The released model's hub config.json, as SPEC.md describes it (fields that matter to the model).
HUB = {
    "architectures": ["MiMoV2FlashForCausalLM"], "model_type": "mimo_v2_flash",
    "vocab_size": 152576, "hidden_size": 4096, "intermediate_size": 16384, "num_hidden_layers": 48,
    "max_position_embeddings": 262144, "num_attention_heads": 64, "num_key_value_heads": 4,
    "head_dim": 192, "v_head_dim": 128, "rope_theta": 5000000, "add_full_attention_sink_bias": False,
    "swa_num_attention_heads": 64, "swa_num_key_value_heads": 8, "swa_head_dim": 192, "swa_v_head_dim": 128,
    "swa_rope_theta": 10000, "add_swa_attention_sink_bias": True, "sliding_window_size": 128,
    "sliding_window": 128, "partial_rotary_factor": 0.334, "attention_value_scale": 0.707,
    "hybrid_layer_pattern": [0 if (i == 0 or (i + 1) % 6 == 0) else 1 for i in range(48)],
    "moe_layer_freq": [0] + [1] * 47, "n_routed_experts": 256, "num_experts_per_tok": 8,
    "moe_intermediate_size": 2048, "n_shared_experts": None, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
    "n_group": 1, "topk_group": 1, "norm_topk_prob": True, "routed_scaling_factor": None,
    "hidden_act": "silu", "layernorm_epsilon": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128]},
}


def test_flash_preset_is_the_released_model():
    c = MiMoConfig.preset("flash")
    assert c == MiMoConfig.from_dict(HUB).replace(quantization_config=None)
    assert [i for i in range(48) if not c.is_swa(i)] == [0, 5, 11, 17, 23, 29, 35, 41, 47]
    assert c.sliding_window == 129 and c.routed_scaling_factor == 1.0
    assert c.attn_dims(True)["rotary_dim"] == 64 and c.attn_dims(False)["rotary_dim"] == 64
    with torch.device("meta"):
        m = MiMoForCausalLM(c)
    assert 309e9 < m.num_parameters() < 310.5e9  # "309B parameters", MTP included
    per_mtp = sum(p.numel() for p in m.model.mtp.layers[0].parameters())
    assert 0.3e9 < per_mtp < 0.36e9  # "about 0.33B params each"


def test_hub_config_reads_every_field():
    c = MiMoConfig.from_dict(HUB)
    assert c.quantization_config["weight_block_size"] == [128, 128]
    assert (c.swa_num_key_value_heads, c.num_key_value_heads, c.swa_rope_theta, c.rope_theta) == (8, 4, 1e4, 5e6)
    assert c.num_nextn_predict_layers == 3  # absent from the hub config: the released model's value
    assert MiMoConfig.from_dict({**HUB, "num_nextn_predict_layers": 1}).num_nextn_predict_layers == 1
    assert MiMoConfig.from_dict({**HUB, "sliding_window_size": 127}).sliding_window == 128


def test_mini_and_tiny_presets():
    mini = MiMoConfig.preset("mini")
    with torch.device("meta"):
        m = MiMoForCausalLM(mini)
    assert 1.2e9 < m.num_parameters() < 1.45e9 and 0.25e9 < m.num_parameters(active=True) < 0.4e9
    tiny = MiMoConfig.preset("tiny")
    assert set(tiny.hybrid_layer_pattern) == {0, 1} and tiny.hybrid_layer_pattern.count(1) >= 4
    assert tiny.swa_num_key_value_heads == 2 * tiny.num_key_value_heads
    assert tiny.head_dim != tiny.v_head_dim and tiny.add_swa_attention_sink_bias
    assert tiny.moe_layer_freq[0] == 0 and all(tiny.moe_layer_freq[1:]) and tiny.num_nextn_predict_layers == 3
    with pytest.raises(ValueError, match="unknown preset"):
        MiMoConfig.preset("huge")


def test_transformers_format_reads_the_same_model():
    transformers = pytest.importorskip("transformers")
    tf = transformers.MiMoV2FlashConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=16, sliding_window=33, routed_scaling_factor=None)
    c = MiMoConfig.from_dict(tf.to_dict())
    assert c.hybrid_layer_pattern == [0, 1, 1, 1, 1, 0, 1] and c.moe_layer_freq == [0] + [1] * 6
    assert c.sliding_window == 33 and c.swa_num_key_value_heads == 4 and c.swa_head_dim == 24
    assert (c.rope_theta, c.swa_rope_theta, c.partial_rotary_factor) == (5e6, 1e4, 0.334)
    assert c.add_swa_attention_sink_bias and not c.add_full_attention_sink_bias


def test_save_reads_back_equal_and_transformers_agrees(tmp_path):
    transformers = pytest.importorskip("transformers")
    c = MiMoConfig.preset("tiny", n_group=2, topk_group=1, routed_scaling_factor=1.5, sliding_window=17)
    c.save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["sliding_window_size"] == 16 and d["hybrid_layer_pattern"] == c.hybrid_layer_pattern
    assert MiMoConfig.from_pretrained(tmp_path) == c
    tf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert tf.sliding_window == 17 and tf.n_group == 2 and tf.routed_scaling_factor == 1.5
    assert [t == "sliding_attention" for t in tf.layer_types] == [bool(x) for x in c.hybrid_layer_pattern]
    assert tf.rope_parameters["sliding_attention"]["rope_theta"] == c.swa_rope_theta
    assert tf.num_key_value_heads * 2 == c.swa_num_key_value_heads and tf.v_head_dim == c.v_head_dim
    assert c.transformers_compatible() == []
    assert MiMoConfig.preset("tiny", swa_num_key_value_heads=4).transformers_compatible()


@pytest.mark.parametrize("overrides, field", [
    (dict(num_key_value_heads=3), "num_attention_heads"),
    (dict(swa_num_key_value_heads=3), "swa_num_attention_heads"),
    (dict(hybrid_layer_pattern=[0, 1, 1]), "hybrid_layer_pattern"),
    (dict(hybrid_layer_pattern=[0, 2, 1, 1, 1, 0]), "hybrid_layer_pattern"),
    (dict(moe_layer_freq=[0, 1]), "moe_layer_freq"),
    (dict(partial_rotary_factor=0.32), "partial_rotary_factor"),  # int(48 * 0.32) = 15: odd rotary dim
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(n_group=3), "n_group"),
    (dict(n_group=2, topk_group=3), "topk_group"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(sliding_window=-1), "sliding_window"),
    (dict(n_shared_experts=1), "n_shared_experts"),
])
def test_bad_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"MiMoConfig.{field}"):
        MiMoConfig.preset("tiny", **overrides)


def test_bad_config_files(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        MiMoConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**HUB, "layer_types": ["full_attention", "weird"]}))
    MiMoConfig.from_pretrained(tmp_path)  # hybrid_layer_pattern wins over layer_types
    (tmp_path / "config.json").write_text(json.dumps({"layer_types": ["full_attention", "weird"],
                                                      "num_hidden_layers": 2}))
    with pytest.raises(ValueError, match="unknown layer type 'weird'"):
        MiMoConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        MiMoConfig.from_pretrained(tmp_path / "missing")
