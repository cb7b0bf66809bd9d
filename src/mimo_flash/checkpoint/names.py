"""The mapping between this model's state dict and checkpoint tensor names.

This model uses the hub names everywhere except the experts, which it stores fused:
    model.layers.L.mlp.experts.gate_up_proj [E, 2I, D]  <->  experts.E.gate_proj.weight [I, D] (rows :I)
                                                             experts.E.up_proj.weight   [I, D] (rows I:)
    model.layers.L.mlp.experts.down_proj    [E, D, I]   <->  experts.E.down_proj.weight [D, I]
transformers' layout keeps the fused tensors and renames `attention_sink_bias` to `sinks`.
"""

from __future__ import annotations

from typing import Iterator

import torch

GATE_UP, DOWN = ".mlp.experts.gate_up_proj", ".mlp.experts.down_proj"
SINK_HUB, SINK_TF = "self_attn.attention_sink_bias", "self_attn.sinks"

# A part: (checkpoint key, index into our tensor that it fills; None = the whole tensor)
Part = tuple[str, tuple | None]


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


def transformers_name(name: str) -> str:
    """Our name -> transformers' name for the same (whole) tensor."""
    return name.replace(SINK_HUB, SINK_TF)


def to_hub(state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Our state dict -> (hub name, tensor) pairs, experts split per expert (views, no copies)."""
    for name, t in state.items():
        for key, index in hub_parts(name, t.shape):
            yield key, (t if index is None else t[index])


def is_mtp(name: str) -> bool:
    return name.startswith("model.mtp.")
