"""MiMoConfig: every size and switch of MiMo-V2-Flash in one dataclass.

Reads both config formats that exist for this model (the hub `config.json` of
XiaomiMiMo/MiMo-V2-Flash and transformers' `MiMoV2FlashConfig`), writes the hub format
(plus transformers' own keys, so that transformers reconstructs exactly the same model).
Where a field is missing, the released model's value applies; when the config is not the released
model's (some field differs), a warning names the fields that took the released values.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FULL, SWA = 0, 1  # values of hybrid_layer_pattern
ACTIVATIONS = ("silu",)
TORCH_DTYPES = ("bfloat16", "float16", "float32", "bf16", "fp16", "fp32")  # checkpoint.load.DTYPES' names


def read_json_object(f: Path) -> dict:
    """A JSON object file's contents ({} when the file is absent); errors name the file."""
    if not f.exists():
        return {}
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{f}: expected a JSON object")
    return d


# Fields that do not shape the model (or follow a rule when absent): no warning when a config lacks them.
NOT_MODEL_FIELDS = frozenset({"hybrid_layer_pattern", "moe_layer_freq", "initializer_range", "torch_dtype",
                              "bos_token_id", "eos_token_id", "pad_token_id", "quantization_config",
                              "mtp_loss_weight"})
TRANSFORMERS_FIXED = frozenset({"add_full_attention_sink_bias", "n_shared_experts", "scoring_func", "topk_method",
                                "num_nextn_predict_layers"})
CORE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers")  # a config without them is not the release's


def _default_pattern(n: int) -> list[int]:
    """transformers' default rule: full attention at layer 0 and every 6th layer."""
    return [FULL if (i == 0 or (i + 1) % 6 == 0) else SWA for i in range(n)]


