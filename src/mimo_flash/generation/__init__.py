"""Generation: KV cache (ring buffers for sliding-window layers), sampling, the decode engine, MTP
speculative decoding, CUDA-graph decode, tokenizer / chat template and the generate / chat commands."""

from .cache import KVCache, bytes_report, cache_bytes, format_bytes_report
from .engine import GenerationStats, generate
from .sampling import SamplingParams

__all__ = ["KVCache", "GenerationStats", "SamplingParams", "bytes_report", "cache_bytes", "format_bytes_report",
           "generate"]
