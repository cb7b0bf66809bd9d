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

    def forward(self, x: torch.Tensor, count: bool = False, present: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x [N, D] -> (indices [N, k], weights [N, k] fp32, tokens per expert [E] when count else None);
        present [N] bool or None: tokens that are not there get weights 0 (ops.moe.router)."""
        return router(x, self.weight, self.e_score_correction_bias, self.top_k, self.n_group, self.topk_group,
                      self.norm_topk_prob, self.scaling, count, present)


def autocast_operands(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inside an autocast region the expert compute runs in autocast's dtype: activations and weights are
    cast (differentiably, so fp32 master weights get their gradients) as autocast would cast an F.linear's.
    torch._grouped_mm is not on autocast's list, so without this the grouped GEMMs would see fp32 weights."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return x, gate_up, down
    dt = torch.get_autocast_dtype(dev)
    return x.to(dt), gate_up.to(dt), down.to(dt)


class LocalDispatcher:
    """Every expert on this process: ops.moe.experts on the module's own weights."""

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, gate_up: torch.Tensor,
                 down: torch.Tensor, backend: str) -> torch.Tensor:
        """x [N, D], idx [N, k], w [N, k] fp32, gate_up [E, 2I, D], down [E, D, I] -> [N, D]"""
        x, gate_up, down = autocast_operands(x, gate_up, down)
        return experts(x, idx, w, gate_up, down, backend)


class Experts(nn.Module):
    """Fused expert weights: gate_up_proj [E, 2I, D] (gate rows, then up rows), down_proj [E, D, I].

    `dispatcher` decides where the tokens are computed: LocalDispatcher (all experts here, the default) or
    an expert-parallel one set from outside (distributed.experts.AllToAllDispatcher, installed by
    distributed.parallelize_for_training together with the sharded weights).
    """

    def __init__(self, config: MiMoConfig) -> None:
        super().__init__()
        E, D, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))
        self.backend = "auto"
        self.dispatcher = LocalDispatcher()

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [N, D], idx [N, k], w [N, k] -> [N, D]"""
        return self.dispatcher(x, idx, w, self.gate_up_proj, self.down_proj, self.backend)


class MoE(nn.Module):
    """Routed experts only (no shared expert). Records per-expert token counts for balancing."""

    def __init__(self, config: MiMoConfig) -> None:
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config)
        self.expert_load: torch.Tensor | None = None  # [E] tokens routed in the last training forward

    def forward(self, x: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]. present [B, T] bool or None (all): the tokens that are there; the others
        (padding, frozen decode rows) get routing weights 0, so their output is 0 and the expert kernels that skip
        zero-weight pairs read no expert for them. Their choices still count in expert_load."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        idx, w, load = self.gate(x, count=self.training, present=None if present is None else present.reshape(-1))
        if self.training:
            self.expert_load = load
        return self.experts(x, idx, w).view(shape)
