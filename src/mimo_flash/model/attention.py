"""One attention module for both layer types (full and sliding-window)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import MiMoConfig
from ..ops.attention import AttnMeta, attention
from .layers import apply_rope


class Attention(nn.Module):
    """GQA attention with Q/K dim != V dim, value scale, partial RoPE and, on SWA layers, a sink.

    The KV cache hook: `cache.update(layer_idx, k, v, meta)` receives this step's keys [B, Hkv, T, Dqk]
    and values [B, Hkv, T, Dv] (rotated and value-scaled) and returns the keys/values to attend with the
    matching AttnMeta. A cache that has an `attention(q, k, v, meta, scale, window, sink)` method attends
    over its own buffers with it (decode attention); otherwise the module's backend does.
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
        self.q_proj = nn.Linear(D, self.heads * self.qk_dim, bias=False)
        self.k_proj = nn.Linear(D, self.kv_heads * self.qk_dim, bias=False)
        self.v_proj = nn.Linear(D, self.kv_heads * self.v_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.v_dim, D, bias=False)
        self.attention_sink_bias = nn.Parameter(torch.zeros(self.heads)) if d["sink"] else None
        self.backend = "auto"

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttnMeta,
                cache=None) -> torch.Tensor:
        """x [B, T, D]; rope = (cos, sin) [B, T, rotary_dim] -> [B, T, D]"""
        return self.attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), rope, meta, cache)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope, meta: AttnMeta,
               cache=None) -> torch.Tensor:
        """Everything after the q/k/v projections: value scale, RoPE, cache, attention, o_proj.

        q [B, T, heads * qk_dim], k [B, T, kv_heads * qk_dim], v [B, T, kv_heads * v_dim] -> [B, T, D]
        """
        B, T, _ = q.shape
        q = q.reshape(B, T, self.heads, self.qk_dim).transpose(1, 2)
        k = k.reshape(B, T, self.kv_heads, self.qk_dim).transpose(1, 2)
        v = (v * self.v_scale).reshape(B, T, self.kv_heads, self.v_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache_attention = None
        if cache is not None:
            k, v, meta = cache.update(self.layer_idx, k, v, meta)
            cache_attention = getattr(cache, "attention", None)
        if cache_attention is not None:
            out = cache_attention(q, k, v, meta, self.scale, self.window, self.attention_sink_bias)
        else:
            out = attention(q, k, v, meta, self.scale, self.window, self.attention_sink_bias, self.backend)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.heads * self.v_dim))
