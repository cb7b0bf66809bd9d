"""The one definition of the causal-LM targets and loss (main head and MTP layers).

The head that predicts `shift` tokens ahead (the main head: 1; MTP layer k: k + 2) has at position t the
target labels[t + shift], kept only when
    * t + shift < T (no target past the row's end),
    * labels[t + shift] != -100 (the caller's own mask: prompts, padding ids),
    * positions t and t + shift lie in the same document (segment_ids equal),
    * both are real tokens (attention_mask 1 at t and at t + shift),
else -100. So a packed row's loss is the token-weighted mean of its documents' own losses, and neither a
padding position nor a document's last tokens predict anything across a boundary.

MiMoForCausalLM.forward (means) and the Trainer (sums over a whole step, divided by the step's global
count) both build targets here; the sums run through ops.loss.cross_entropy_sum (fp32 math, no fp32 copy
of the logits, optionally an in-place backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.loss import cross_entropy_sum

IGNORE = -100


def shifted_targets(labels: torch.Tensor, shift: int, segment_ids: torch.Tensor | None = None,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The targets of the head that predicts `shift` tokens ahead (see the module docstring).

    labels [B, T], segment_ids [B, T] or None, attention_mask [B, T] (1 = token) or None -> [B, T] long,
    -100 where position t has no target (always the last `shift` positions).
    """
    if shift < 1:
        raise ValueError(f"shift must be at least 1, got {shift}")
    B, T = labels.shape
    for name, t in (("segment_ids", segment_ids), ("attention_mask", attention_mask)):
        if t is not None and tuple(t.shape) != (B, T):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, labels {(B, T)}")
    if T <= shift:
        return labels.new_full((B, T), IGNORE)
    tgt = labels[:, shift:]
    drop = None
    if segment_ids is not None:
        drop = segment_ids[:, :-shift] != segment_ids[:, shift:]
    if attention_mask is not None:
        real = attention_mask.bool()
        pad = ~(real[:, :-shift] & real[:, shift:])
        drop = pad if drop is None else drop | pad
    if drop is not None:
        tgt = tgt.masked_fill(drop, IGNORE)
    return F.pad(tgt, (0, shift), value=IGNORE)


def target_counts(labels: torch.Tensor, n_heads: int, segment_ids: torch.Tensor | None = None,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """How many targets each row has for heads 1..n_heads (shifts 1..n_heads).

    labels, segment_ids, attention_mask [B, T] -> [B, n_heads] int64.
    """
    return torch.stack([shifted_targets(labels, s, segment_ids, attention_mask).ne(IGNORE).sum(1)
                        for s in range(1, n_heads + 1)], 1)


def head_loss(logits: torch.Tensor, labels: torch.Tensor, shift: int, segment_ids: torch.Tensor | None = None,
              attention_mask: torch.Tensor | None = None, reduction: str = "mean",
              inplace: bool = False) -> torch.Tensor:
    """Cross entropy of the head that predicts `shift` tokens ahead (main head 1, MTP layer k: k + 2).

    logits [B, T, V]; labels, segment_ids, attention_mask [B, T] -> fp32 scalar (fp64 for fp64 logits):
    the sum over the targets (reduction="sum") or their mean ("mean"; 0, not NaN, without a target).
    inplace=True lets the backward write the gradient over `logits` (the caller must not read them again).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if tuple(logits.shape[:2]) != tuple(labels.shape):
        raise ValueError(f"logits have shape {tuple(logits.shape)}, labels {tuple(labels.shape)}")
    tgt = shifted_targets(labels, shift, segment_ids, attention_mask)
    total = cross_entropy_sum(logits, tgt, inplace=inplace)
    if reduction == "sum":
        return total
    return total / (tgt != IGNORE).sum().clamp_min(1)