@dataclass
class MiMoConfig:
    # sizes
    vocab_size: int = 152576
    hidden_size: int = 4096
    intermediate_size: int = 16384  # dense SwiGLU (layer 0 and the MTP layers)
    num_hidden_layers: int = 48
    max_position_embeddings: int = 262144
    # full-attention layers
    num_attention_heads: int = 64
    num_key_value_heads: int = 4
    head_dim: int = 192  # Q and K
    v_head_dim: int = 128
    rope_theta: float = 5_000_000.0
    add_full_attention_sink_bias: bool = False
    # sliding-window layers
    swa_num_attention_heads: int = 64
    swa_num_key_value_heads: int = 8
    swa_head_dim: int = 192
    swa_v_head_dim: int = 128
    swa_rope_theta: float = 10_000.0
    add_swa_attention_sink_bias: bool = True
    # Number of keys a SWA query sees, itself included: query i attends j with i - W < j <= i.
    # The hub's `sliding_window_size` (128) counts previous tokens only; the default
    # W = sliding_window_size + 1 = 129 follows transformers >= 5.23 and SGLang. vLLM uses 128.
    sliding_window: int = 129
    partial_rotary_factor: float = 0.334
    attention_value_scale: float = 0.707
    hybrid_layer_pattern: list[int] = field(default_factory=list)  # 0 full, 1 SWA; [] = default rule
    # MLP / MoE
    moe_layer_freq: list[int] = field(default_factory=list)  # 0 dense, 1 MoE; [] = [0] + [1] * (L - 1)
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 2048
    n_shared_experts: int | None = None
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # multi-token prediction
    num_nextn_predict_layers: int = 3
    mtp_loss_weight: float = 0.3
    # misc
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    torch_dtype: str = "bfloat16"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    quantization_config: dict | None = None

    def __post_init__(self) -> None:
        if not self.hybrid_layer_pattern:
            self.hybrid_layer_pattern = _default_pattern(self.num_hidden_layers)
        if not self.moe_layer_freq:
            self.moe_layer_freq = [0] + [1] * (self.num_hidden_layers - 1)
        if self.routed_scaling_factor is None:
            self.routed_scaling_factor = 1.0
        self.hybrid_layer_pattern = [int(x) for x in self.hybrid_layer_pattern]
        self.moe_layer_freq = [int(x) for x in self.moe_layer_freq]
        self.validate()

    # ------------------------------------------------------------------ derived
    def is_swa(self, layer: int) -> bool:
        return self.hybrid_layer_pattern[layer] == SWA

    def is_moe(self, layer: int) -> bool:
        return self.moe_layer_freq[layer] == 1

    def attn_dims(self, swa: bool) -> dict[str, Any]:
        """Sizes of one attention type: heads, kv_heads, qk_dim, v_dim, theta, rotary_dim, sink."""
        if swa:
            h, kv, d, dv, th, sink = (self.swa_num_attention_heads, self.swa_num_key_value_heads,
                                      self.swa_head_dim, self.swa_v_head_dim, self.swa_rope_theta,
                                      self.add_swa_attention_sink_bias)
        else:
            h, kv, d, dv, th, sink = (self.num_attention_heads, self.num_key_value_heads, self.head_dim,
                                      self.v_head_dim, self.rope_theta, self.add_full_attention_sink_bias)
        return dict(heads=h, kv_heads=kv, qk_dim=d, v_dim=dv, theta=th, sink=sink,
                    rotary_dim=int(d * self.partial_rotary_factor), window=self.sliding_window if swa else None)

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"MiMoConfig.{name}: {why}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "v_head_dim", "swa_num_attention_heads",
                     "swa_num_key_value_heads", "swa_head_dim", "swa_v_head_dim", "n_routed_experts",
                     "num_experts_per_tok", "moe_intermediate_size", "n_group", "topk_group",
                     "max_position_embeddings", "sliding_window"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(name, f"must be a positive integer, got {v!r}")
        n_mtp = self.num_nextn_predict_layers
        if not isinstance(n_mtp, int) or isinstance(n_mtp, bool) or n_mtp < 0:
            bad("num_nextn_predict_layers", f"must be an integer >= 0, got {n_mtp!r}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type == "float" and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                bad(f.name, f"must be a finite number, got {v!r}")
            if f.type == "bool" and not isinstance(v, bool):
                bad(f.name, f"must be true or false, got {v!r}")
        for prefix in ("", "swa_"):
            h, kv = getattr(self, prefix + "num_attention_heads"), getattr(self, prefix + "num_key_value_heads")
            if h % kv:
                bad(prefix + "num_attention_heads", f"{h} heads are not divisible by {prefix}num_key_value_heads={kv}")
        if len(self.hybrid_layer_pattern) != self.num_hidden_layers:
            bad("hybrid_layer_pattern", f"has {len(self.hybrid_layer_pattern)} entries for "
                f"num_hidden_layers={self.num_hidden_layers}")
        if any(x not in (FULL, SWA) for x in self.hybrid_layer_pattern):
            bad("hybrid_layer_pattern", "entries must be 0 (full attention) or 1 (sliding window)")
        if len(self.moe_layer_freq) != self.num_hidden_layers:
            bad("moe_layer_freq", f"has {len(self.moe_layer_freq)} entries for num_hidden_layers={self.num_hidden_layers}")
        if any(x not in (0, 1) for x in self.moe_layer_freq):
            bad("moe_layer_freq", "entries must be 0 (dense MLP) or 1 (MoE)")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            bad("partial_rotary_factor", f"must be in (0, 1], got {self.partial_rotary_factor}")
        for swa in (False, True):
            d = self.attn_dims(swa)
            if d["rotary_dim"] % 2 or d["rotary_dim"] == 0:
                bad("partial_rotary_factor", f"gives rotary dim {d['rotary_dim']} for head dim {d['qk_dim']}; "
                    "it must be even and positive")
        if self.num_experts_per_tok > self.n_routed_experts:
            bad("num_experts_per_tok", f"top-{self.num_experts_per_tok} exceeds n_routed_experts={self.n_routed_experts}")
        if self.n_routed_experts % self.n_group:
            bad("n_group", f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
        if self.topk_group > self.n_group:
            bad("topk_group", f"{self.topk_group} exceeds n_group={self.n_group}")
        if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
            bad("n_group", "group-limited routing needs at least 2 experts per group")
        if self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
            bad("num_experts_per_tok", "is larger than the experts in the kept groups (topk_group * experts per group)")
        if self.hidden_act not in ACTIVATIONS:
            bad("hidden_act", f"unknown activation {self.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}")
        if self.scoring_func != "sigmoid":
            bad("scoring_func", f"only 'sigmoid' is used by MiMo-V2-Flash, got {self.scoring_func!r}")
        if self.n_shared_experts not in (None, 0):
            bad("n_shared_experts", "MiMo-V2-Flash has no shared expert; expected null")
        if self.torch_dtype not in TORCH_DTYPES:
            bad("torch_dtype", f"unknown dtype {self.torch_dtype!r}; one of {', '.join(TORCH_DTYPES)}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            ids = v if isinstance(v, list) and name == "eos_token_id" else [v]
            if v is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                bad(name, f"must be a token id (an integer >= 0){', a list of them' * (name == 'eos_token_id')} "
                    f"or null, got {v!r}")
        if self.rms_norm_eps <= 0:
            bad("rms_norm_eps", f"must be positive, got {self.rms_norm_eps}")
        if self.rope_theta <= 0 or self.swa_rope_theta <= 0:
            bad("rope_theta", "rope thetas must be positive")

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "MiMoConfig":
        presets = {
            "flash": {},
            "mini": dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=12,
                         num_attention_heads=16, num_key_value_heads=4, swa_num_attention_heads=16,
                         swa_num_key_value_heads=8, n_routed_experts=64, num_experts_per_tok=8,
                         moe_intermediate_size=512, max_position_embeddings=65536),
            "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=48, v_head_dim=32,
                         swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=48, swa_v_head_dim=32,
                         sliding_window=9, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                         max_position_embeddings=4096, torch_dtype="float32"),
        }
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
        return cls(**{**presets[name], **overrides})

    # ------------------------------------------------------------------ formats
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MiMoConfig":
        """Build from a hub or a transformers config dict (the two may be mixed)."""
        d = dict(d)
        out: dict[str, Any] = {}
        names = {f.name for f in dataclasses.fields(cls)}
        tf_format = "layer_types" in d or "rope_parameters" in d
        n = d.get("num_hidden_layers", cls.num_hidden_layers)

        # attention pattern
        if "hybrid_layer_pattern" in d and d["hybrid_layer_pattern"] is not None:
            out["hybrid_layer_pattern"] = list(d["hybrid_layer_pattern"])
        elif d.get("layer_types"):
            types = {"full_attention": FULL, "sliding_attention": SWA, "sliding_window_attention": SWA}
            try:
                out["hybrid_layer_pattern"] = [types[t] for t in d["layer_types"]]
            except KeyError as e:
                raise ValueError(f"config field layer_types: unknown layer type {e.args[0]!r}") from None
        if "moe_layer_freq" in d and d["moe_layer_freq"] is not None:
            freq = d["moe_layer_freq"]
            if isinstance(freq, int):  # DeepSeek-style integer frequency
                freq = [0] + [1 if i % freq == 0 else 0 for i in range(1, n)]
            out["moe_layer_freq"] = list(freq)
        elif d.get("mlp_layer_types"):
            kinds = {"dense": 0, "sparse": 1}
            try:
                out["moe_layer_freq"] = [kinds[t] for t in d["mlp_layer_types"]]
            except KeyError as e:
                raise ValueError(f"config field mlp_layer_types: unknown MLP type {e.args[0]!r}") from None

        # window: hub counts previous tokens, transformers counts keys
        if d.get("sliding_window_size") is not None:
            out["sliding_window"] = int(d["sliding_window_size"]) + 1
        elif d.get("sliding_window") is not None:
            out["sliding_window"] = int(d["sliding_window"]) + (0 if tf_format else 1)

        # rope
        rp = d.get("rope_parameters") or {}
        if rp.get("full_attention"):
            out["rope_theta"] = rp["full_attention"].get("rope_theta", cls.rope_theta)
            if "partial_rotary_factor" in rp["full_attention"]:
                out["partial_rotary_factor"] = rp["full_attention"]["partial_rotary_factor"]
        if rp.get("sliding_attention"):
            out["swa_rope_theta"] = rp["sliding_attention"].get("rope_theta", cls.swa_rope_theta)
        for key in ("rope_theta", "swa_rope_theta", "partial_rotary_factor"):
            if d.get(key) is not None:
                out[key] = d[key]

        if d.get("layernorm_epsilon") is not None:
            out["rms_norm_eps"] = d["layernorm_epsilon"]
        if d.get("num_local_experts") is not None and "n_routed_experts" not in d:
            out["n_routed_experts"] = d["num_local_experts"]
        if tf_format:  # transformers derives the SWA attention from the full one
            for k in ("num_attention_heads", "head_dim", "v_head_dim"):
                if k in d and "swa_" + k not in d:
                    out["swa_" + k] = d[k]
            if "num_key_value_heads" in d and "swa_num_key_value_heads" not in d:
                out["swa_num_key_value_heads"] = 2 * d["num_key_value_heads"]
            if "add_swa_attention_sink_bias" not in d:
                out["add_swa_attention_sink_bias"] = True
        if d.get("num_nextn_predict_layers") is None:
            d.pop("num_nextn_predict_layers", None)
        if d.get("attention_value_scale") is None:
            d.pop("attention_value_scale", None)
        if "torch_dtype" not in d and isinstance(d.get("dtype"), str):
            out["torch_dtype"] = d["dtype"]

        skip = {"sliding_window", "hybrid_layer_pattern", "moe_layer_freq"}
        for k, v in d.items():
            if k in names and k not in out and k not in skip:
                out[k] = v
        # transformers' format has no key for these (its model hard-codes the release's choice)
        inexpressible = TRANSFORMERS_FIXED if tf_format else frozenset()
        defaulted = sorted(names - set(out) - NOT_MODEL_FIELDS - inexpressible)
        listed = out.get("hybrid_layer_pattern") or out.get("moe_layer_freq")
        if "num_hidden_layers" not in out and listed is not None and len(listed) != cls.num_hidden_layers:
            raise ValueError(f"config field num_hidden_layers is missing (its per-layer lists have {len(listed)} "
                             "entries)")
        try:
            config = cls(**out)
        except ValueError as e:
            if not defaulted:
                raise
            raise ValueError(f"{e} (not in the config, so the released model's values were used: "
                             f"{_values(cls, defaulted)})") from None
        released = all(k in out for k in CORE_FIELDS) and all(
            getattr(config, k) == f.default for f in dataclasses.fields(cls)
            if (k := f.name) in out and k not in NOT_MODEL_FIELDS)
        if defaulted and not released:
            warnings.warn(f"this is not the released MiMo-V2-Flash config, but it does not set {', '.join(defaulted)}; "
                          f"the released model's values were used: {_values(cls, defaulted)}", UserWarning,
                          stacklevel=2)
        return config

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "MiMoConfig":
        """Read `config.json` from a directory (or the given file)."""
        p = Path(path)
        f = p / "config.json" if p.is_dir() else p
        if not f.exists():
            raise FileNotFoundError(f"no config.json in {p}")
        d = read_json_object(f)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                config = cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{f}: {e}") from None
        for w in caught:  # again, naming the file
            warnings.warn(f"{f}: {w.message}", w.category, stacklevel=2)
        return config

    def to_dict(self) -> dict[str, Any]:
        """Hub format, with transformers' keys alongside so that transformers builds the same model."""
        d = dataclasses.asdict(self)
        d.pop("mtp_loss_weight")
        if d["quantization_config"] is None:
            d.pop("quantization_config")
        d["sliding_window_size"] = self.sliding_window - 1
        d["sliding_window"] = self.sliding_window - 1  # hub meaning; transformers re-derives size + 1
        d["layernorm_epsilon"] = self.rms_norm_eps
        d["routed_scaling_factor"] = self.routed_scaling_factor
        hub = {"architectures": ["MiMoV2FlashForCausalLM"], "model_type": "mimo_v2_flash"}
        tf = {
            "layer_types": ["sliding_attention" if x == SWA else "full_attention" for x in self.hybrid_layer_pattern],
            "mlp_layer_types": ["sparse" if x else "dense" for x in self.moe_layer_freq],
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": self.rope_theta,
                                   "partial_rotary_factor": self.partial_rotary_factor},
                "sliding_attention": {"rope_type": "default", "rope_theta": self.swa_rope_theta,
                                      "partial_rotary_factor": self.partial_rotary_factor},
            },
        }
        return {**hub, **d, **tf}

    def transformers_compatible(self) -> list[str]:
        """Reasons transformers' MiMoV2FlashConfig cannot express this config (empty if it can)."""
        why = []
        if self.swa_num_attention_heads != self.num_attention_heads:
            why.append("swa_num_attention_heads != num_attention_heads")
        if self.swa_num_key_value_heads != 2 * self.num_key_value_heads:
            why.append("swa_num_key_value_heads != 2 * num_key_value_heads")
        if (self.swa_head_dim, self.swa_v_head_dim) != (self.head_dim, self.v_head_dim):
            why.append("SWA head dims differ from the full-attention ones")
        if self.add_full_attention_sink_bias or not self.add_swa_attention_sink_bias:
            why.append("sinks are not exactly 'SWA only'")
        return why

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write `config.json` (atomically) into directory `path`."""
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p, prefix=".config.", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
        os.replace(tmp, p / "config.json")

    def replace(self, **changes: Any) -> "MiMoConfig":
        return dataclasses.replace(self, **changes)


def _values(cls, names: list[str]) -> str:
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    return ", ".join(f"{k}={defaults[k]!r}" for k in names)
