from .io import CheckpointReader, load_pretrained, parse_dtype, save_pretrained
from .names import hub_parts, to_hub

__all__ = ["CheckpointReader", "hub_parts", "load_pretrained", "parse_dtype", "save_pretrained", "to_hub"]
