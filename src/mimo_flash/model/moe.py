"""Mixture of experts: fp32 sigmoid router with a selection-only correction bias, fused experts."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import MiMoConfig
from ..ops.moe import experts, router


class Router(nn.Module):
    """weight [E, D] and e_score_correction_bias [E], both kept in fp32 whatever the model dtype."""

    def __init__(self, config: MiMoConfig) -> None:
        super().__init__()
        E = config.n_routed_experts
        self.weight = nn.Parameter(torch.zeros(E, config.hidden_size))
        # Not trained by the optimizer: aux-loss-free balancing updates it (training/).
        self.register_buffer("e_score_correction_bias", torch.zeros(E))
        self.top_k, self.n_group, self.topk_group = config.num_experts_per_tok, config.n_group, config.topk_group
        self.norm_topk_prob, self.scaling = config.norm_topk_prob, config.routed_scaling_factor

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.weight.is_floating_point() and self.weight.dtype != torch.float32:
            self.weight.data = self.weight.data.float()
        b = self.e_score_correction_bias
        if b.is_floating_point() and b.dtype != torch.float32:
            self.e_score_correction_bias = b.float()
        return self

    def forward(self, x: torch.Tensor, count: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x [N, D] -> (indices [N, k], weights [N, k] fp32, tokens per expert [E] when count else None)"""
        return router(x, self.weight, self.e_score_correction_bias, self.top_k, self.n_group, self.topk_group,
                      self.norm_topk_prob, self.scaling, count)


class Experts(nn.Module):
    """Fused expert weights: gate_up_proj [E, 2I, D] (gate rows, then up rows), down_proj [E, D, I]."""

    def __init__(self, config: MiMoConfig) -> None:
        super().__init__()
        E, D, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))
        self.backend = "auto"

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [N, D], idx [N, k], w [N, k] -> [N, D]"""
        return experts(x, idx, w, self.gate_up_proj, self.down_proj, self.backend)


class MoE(nn.Module):
    """Routed experts only (no shared expert). Records per-expert token counts for balancing."""

    def __init__(self, config: MiMoConfig) -> None:
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config)
        self.expert_load: torch.Tensor | None = None  # [E] tokens routed in the last training forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]"""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        idx, w, load = self.gate(x, count=self.training)
        if self.training:
            self.expert_load = load
        return self.experts(x, idx, w).view(shape)
