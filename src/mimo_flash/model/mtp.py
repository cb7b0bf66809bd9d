"""Multi-token-prediction layers.

Layer k: h' = eh_proj(cat[enorm(embed(token_{t+k+1})), hnorm(h_prev)]), then one SWA decoder block
(sink, SWA theta, value scale) with a dense SwiGLU MLP, then its final_layernorm. The layer returns both the
block output (what layer k + 1 takes as h_prev) and its normed form (what the shared lm_head reads).
h_prev is the main model's final hidden state (after model.norm) for k = 0, and the previous MTP layer's
block output (before its final_layernorm) for k > 0.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import MiMoConfig
from .attention import Attention
from .layers import MLP, Linear, RMSNorm


class MTPLayer(nn.Module):
    def __init__(self, config: MiMoConfig, k: int) -> None:
        super().__init__()
        D, eps = config.hidden_size, config.rms_norm_eps
        self.enorm = RMSNorm(D, eps)
        self.hnorm = RMSNorm(D, eps)
        self.eh_proj = Linear(2 * D, D)
        self.input_layernorm = RMSNorm(D, eps)
        # cache slot after the main layers
        self.self_attn = Attention(config, config.num_hidden_layers + k, swa=True)
        self.pre_mlp_layernorm = RMSNorm(D, eps)
        self.mlp = MLP(D, config.intermediate_size)
        self.final_layernorm = RMSNorm(D, eps)

    def forward(self, emb: torch.Tensor, h_prev: torch.Tensor, rope, meta, cache=None, keep: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """emb, h_prev [B, T, D] -> (block output [B, T, D], final_layernorm of it [B, T', D]), T' = the last
        `keep` positions (keep=0: all T)."""
        h = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        h = h + self.self_attn(self.input_layernorm(h), rope, meta, cache)
        h = h + self.mlp(self.pre_mlp_layernorm(h))
        return h, self.final_layernorm(h[:, -keep:] if keep else h)
