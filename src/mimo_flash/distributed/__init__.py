"""Parallelism applied from outside the model: process groups and meshes (context.py), differentiable
collectives (collectives.py), expert dispatchers (experts.py), parallelize_for_inference / load_parallel
(inference.py: tensor and expert parallel inference), parallelize_for_training (training.py: expert
parallelism, activation checkpointing, FSDP2, gradient finishing and clipping), context parallelism
(context_parallel.py: sequences sharded over ranks, SWA halos exchanged, full-attention K/V gathered)."""

from .context import ParallelContext, init_distributed, leave_distributed
from .collectives import all_to_all
from .experts import AllToAllDispatcher
from .inference import (ExpertParallelInference, InferencePlan, init_inference, load_parallel,
                        parallelize_for_inference)
from .training import (apply_activation_checkpointing, apply_expert_parallel, apply_fsdp, clip_coefficient,
                       clip_grad_norm, finish_gradients, parallelize_for_training, set_gradient_sync)

__all__ = ["AllToAllDispatcher", "ExpertParallelInference", "InferencePlan", "init_inference", "load_parallel",
           "parallelize_for_inference", "ParallelContext", "all_to_all", "apply_activation_checkpointing",
           "apply_expert_parallel", "apply_fsdp", "clip_coefficient", "clip_grad_norm", "finish_gradients",
           "init_distributed", "leave_distributed", "parallelize_for_training", "set_gradient_sync"]
