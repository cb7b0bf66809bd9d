"""AdamW with a faster update for the large tensors of one GPU.

torch.optim.AdamW(fused=True) updates every tensor through one multi-tensor kernel that moves about 2.2 TB/s
on an H100 (8.0 ms a step for the mini preset's 1.26 B bf16 parameters, where reading p, g, m, v and writing
p, m, v once takes 6.0 ms at copy speed). Here each large CUDA tensor gets one Triton kernel
(training/kernels.py adamw_step) with the same arithmetic, so the numbers are those of the fused kernel; the
rest (small tensors, CPU, sharded DTensors, options the kernel does not take, optimizers made without
fused=True) goes through torch.optim.AdamW's own step. Arguments, state and state_dict are torch.optim.AdamW's.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..ops.compiled import kernels

MIN_NUMEL = 1 << 16  # smaller tensors stay in torch's multi-tensor launch (one launch for all of them)


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW; see the module docstring for which tensors take the Triton kernel."""

    def _takes(self, p: torch.Tensor, group: dict) -> bool:
        if not group.get("fused") or group["amsgrad"] or group["maximize"] or group.get("differentiable"):
            return False  # the kernel has the numbers of the fused implementation: only where that was asked for
        g = p.grad
        if g is None or type(p) not in (torch.nn.Parameter, torch.Tensor) or not p.is_cuda or p.numel() < MIN_NUMEL:
            return False  # (a sharded DTensor parameter is of its own type)
        if torch.is_tensor(group["lr"]):
            return False
        if p.dtype not in (torch.bfloat16, torch.float16, torch.float32) or g.dtype != p.dtype or g.is_sparse:
            return False
        if not (p.is_contiguous() and g.is_contiguous()):
            return False
        state = self.state[p]
        return all(state[k].dtype == p.dtype and state[k].is_contiguous() and state[k].device == p.device
                   for k in ("exp_avg", "exp_avg_sq") if k in state)

    @torch.no_grad()
    def step(self, closure=None, clip_coef: torch.Tensor | None = None):
        """One step. clip_coef (a 0-dim fp32 tensor on the gradients' device; plain, unsharded gradients): the
        gradients are scaled by it first, with the numbers of an in-place scaling (torch._foreach_mul_) before the
        step; the kernel's tensors get it inside the kernel and their p.grad is left as it was (gradient clipping
        without a pass over the gradients)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        tk = kernels("mimo_flash.training.kernels")
        scaled = getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None
        mine = [] if tk is None or scaled else [(p, group) for group in self.param_groups for p in group["params"]
                                                if self._takes(p, group)]
        if mine:
            for p, _ in mine:
                state = self.state[p]
                if not state:  # the state torch's fused AdamW makes
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                elif state["step"].device != p.device or state["step"].dtype != torch.float32:
                    state["step"] = state["step"].to(p.device, torch.float32)
            steps = [self.state[p]["step"] for p, _ in mine]
            torch._foreach_add_(steps, 1)
            # beta ** step by torch.pow in fp32 (fp32 betas), the bias corrections' powers of torch's fused kernel
            powers = torch.pow(self._betas([g["betas"] for _, g in mine], steps[0].device),
                               torch.stack(steps)[:, None])  # [n, 2]
            for i, (p, group) in enumerate(mine):
                state = self.state[p]
                beta1, beta2 = group["betas"]
                tk.adamw_step(p, p.grad, state["exp_avg"], state["exp_avg_sq"], powers[i, 0], powers[i, 1],
                              group["lr"], beta1, beta2, group["weight_decay"], group["eps"], clip_coef)
        taken = {id(p) for p, _ in mine}
        rest = [p for group in self.param_groups for p in group["params"]
                if p.grad is not None and id(p) not in taken]
        if rest:
            if clip_coef is not None:
                torch._foreach_mul_([p.grad for p in rest], clip_coef)
            grads = [(p, p.grad) for p, _ in mine]
            for p, _ in grads:  # torch's step skips parameters without a gradient
                p.grad = None
            try:
                self._torch_step()
            finally:
                for p, g in grads:
                    p.grad = g
        return loss

    def _betas(self, betas: list[tuple[float, float]], device: torch.device) -> torch.Tensor:
        """[n, 2] fp32 device tensor of the betas, kept between steps (no host-to-device copy in a step that a
        CUDA graph captures, once a step has run)."""
        key = (tuple(betas), device)
        if getattr(self, "_betas_key", None) != key:
            self._betas_key = key
            self._betas_t = torch.tensor(betas, dtype=torch.float32).to(device)
        return self._betas_t

    def _torch_step(self) -> None:
        """torch.optim.AdamW.step without the optimizer hooks, which this step's own call already ran."""
        fn = torch.optim.AdamW.step
        if getattr(fn, "hooked", False):
            fn = fn.__wrapped__
        fn(self)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (ndim >= 2: projections, experts, embedding, router); none on vectors
    (norm weights, attention sinks, biases)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class WarmupCosine:
    """LR multiplier: linear warm-up over `warmup` steps, then cosine from 1 to `min_ratio` at `total`."""

    def __init__(self, warmup: int, total: int, min_ratio: float) -> None:
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        t = min(1.0, (step - self.warmup) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
