from .loss import head_loss, shifted_targets, target_counts
from .model import CausalLMOutput, DecoderLayer, MiMoForCausalLM, MiMoModel, build_meta
from .mtp import MTPLayer

__all__ = ["CausalLMOutput", "DecoderLayer", "MiMoForCausalLM", "MiMoModel", "MTPLayer", "build_meta",
           "head_loss", "shifted_targets", "target_counts"]
