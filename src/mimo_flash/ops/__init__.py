from .attention import AttnMeta, attention
from .moe import experts, route

__all__ = ["AttnMeta", "attention", "experts", "route"]
