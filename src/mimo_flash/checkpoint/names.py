"""The mapping between this model's state dict and checkpoint tensor names.

This model stores its weights as it computes with them (fused) and uses the hub names everywhere else:
    model.layers.L.mlp.experts.gate_up_proj [E, 2I, D]  <->  experts.E.gate_proj.weight [I, D] (rows :I)
                                                             experts.E.up_proj.weight   [I, D] (rows I:)
    model.layers.L.mlp.experts.down_proj    [E, D, I]   <->  experts.E.down_proj.weight [D, I]
    *.self_attn.qkv_proj.weight [Hq*Dqk + Hkv*Dqk + Hkv*Dv, D]  <->  self_attn.q_proj.weight [Hq*Dqk, D]
                                                                     self_attn.k_proj.weight [Hkv*Dqk, D]
                                                                     self_attn.v_proj.weight [Hkv*Dv, D]
    *.mlp.gate_up_proj.weight [2I, D] (dense MLP)  <->  mlp.gate_proj.weight [I, D] (rows :I)
                                                        mlp.up_proj.weight   [I, D] (rows I:)
The q/k/v row counts depend on the layer type, so the functions that split take the model's config.
transformers' layout keeps the fused experts (same names and shapes as ours), splits q/k/v and gate/up as
the hub does, and renames `self_attn.attention_sink_bias` to `self_attn.sinks`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Iterator

import torch

if TYPE_CHECKING:
    from ..config import MiMoConfig

GATE_UP, DOWN = ".mlp.experts.gate_up_proj", ".mlp.experts.down_proj"
QKV, DENSE_GATE_UP = ".self_attn.qkv_proj.weight", ".mlp.gate_up_proj.weight"
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


def _row_parts(name: str, shape: torch.Size, config: "MiMoConfig") -> list[Part] | None:
    """The checkpoint tensors whose rows make up our fused projection `name` (q/k/v, a dense gate/up);
    None for any other tensor."""
    if name.endswith(QKV):
        L = layer_index(name)
        d = config.attn_dims(L is None or config.is_swa(L))  # MTP layers are SWA layers
        q, k = d["heads"] * d["qk_dim"], d["kv_heads"] * d["qk_dim"]
        if shape[0] != q + k + d["kv_heads"] * d["v_dim"]:
            raise ValueError(f"{name}: {shape[0]} rows, but the config implies {q + k + d['kv_heads'] * d['v_dim']}")
        base = name[: -len(QKV)]
        return [(f"{base}.self_attn.q_proj.weight", (slice(0, q),)),
                (f"{base}.self_attn.k_proj.weight", (slice(q, q + k),)),
                (f"{base}.self_attn.v_proj.weight", (slice(q + k, shape[0]),))]
    if name.endswith(DENSE_GATE_UP) and GATE_UP not in name:
        base, I = name[: -len(DENSE_GATE_UP)], shape[0] // 2
        return [(f"{base}.mlp.gate_proj.weight", (slice(0, I),)), (f"{base}.mlp.up_proj.weight", (slice(I, 2 * I),))]
    return None


def hub_parts(name: str, shape: torch.Size, config: "MiMoConfig") -> list[Part]:
    """The hub tensors that make up our tensor `name` of `shape` (config: the model's, for the q/k/v rows)."""
    rows = _row_parts(name, shape, config)
    if rows is not None:
        return rows
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


def layout_parts(name: str, shape: torch.Size, layout: str, config: "MiMoConfig") -> list[Part]:
    """Our tensor -> the tensors of a checkpoint in `layout` ('hub' or 'transformers')."""
    if layout == "transformers":
        rows = _row_parts(name, shape, config)
        return rows if rows is not None else [(transformers_name(name), None)]
    return hub_parts(name, shape, config)


def transformers_name(name: str) -> str:
    """Our name -> transformers' name for the same (whole) tensor."""
    return name.replace(SINK_HUB, SINK_TF)


def to_hub(state: dict[str, torch.Tensor], config: "MiMoConfig") -> Iterator[tuple[str, torch.Tensor]]:
    """Our state dict -> (hub name, tensor) pairs, fused tensors split (views, no copies)."""
    for name, t in state.items():
        for key, index in hub_parts(name, t.shape, config):
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
