"""FP8 block weights: the format (blocks), the products (gemm, triton_fp8), the FP8-resident modules and the
swap that installs them (modules)."""

from .blocks import BLOCK, FP8, dequantize, quantize, quantize_activations
from .gemm import fp8_experts, fp8_linear
from .modules import QUANTIZED_MODULES, FP8Experts, FP8Linear, quantize_model_

__all__ = ["BLOCK", "FP8", "FP8Experts", "FP8Linear", "QUANTIZED_MODULES", "dequantize", "fp8_experts", "fp8_linear",
           "quantize", "quantize_activations", "quantize_model_"]
