"""The mapping between this model's state dict and checkpoint tensor names.

This model uses the hub names everywhere except the experts, which it stores fused:
    model.layers.L.mlp.experts.gate_up_proj [E, 2I, D]  <->  experts.E.gate_proj.weight [I, D] (rows :I)
                                                             experts.E.up_proj.weight   [I, D] (rows I:)
    model.layers.L.mlp.experts.down_proj    [E, D, I]   <->  experts.E.down_proj.weight [D, I]
transformers' layout keeps the fused tensors (same names and shapes as ours) and renames
`self_attn.attention_sink_bias` to `self_attn.sinks`.
"""

from __future__ import annotations

import re
from typing import Iterator

import torch

GATE_UP, DOWN = ".mlp.experts.gate_up_proj", ".mlp.experts.down_proj"
SINK_HUB, SINK_TF = "self_attn.attention_sink_bias", "self_attn.sinks"
LAYOUTS = ("hub", "transformers")

# A part: (checkpoint key, index into our tensor that it fills; None = the whole tensor)
Part = tuple[str, tuple | None]

# The tensors the release stores in FP8: q/k/v projections and every SwiGLU projection (dense, expert,
# MTP). Not: o_proj, eh_proj, embed_tokens, lm_head, norms, the router (mlp.gate), sinks, biases.
_QUANTIZED = re.compile(r"\.(self_attn\.[qkv]_proj|mlp\.(experts\.\d+\.)?(gate|up|down)_proj)\.weight$"
                        r"|\.mlp\.experts\.(gate_up|down)_proj$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_MTP_LAYER = re.compile(r"^model\.mtp\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")


def hub_parts(name: str, shape: torch.Size) -> list[Part]:
    """The hub tensors that make up our tensor `name` of `shape`."""
    if name.endswith(GATE_UP):
        base = name[: -len(".gate_up_proj")]
        E, I2 = shape[0], shape[1]
        I = I2 // 2
        parts: list[Part] = []
        for e in range(E):
            parts.append((f"{base}.{e}.gate_proj.weight", (e, slice(0, I))))
            parts.append((f"{base}.{e}.up_proj.weight", (e, slice(I, I2))))
        return parts
    if name.endswith(DOWN):
        base = name[: -len(".down_proj")]
        return [(f"{base}.{e}.down_proj.weight", (e,)) for e in range(shape[0])]
    return [(name, None)]


def layout_parts(name: str, shape: torch.Size, layout: str) -> list[Part]:
    """Our tensor -> the tensors of a checkpoint in `layout` ('hub' or 'transformers')."""
    if layout == "transformers":
        return [(transformers_name(name), None)]
    return hub_parts(name, shape)


def transformers_name(name: str) -> str:
    """Our name -> transformers' name for the same (whole) tensor."""
    return name.replace(SINK_HUB, SINK_TF)


def to_hub(state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Our state dict -> (hub name, tensor) pairs, experts split per expert (views, no copies)."""
    for name, t in state.items():
        for key, index in hub_parts(name, t.shape):
            yield key, (t if index is None else t[index])


def is_quantized(name: str) -> bool:
    """Whether the release stores checkpoint tensor `name` (hub or transformers name) in FP8."""
    return bool(_QUANTIZED.search(name))


def is_fp32(name: str) -> bool:
    """Router weight and correction bias: kept in fp32 whatever the checkpoint dtype."""
    return name.endswith(".mlp.gate.weight") or name.endswith(".e_score_correction_bias")


def is_mtp(name: str) -> bool:
    return name.startswith("model.mtp.")


def layer_index(name: str) -> int | None:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def mtp_index(name: str) -> int | None:
    m = _MTP_LAYER.match(name)
    return int(m.group(1)) if m else None


def expert_index(name: str) -> int | None:
    m = _EXPERT.search(name)
    return int(m.group(1)) if m else None
