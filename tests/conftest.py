"""Shared fixtures: small models with every parameter non-trivial, and the transformers oracle."""

from __future__ import annotations

import pytest
import torch

from mimo_flash import MiMoConfig, MiMoForCausalLM


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def randomize(model: MiMoForCausalLM, seed: int = 0) -> MiMoForCausalLM:
    """Make sinks, correction biases and norm weights non-trivial (they start at 0/0/1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("attention_sink_bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 1.5)
            elif name.endswith("e_score_correction_bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.05)
            elif "norm" in name and name.endswith("weight"):
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
    return model


def tiny_model(seed: int = 0, **overrides) -> MiMoForCausalLM:
    torch.manual_seed(seed)
    config = MiMoConfig.preset("tiny", **overrides)
    return randomize(MiMoForCausalLM(config), seed).eval()


def transformers_twin(model: MiMoForCausalLM, tmp_path):
    """The same weights in transformers' MiMoV2FlashForCausalLM (through our hub-format save)."""
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "twin"
    model.save_pretrained(path)
    tf = transformers.MiMoV2FlashForCausalLM.from_pretrained(path, dtype=torch.float32)
    return tf.eval()


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The test models are tiny: one intra-op thread is as fast, and stays fast on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny():
    return tiny_model()
