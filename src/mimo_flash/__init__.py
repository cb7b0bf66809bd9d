"""mimo-flash: a standalone PyTorch implementation of Xiaomi's MiMo-V2-Flash."""

from .config import MiMoConfig
from .model import MiMoForCausalLM

__version__ = "0.1.0"
__all__ = ["MiMoConfig", "MiMoForCausalLM", "__version__"]
