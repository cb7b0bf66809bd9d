"""Checkpoint I/O: hub-format (and transformers-format) safetensors, FP8 tensors included (their block format and
(de)quantization live in quant/blocks.py).

load_pretrained / save_pretrained are what MiMoForCausalLM.from_pretrained / save_pretrained call;
convert_checkpoint streams one checkpoint into another; write_synthetic_checkpoint makes test data, and
SyntheticCheckpoint is the same data unwritten (loadable in place of a path, generated as it is read).
"""

from .errors import CheckpointError, CheckpointWarning
from ..quant.blocks import dequantize, quantize
from .load import load_pretrained, parse_dtype, plan_checkpoint
from .names import hub_parts, is_quantized, to_hub
from .reader import CheckpointReader, open_checkpoint
from .save import convert_checkpoint, parse_size, save_pretrained
from .synthetic import SyntheticCheckpoint, write_synthetic_checkpoint

__all__ = ["CheckpointError", "CheckpointReader", "CheckpointWarning", "convert_checkpoint", "dequantize",
           "hub_parts", "is_quantized", "load_pretrained", "open_checkpoint", "parse_dtype", "parse_size",
           "plan_checkpoint", "quantize", "save_pretrained", "SyntheticCheckpoint", "to_hub",
           "write_synthetic_checkpoint"]
