"""One attention module for both layer types (full and sliding-window)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import MiMoConfig
from ..ops.rope import rope_qkv
from ..ops.attention import AttnMeta, attention, attention_qkv
from .layers import Linear


class Attention(nn.Module):
    """GQA attention with Q/K dim != V dim, value scale, partial RoPE and, on SWA layers, a sink.

    The KV cache hook: `cache.update(layer_idx, k, v, meta)` receives this step's keys [B, Hkv, T, Dqk]
    and values [B, Hkv, T, Dv] (rotated and value-scaled) and returns the keys/values to attend with the
    matching AttnMeta. A cache that has an `attention(q, k, v, meta, scale, window, sink)` method attends
    over its own buffers with it (decode attention); otherwise the module's backend does.
    `heads` / `kv_heads` are the heads this process computes: all of them, or a tensor-parallel rank's share
    (distributed.inference sets them with the sliced weights).
    """

    def __init__(self, config: MiMoConfig, layer_idx: int, swa: bool) -> None:
        super().__init__()
        d = config.attn_dims(swa)
        self.layer_idx, self.swa = layer_idx, swa
        self.heads, self.kv_heads = d["heads"], d["kv_heads"]
        self.qk_dim, self.v_dim, self.rotary_dim = d["qk_dim"], d["v_dim"], d["rotary_dim"]
        self.window = d["window"]
        self.scale = self.qk_dim ** -0.5
        self.v_scale = config.attention_value_scale
        D = config.hidden_size
        # q, k and v rows in one weight [heads * qk_dim + kv_heads * (qk_dim + v_dim), D] (the checkpoint's
        # q_proj / k_proj / v_proj, merged on load: checkpoint/names.py)
        self.qkv_proj = Linear(D, self.heads * self.qk_dim + self.kv_heads * (self.qk_dim + self.v_dim))
        self.o_proj = Linear(self.heads * self.v_dim, D)
        self.attention_sink_bias = nn.Parameter(torch.zeros(self.heads)) if d["sink"] else None
        # sums o_proj's partial outputs over tensor-parallel ranks (distributed.inference sets an AllReduce)
        self.out_reduce: nn.Module = nn.Identity()
        self.backend = "auto"
        # a distributed.context_parallel.ContextParallelAttention when the sequence is sharded (set from outside)
        self.context_parallel = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttnMeta,
                cache=None) -> torch.Tensor:
        """x [B, T, D]; rope = (cos, sin) [B, T, rotary_dim] -> [B, T, D]"""
        qkv = self.qkv_proj(x)  # [B, T, heads * qk_dim + kv_heads * qk_dim + kv_heads * v_dim]
        B, T, _ = qkv.shape
        if cache is None and self.context_parallel is None:  # CUDA kernels with RoPE and the value scale inside
            out = attention_qkv(qkv, *rope, (self.heads, self.kv_heads, self.qk_dim, self.v_dim, self.v_scale), meta,
                                self.scale, self.window, self.attention_sink_bias, self.backend)
            if out is not None:
                return self.out_reduce(self.o_proj(out.transpose(1, 2).reshape(B, T, self.heads * self.v_dim)))
        # [B, H, T, d] views of [B, T, H, d] tensors: RoPE keeps the projection's layout, the fast
        # attention kernels read it through strides and write their output (and gradients) in it, so
        # no transposing copy is made on the way in or out (o_proj's reshape below is a view)
        q, k, v = (t.transpose(1, 2) for t in rope_qkv(qkv, *rope, self.heads, self.kv_heads, self.qk_dim,
                                                        self.v_dim, self.v_scale))
        cache_attention = None
        if cache is not None:
            k, v, meta = cache.update(self.layer_idx, k, v, meta)
            cache_attention = getattr(cache, "attention", None)
        if cache_attention is not None:
            out = cache_attention(q, k, v, meta, self.scale, self.window, self.attention_sink_bias)
        else:
            attend = attention if self.context_parallel is None else self.context_parallel.attention
            out = attend(q, k, v, meta, self.scale, self.window, self.attention_sink_bias, self.backend)
        return self.out_reduce(self.o_proj(out.transpose(1, 2).reshape(B, T, self.heads * self.v_dim)))
