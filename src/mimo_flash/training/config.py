"""A training run's settings (TrainConfig), checked before anything runs (validate: a bad value gets an error
that names its command-line flag). The trainer that reads them: training/trainer.py."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8  # rows per micro-batch on each rank
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # <= 0: no clipping
    mtp: bool = True
    mtp_weight: float | None = None  # None: the model config's mtp_loss_weight (0.3)
    bias_update_rate: float = 0.0  # aux-loss-free balancing step; 0 freezes the biases (fine-tuning)
    activation_checkpointing: bool = False
    dtype: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | float32 | bfloat16
    seed: int = 0
    shuffle: bool = True
    out_dir: str | None = None
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    resume: bool = False
    progress: bool = True
    log_every: int | None = None  # without the progress bar, a log line every N steps (None: a tenth of steps)
    plot: bool = True
    deterministic: bool = False

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{f.name.replace('_', '-')} must be a finite number, got {v}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("warmup-steps must be >= 0 and min-lr-ratio in [0, 1]")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.bias_update_rate < 0:
            raise ValueError(f"bias-update-rate must be >= 0, got {self.bias_update_rate}")
