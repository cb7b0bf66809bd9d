from . import attention_fast  # noqa: F401  (registers the CUDA attention backends)
from .attention import AttnMeta, attention
from .moe import experts, route

__all__ = ["AttnMeta", "attention", "experts", "route"]
