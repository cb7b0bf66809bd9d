from .model import CausalLMOutput, DecoderLayer, MiMoForCausalLM, MiMoModel, build_meta, causal_lm_loss
from .mtp import MTPLayer

__all__ = ["CausalLMOutput", "DecoderLayer", "MiMoForCausalLM", "MiMoModel", "MTPLayer", "build_meta",
           "causal_lm_loss"]
