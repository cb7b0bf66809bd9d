"""`mimo-flash plan`: which tensor x expert parallel layouts can serve a model, and the memory per GPU.

    mimo-flash plan --preset flash --gpus 4 --gpu-mem 141 --context 32768 --batch 16

A layout (TP, EP) over N = TP x EP GPUs, as distributed/inference.py runs it: attention, dense MLPs, embedding
and lm_head split over TP ranks (attention heads; KV heads replicated where TP exceeds them) and replicated over
the EP groups, every rank running every sequence (so each GPU holds the KV cache of the whole batch for its
heads); routed experts split over EP ranks (E / EP experts each) and each expert's intermediate dimension over
the TP ranks that share them, so every GPU holds 1/N of the experts.
Norms, routers, biases and eh_proj are replicated. Weights are counted from the model built on the meta
device (the MTP layers included), FP8 tensors (quant.QUANTIZED_MODULES) at 1 byte plus fp32 128x128 block
scales; the KV cache from generation.cache.KVCache's own buffers. Activations and CUDA graphs are estimates.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .config import MiMoConfig

GIB = 1 << 30
RUNTIME_RESERVE = 1.5 * GIB  # CUDA context, cuBLAS/Triton workspaces, allocator fragmentation (estimate)
PREFILL_CHUNK = 512  # generate()'s default prompt tokens per prefill forward
GRAPH_BUCKETS = 4  # decode graphs kept per model (generation/engine.py keeps a few runners)
_LAYER = re.compile(r"^model\.(?:mtp\.)?layers\.(\d+)\.")


@dataclass(frozen=True)
class Layout:
    tp: int
    ep: int
    gpus: int


def tensor_bytes(config: MiMoConfig, fp8: bool) -> list[tuple[str, int, int]]:
    """(name, numel, bytes) of every persistent tensor of the model `config` describes (MTP layers included),
    as served: FP8 weight + fp32 scales where the release quantizes (when fp8), fp32 routers and correction
    biases, bf16 the rest. Built on the meta device: nothing is allocated."""
    from .model import MiMoForCausalLM
    from .quant.blocks import BLOCK, scale_grid
    from .quant.modules import quantize_model_

    with torch.device("meta"):
        model = MiMoForCausalLM(config.replace(quantization_config=None)).to(torch.bfloat16)
        if fp8:
            quantize_model_(model)
    out = []
    for name, t in model.state_dict().items():
        if name.endswith("_scale_inv"):
            continue  # counted with its weight
        n = t.numel()
        if t.dtype == torch.float8_e4m3fn:
            b = n + 4 * math.prod(scale_grid(tuple(t.shape), BLOCK))
        else:
            b = n * t.element_size()
        out.append((name, n, b))
    return out


def _kv_share(config: MiMoConfig, swa: bool, tp: int) -> float:
    """Fraction of a layer type's KV heads one TP rank holds (one head each, replicated, when TP exceeds them)."""
    kv = config.attn_dims(swa)["kv_heads"]
    return max(kv // tp, 1) / kv


def _is_swa_name(config: MiMoConfig, name: str) -> bool:
    if name.startswith("model.mtp."):
        return True
    m = _LAYER.match(name)
    return m is not None and config.is_swa(int(m.group(1)))


def rank_fraction(config: MiMoConfig, name: str, shape_rows: int, layout: Layout) -> float:
    """The fraction of tensor `name` (rows = its first dimension, for the fused qkv) one GPU holds."""
    tp, n = layout.tp, layout.gpus
    if ".mlp.experts." in name:
        return 1 / n
    swa = _is_swa_name(config, name)
    d = config.attn_dims(swa)
    if re.search(r"self_attn\.(k_proj|v_proj)\.weight$", name):
        return _kv_share(config, swa, tp)
    if name.endswith("self_attn.qkv_proj.weight"):  # fused: q rows split, k/v rows by the KV rule
        q_rows = d["heads"] * d["qk_dim"]
        return (q_rows / tp + (shape_rows - q_rows) * _kv_share(config, swa, tp)) / shape_rows
    if re.search(r"self_attn\.(q_proj\.weight|o_proj\.weight|attention_sink_bias)$", name) or \
            re.search(r"\.mlp\.(gate_proj|up_proj|down_proj|gate_up_proj)\.weight$", name) or \
            name in ("model.embed_tokens.weight", "lm_head.weight"):
        return 1 / tp
    return 1.0  # norms, router, correction bias, eh_proj


def layouts(config: MiMoConfig, gpus: int) -> list[tuple[Layout, str | None]]:
    """Every (TP, EP) with TP x EP = the GPU count, with the reason it cannot serve (None: it can)."""
    out = []
    for tp in (d for d in range(1, gpus + 1) if gpus % d == 0):
        ep = gpus // tp
        why = None
        for swa in (False, True):
            d = config.attn_dims(swa)
            if d["heads"] % tp:
                why = f"{d['heads']} {'SWA' if swa else 'full'} heads do not split over TP {tp}"
            elif d["kv_heads"] % tp and tp % d["kv_heads"]:
                why = f"{d['kv_heads']} KV heads neither split over nor replicate evenly to TP {tp}"
        if why is None and config.n_routed_experts % ep:
            why = f"{config.n_routed_experts} experts do not split over EP {ep}"
        elif why is None and config.moe_intermediate_size % tp:
            why = f"expert intermediate {config.moe_intermediate_size} does not split over TP {tp}"
        out.append((Layout(tp, ep, gpus), why))
    return out


def kv_bytes_per_gpu(config: MiMoConfig, layout: Layout, context: int, batch: int, mtp: int = 0) -> int:
    """KV cache bytes one GPU holds: the cache (generation.cache.cache_bytes, SWA rings included) of the whole
    batch, with the KV heads of one TP rank (one each where TP exceeds them)."""
    from .generation.cache import cache_bytes

    heads = {swa: round(_kv_share(config, swa, layout.tp) * config.attn_dims(swa)["kv_heads"]) for swa in (False, True)}
    rank = config.replace(num_key_value_heads=heads[False], swa_num_key_value_heads=heads[True])
    return cache_bytes(rank, context, batch_size=batch, dtype=torch.bfloat16, num_mtp=mtp)


def activation_bytes(config: MiMoConfig, layout: Layout, batch: int) -> int:
    """Estimate of the largest live activations: one prefill chunk of PREFILL_CHUNK tokens through one layer
    (residual, normed input, q/k/v, attention output, MLP / routed-expert intermediates in bf16) plus fp32
    logits for the batch."""
    D, tp = config.hidden_size, layout.tp
    d = config.attn_dims(False)
    qkv = (d["heads"] * d["qk_dim"] + d["kv_heads"] * (d["qk_dim"] + d["v_dim"])) / tp
    dense = 3 * config.intermediate_size / tp
    moe = config.num_experts_per_tok * (2 * D + 3 * config.moe_intermediate_size / tp)
    per_token = 4 * D + qkv + d["heads"] * d["v_dim"] / tp + max(dense, moe)
    return int(PREFILL_CHUNK * per_token * 2 + batch * config.vocab_size / tp * 4 * 2)


def graph_bytes(config: MiMoConfig, layout: Layout, batch: int) -> int:
    """Estimate of CUDA-graph memory pools: GRAPH_BUCKETS decode graphs, each holding one step's activations
    for the batch (a greedy chunk of generate() captures 16 steps sharing one pool)."""
    D, tp = config.hidden_size, layout.tp
    per_row = 16 * D + 4 * config.vocab_size / tp + config.num_experts_per_tok * 3 * config.moe_intermediate_size
    return int(GRAPH_BUCKETS * batch * per_row * 4)


def plan(config: MiMoConfig, gpus: int, gpu_mem_gib: float, context: int, batch: int, fp8: bool = True,
         mtp: int | None = None) -> dict:
    """Memory per GPU of every layout. mtp: MTP layers drafting (their KV rings); default all of them."""
    if min(gpus, context, batch) < 1 or gpu_mem_gib <= 0:
        raise ValueError("gpus, context and batch must be >= 1 and gpu memory > 0")
    mtp = config.num_nextn_predict_layers if mtp is None else mtp
    tensors = tensor_bytes(config, fp8)
    shapes = _rows(config)
    rows = []
    for layout, why in layouts(config, gpus):
        row = dict(tp=layout.tp, ep=layout.ep, why=why)
        if why is None:
            w = sum(b * rank_fraction(config, name, shapes.get(name, 1), layout) for name, _, b in tensors)
            row.update(weights=int(w), kv=kv_bytes_per_gpu(config, layout, context, batch, mtp),
                       activations=activation_bytes(config, layout, batch), graphs=graph_bytes(config, layout, batch),
                       reserve=int(RUNTIME_RESERVE))
            row["total"] = sum(row[k] for k in ("weights", "kv", "activations", "graphs", "reserve"))
            row["fits"] = row["total"] <= gpu_mem_gib * GIB
        rows.append(row)
    return dict(params=sum(n for _, n, _ in tensors), weight_bytes=sum(b for _, _, b in tensors), rows=rows,
                gpus=gpus, gpu_mem_gib=gpu_mem_gib, context=context, batch=batch, fp8=fp8, mtp=mtp)


def _rows(config: MiMoConfig) -> dict[str, int]:
    from .model import MiMoForCausalLM
    with torch.device("meta"):
        return {n: t.shape[0] for n, t in MiMoForCausalLM(config).state_dict().items() if t.dim()}


def format_plan(p: dict, name: str) -> str:
    g = lambda b: f"{b / GIB:8.1f}"  # noqa: E731
    fmt = "FP8 (128x128 blocks; o_proj, embeddings, lm_head bf16)" if p["fp8"] else "bf16"
    n = p["params"]
    count = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
    lines = [f"{name}: {count} parameters ({p['mtp']} MTP layers drafting), weights "
             f"{p['weight_bytes'] / GIB:.1f} GiB in {fmt}",
             f"serving {p['batch']} sequence(s) x {p['context']} tokens on {p['gpus']} GPU(s) of "
             f"{p['gpu_mem_gib']:g} GiB",
             f"{'TP':>3} {'EP':>3} | {'weights':>8} {'KV cache':>8} {'activ.':>8} {'graphs':>8} {'reserve':>8} | "
             f"{'total':>8} GiB/GPU | fits"]
    for r in p["rows"]:
        if r["why"] is not None:
            lines.append(f"{r['tp']:>3} {r['ep']:>3} | cannot: {r['why']}")
            continue
        lines.append(f"{r['tp']:>3} {r['ep']:>3} | {g(r['weights'])} {g(r['kv'])} {g(r['activations'])} "
                     f"{g(r['graphs'])} {g(r['reserve'])} | {g(r['total'])}         | {'yes' if r['fits'] else 'no'}")
    ok = [r for r in p["rows"] if r.get("fits")]
    lines.append(f"-> {len(ok)} layout(s) fit" + (f"; the least memory: TP {min(ok, key=lambda r: r['total'])['tp']} "
                                                  f"EP {min(ok, key=lambda r: r['total'])['ep']}" if ok else
                                                  ": more GPUs, FP8, a shorter context or a smaller batch"))
    lines.append("(activations, CUDA graphs and the reserve are estimates; weights and KV cache are counted)")
    return "\n".join(lines)


def register(subparsers) -> None:
    from .cli import finite_float

    p = subparsers.add_parser("plan", help="memory per GPU of the tensor x expert parallel layouts that could serve")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="checkpoint directory whose config.json to use (default: the "
                     "--preset)")
    src.add_argument("--preset", default="flash", help="config preset (flash, mini, tiny)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs of one host to spread the model over")
    p.add_argument("--gpu-mem", type=finite_float, default=141.0, help="GiB per GPU (an H200: 141)")
    p.add_argument("--context", type=int, default=32768, help="tokens per sequence (prompt + generation)")
    p.add_argument("--batch", type=int, default=1, help="sequences served at once")
    p.add_argument("--mtp", type=int, default=None, help="MTP layers drafting, whose KV rings count (default: all "
                   "the model has)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--fp8", dest="fp8", action="store_true", default=True, help="FP8 weights as released, the default")
    fmt.add_argument("--bf16", dest="fp8", action="store_false", help="bf16 weights instead of the default FP8")
    p.set_defaults(fn=cmd_plan)


def cmd_plan(args) -> int:
    config = MiMoConfig.from_pretrained(args.model) if args.model else MiMoConfig.preset(args.preset)
    if args.mtp is not None and not 0 <= args.mtp <= config.num_nextn_predict_layers:
        raise ValueError(f"--mtp must be in 0..{config.num_nextn_predict_layers}")
    p = plan(config, args.gpus, args.gpu_mem, args.context, args.batch, args.fp8, args.mtp)
    print(format_plan(p, args.model or f"preset {args.preset}"))
    return 0
