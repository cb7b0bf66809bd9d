"""Interop with transformers' MiMoV2FlashForCausalLM: our checkpoints load there, theirs load here."""

from __future__ import annotations

import json

import pytest
import torch

from mimo_flash import MiMoConfig, MiMoForCausalLM
from mimo_flash.checkpoint import load_pretrained

transformers = pytest.importorskip("transformers")


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_ours_loads_in_transformers_with_equal_logits(tmp_path):
    torch.manual_seed(0)
    ours = MiMoForCausalLM(MiMoConfig.preset("tiny")).eval()
    ours.save_pretrained(tmp_path / "ck", max_shard_size="300KB")  # hub names, sharded, MTP included
    theirs = transformers.MiMoV2FlashForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32).eval()
    assert theirs.model.layers[1].self_attn.sinks is not None
    assert torch.equal(theirs.model.layers[1].self_attn.sinks, ours.model.layers[1].self_attn.attention_sink_bias)
    ids = torch.randint(0, ours.config.vocab_size, (2, 3 * ours.config.sliding_window))
    assert (logits(ours, ids) - logits(theirs, ids)).abs().max() <= 1e-4


def test_transformers_fused_checkpoint_loads_here(tmp_path):
    torch.manual_seed(1)
    config = MiMoConfig.preset("tiny")
    tf_config = transformers.MiMoV2FlashConfig(**{k: v for k, v in config.to_dict().items()
                                                  if k not in ("num_nextn_predict_layers",)})
    theirs = transformers.MiMoV2FlashForCausalLM(tf_config).eval()
    with torch.no_grad():  # transformers initialises the correction bias to zero; make it matter
        for layer in theirs.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    theirs.save_pretrained(tmp_path / "tf", save_original_format=False)  # fused experts, `sinks`
    cfg = json.loads((tmp_path / "tf" / "config.json").read_text())
    assert "num_nextn_predict_layers" not in cfg  # count must come from the checkpoint: none here
    ours = load_pretrained(tmp_path / "tf", dtype=torch.float32)
    assert ours.config.num_nextn_predict_layers == 0
    assert torch.equal(ours.model.layers[2].mlp.experts.gate_up_proj, theirs.model.layers[2].mlp.experts.gate_up_proj)
    ids = torch.randint(0, config.vocab_size, (2, 3 * config.sliding_window))
    assert (logits(ours, ids) - logits(theirs, ids)).abs().max() <= 1e-4
