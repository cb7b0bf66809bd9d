"""MiMoModel (the decoder stack) and MiMoForCausalLM (logits, loss, MTP)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import MiMoConfig
from ..ops.attention import AttnMeta
from ..ops.norm import add_rms_norm
from .attention import Attention
from .layers import MLP, Linear, RMSNorm, rope_cos_sin
from .loss import head_loss
from .moe import MoE, Experts, Router
from .mtp import MTPLayer


class DecoderLayer(nn.Module):
    """h = x + Attn(norm_in(x)); out = h + MLP(norm_post(h)).

    The two residual adds are each fused with the norm that reads their sum (ops.norm.add_rms_norm):
    the layer returns (h, MLP(...)) unsummed, and the next layer (or the final norm) adds them.
    """

    def __init__(self, config: MiMoConfig, idx: int) -> None:
        super().__init__()
        self.swa = config.is_swa(idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, idx, self.swa)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if config.is_moe(idx) else MLP(config.hidden_size, config.intermediate_size)
        self.moe = config.is_moe(idx)

    def forward(self, x, rope, meta, cache=None, branch=None):
        """x [B, T, D] (plus `branch` [B, T, D], the previous layer's MLP output, when given) ->
        (h, mlp_out), both [B, T, D]: the layer's output is h + mlp_out. Outside training the MoE layers leave out
        the tokens that are not there (meta's negative segments: padding, rows a decode step freezes): mlp_out is 0
        at them."""
        norm = self.input_layernorm
        if branch is None:
            normed = norm(x)
        else:
            x, normed = add_rms_norm(x, branch, norm.weight, norm.eps)
        norm = self.post_attention_layernorm
        h, normed = add_rms_norm(x, self.self_attn(normed, rope, meta, cache), norm.weight, norm.eps)
        if not self.moe:
            return h, self.mlp(normed)
        # (training leaves the mask out: no expert kernel of its own skips those tokens, and their outputs reach no
        # loss, so it would be a product per layer for nothing)
        return h, self.mlp(normed, None if meta.q_seg is None or self.training else meta.q_seg >= 0)


def build_meta(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
               segment_ids: torch.Tensor | None) -> AttnMeta:
    """Positions and segments of a batch (no cache).

    input_ids [B, T]; attention_mask [B, T] (1 = token, 0 = padding) or None; position_ids [B, T] or None;
    segment_ids [B, T] (document index of each packed token) or None.
    Without position_ids, positions count the non-padding tokens (so a left-padded row gets the
    positions it has alone). A padding token gets a segment of its own, so it sees only itself.
    """
    B, T = input_ids.shape
    dev = input_ids.device
    ar = torch.arange(T, device=dev).expand(B, T)
    plain = position_ids is None and segment_ids is None
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                             f"input_ids {tuple(input_ids.shape)}")
        valid = attention_mask.bool()
        if not bool(valid.all()):
            plain = False
    if position_ids is None:
        position_ids = (valid.long().cumsum(-1) - 1).clamp_min(0) if attention_mask is not None and not plain else ar
    elif position_ids.shape != input_ids.shape:
        position_ids = position_ids.expand(B, T)
    seg = segment_ids
    if attention_mask is not None and not bool(valid.all()):
        seg = torch.where(valid, seg if seg is not None else torch.zeros_like(ar), -(ar + 2))
    return AttnMeta(q_pos=position_ids, k_pos=position_ids, q_seg=seg, k_seg=seg, aligned=True, plain=plain)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None  # [B, T, V]; None with return_logits=False
    loss: torch.Tensor | None = None  # lm_loss (+ mtp_loss_weight * mtp_loss when mtp=True)
    lm_loss: torch.Tensor | None = None
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # layer k at t predicts token t + k + 2
    mtp_losses: list[torch.Tensor] = field(default_factory=list)
    hidden_states: torch.Tensor | None = None  # [B, T, D], after model.norm


class MiMoModel(nn.Module):
    def __init__(self, config: MiMoConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mtp = nn.Module()
        self.mtp.layers = nn.ModuleList(MTPLayer(config, k) for k in range(config.num_nextn_predict_layers))

    def ropes(self, position_ids: torch.Tensor, dtype: torch.dtype) -> dict[bool, tuple[torch.Tensor, torch.Tensor]]:
        """position_ids [B, T] -> {swa: (cos, sin)} for both layer types."""
        out = {}
        for swa in (False, True):
            d = self.config.attn_dims(swa)
            out[swa] = rope_cos_sin(position_ids, d["theta"], d["rotary_dim"], dtype)
        return out

    def forward(self, input_ids, meta: AttnMeta, cache=None, ropes=None) -> torch.Tensor:
        """input_ids [B, T] -> final hidden states [B, T, D] (after norm).

        ropes: {swa: (cos, sin) [B, T, rotary_dim]} precomputed for meta.q_pos (default: computed here).
        """
        x = self.embed_tokens(input_ids)
        if ropes is None:
            ropes = self.ropes(meta.q_pos, x.dtype)
        branch = None
        for layer in self.layers:
            x, branch = layer(x, ropes[layer.swa], meta, cache, branch)
        if branch is None:
            return self.norm(x)
        return add_rms_norm(x, branch, self.norm.weight, self.norm.eps)[1]


def init_rules(m: nn.Module, config: MiMoConfig) -> list[tuple[str, str | float]]:
    """How the tensors module `m` owns directly start: [(attribute, "normal" | constant)], "normal" drawn from
    N(0, config.initializer_range), in the order they are drawn. The one definition of the initialisation:
    MiMoForCausalLM draws from the global RNG in this order; distributed/materialize.py fills shards from it."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        return [("weight", "normal")]
    if isinstance(m, Experts):
        return [("gate_up_proj", "normal"), ("down_proj", "normal")]
    if isinstance(m, Router):
        return [("weight", "normal"), ("e_score_correction_bias", 0.0)]
    if isinstance(m, RMSNorm):
        return [("weight", 1.0)]
    if isinstance(m, Attention) and m.attention_sink_bias is not None:
        return [("attention_sink_bias", "normal")]
    return []


class MiMoForCausalLM(nn.Module):
    def __init__(self, config: MiMoConfig) -> None:
        super().__init__()
        self.config = config
        self.model = MiMoModel(config)
        # a GEMM even in one-row decode steps: a vocabulary-sized product is bandwidth-bound as it is
        self.lm_head = Linear(config.hidden_size, config.vocab_size, backend="gemm")
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # distributed.inference.InferencePlan once parallelize_for_inference has split this process's share
        self.parallel = None
        self.apply(self._init_weights)

    @torch.no_grad()
    def _init_weights(self, m: nn.Module) -> None:
        for name, kind in init_rules(m, self.config):
            t = getattr(m, name)
            if kind == "normal":
                t.normal_(0.0, self.config.initializer_range)
            else:
                t.fill_(kind)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def kv_config(self) -> MiMoConfig:
        """The config of the attention this process computes: the model's, or under tensor parallelism a
        copy with this rank's head counts (what its KV cache holds)."""
        return self.config if self.parallel is None else self.parallel.local_config

    def set_backends(self, attention: str | None = None, experts: str | None = None) -> "MiMoForCausalLM":
        """Choose the ops backend of every attention / expert module (see ops/)."""
        for m in self.modules():
            if attention is not None and isinstance(m, Attention):
                m.backend = attention
            if experts is not None and isinstance(m, Experts):
                m.backend = experts
        return self

    def mtp_step(self, k: int, token_ids: torch.Tensor, h_prev: torch.Tensor, meta: AttnMeta,
                 cache=None, ropes=None, logits_to_keep: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Run MTP layer k. token_ids [B, T] (the token after the one h_prev stands at, k+1 ahead of
        the main input), h_prev [B, T, D] -> (logits [B, T, V], hidden [B, T, D] to feed layer k + 1).

        ropes: as in MiMoModel.forward; logits_to_keep > 0 returns logits of the last that many positions.
        """
        layer = self.model.mtp.layers[k]
        rope = (ropes if ropes is not None else self.model.ropes(meta.q_pos, h_prev.dtype))[True]
        h, normed = layer(self.model.embed_tokens(token_ids), h_prev, rope, meta, cache, keep=logits_to_keep)
        return self.lm_head(normed), h

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                mtp: bool = False, segment_ids: torch.Tensor | None = None,
                logits_to_keep: int = 0, return_logits: bool = True) -> CausalLMOutput:
        """input_ids [B, T] -> CausalLMOutput.

        logits_to_keep > 0 computes logits for the last that many positions only (not with labels or mtp).
        return_logits=False (only with labels): out.logits is None and out.mtp_logits empty; the loss's
        backward then writes the logits' gradient over them (no second [B, T, V] buffer). For training.

        labels [B, T] are the input ids themselves (shifted inside, -100 ignored), as in transformers;
        the targets are model.loss.shifted_targets: unlike transformers, nothing is predicted from or into a
        padding position (attention_mask 0) nor across documents (segment_ids), so a packed row's losses are
        the token-weighted means of its documents' own losses.
        With mtp=True, MTP layer k sees at position t the token t + k + 1 and predicts token t + k + 2;
        its loss covers the positions where that token exists in the same document.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids is empty")
        meta = build_meta(input_ids, attention_mask, position_ids, segment_ids)
        h = self.model(input_ids, meta)
        if logits_to_keep and (labels is not None or mtp):
            raise ValueError("logits_to_keep cannot be combined with labels or mtp")
        if not return_logits and labels is None:
            raise ValueError("return_logits=False needs labels")
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
        out = CausalLMOutput(logits=logits if return_logits else None, hidden_states=h)
        if labels is not None:
            out.lm_loss = out.loss = head_loss(logits, labels, 1, segment_ids, attention_mask,
                                               inplace=not return_logits)
        del logits
        if mtp and self.config.num_nextn_predict_layers:
            h_prev = h
            for k in range(self.config.num_nextn_predict_layers):
                shifted = F.pad(input_ids, (0, k + 1), value=0)[:, k + 1:]  # token t + k + 1 at t (0 past the end)
                lg, h_prev = self.mtp_step(k, shifted, h_prev, meta)
                if return_logits:
                    out.mtp_logits.append(lg)
                if labels is not None:
                    out.mtp_losses.append(head_loss(lg, labels, k + 2, segment_ids, attention_mask,
                                                    inplace=not return_logits))
                del lg
            if labels is not None:
                mtp_loss = torch.stack(out.mtp_losses).mean()
                out.loss = out.lm_loss + self.config.mtp_loss_weight * mtp_loss
        return out

    def num_parameters(self, active: bool = False) -> int:
        """All parameters, or those one token uses (top-k of the routed experts)."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        c = self.config
        for m in self.modules():
            if isinstance(m, Experts):
                total -= (m.gate_up_proj.numel() + m.down_proj.numel()) * (1 - c.num_experts_per_tok / c.n_routed_experts)
        return int(total)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Generate with a KV cache (see mimo_flash.generation.generate for the arguments).

        input_ids [B, P] (left-padded, attention_mask [B, P]) -> LongTensor [B, P + new].
        """
        from ..generation import generate
        return generate(self, input_ids, attention_mask=attention_mask, **kwargs)

    # checkpoint I/O lives in checkpoint/; these are the entry points users expect
    @classmethod
    def from_pretrained(cls, path, tp: int = 1, ep: int = 1, **kwargs) -> "MiMoForCausalLM":
        """tp / ep > 1 (inside a torchrun process): this rank's share only (distributed.load_parallel)."""
        if tp != 1 or ep != 1:
            from ..distributed.inference import load_parallel
            return load_parallel(path, tp=tp, ep=ep, **kwargs)
        from ..checkpoint import load_pretrained
        return load_pretrained(path, **kwargs)

    def save_pretrained(self, path, **kwargs) -> None:
        from ..checkpoint import save_pretrained
        save_pretrained(self, path, **kwargs)
