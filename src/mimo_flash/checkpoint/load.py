"""Load MiMoForCausalLM from a checkpoint, streaming tensor by tensor.

The model is built on the meta device in the target dtype, every checkpoint tensor is checked
(names, shapes, dtypes, FP8 scales) from the file headers alone, then memory is allocated once and
filled in file order from memory-mapped files, each FP8 tensor dequantized straight into its place.
Peak host memory: the model plus about one tensor. Under tensor / expert parallelism (`parallelize`) each
process builds and reads only its own parts (checkpoint/slices.py).
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..config import MiMoConfig
from ..quant.blocks import FP8, SCALE_SUFFIX, dequantize, scale_grid
from .errors import CheckpointError, CheckpointWarning
from .names import expert_index, hub_parts, is_mtp, layer_index, mtp_index, transformers_name
from .reader import DEFAULT_BLOCK, CheckpointReader, block_size, open_checkpoint
from .slices import intersect, read_slice, whole

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass
class Source:
    """One checkpoint tensor that fills (part of) one of our tensors."""
    key: str                  # checkpoint tensor name
    shape: tuple[int, ...]    # the shape it must have
    dst: tuple | None = None  # index into our tensor that it fills (None = all of it)


@dataclass
class Plan:
    """What a checkpoint holds for the model its config describes, checked from headers only."""
    reader: CheckpointReader
    config: MiMoConfig               # num_nextn_predict_layers = MTP layers to load; quantization_config None
    raw: dict                        # config.json as written
    block: tuple[int, int]           # FP8 block size
    tensors: dict[str, tuple[tuple[int, ...], list[Source]]] = field(default_factory=dict)  # our name -> sources
    source_bytes: int = 0            # bytes of every checkpoint tensor read (scales included)

    def where(self, key: str) -> str:
        """'file: tensor key' for messages."""
        return f"{self.reader.info(key).file}: tensor {key}"


def plan_checkpoint(reader: CheckpointReader, load_mtp: bool = True, strict: bool = True) -> Plan:
    """Check a checkpoint against its config and map every tensor of the model onto checkpoint tensors.

    Raises CheckpointError for anything that does not fit; warns (CheckpointWarning) for unexpected
    tensors when not strict and for FP8 scales with extra trailing rows/cols.
    """
    raw, config = reader.config()
    cfg = reader.config_path
    block = block_size(raw, cfg)
    keys = reader.keys()
    config = _check_structure(reader, raw, config, load_mtp, cfg)

    from ..model import MiMoForCausalLM
    with torch.device("meta"):
        state = MiMoForCausalLM(config).state_dict()  # names and shapes, no memory
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)

    if block is None and any(reader.info(k).dtype == FP8 for k in keys):
        warnings.warn(f"{cfg}: FP8 tensors but no quantization_config.weight_block_size; assuming "
                      f"{DEFAULT_BLOCK[0]}x{DEFAULT_BLOCK[1]} blocks", CheckpointWarning, stacklevel=3)
    plan = Plan(reader, config, raw, block or DEFAULT_BLOCK)
    missing: list[str] = []
    used: set[str] = set()
    extra_scales: list[str] = []
    for name, t in state.items():
        sources = _sources(name, tuple(t.shape), keys, config)
        plan.tensors[name] = (tuple(t.shape), sources)
        for s in sources:
            if s.key not in keys:
                missing.append(s.key)
                continue
            if _check_source(plan, s):
                extra_scales.append(s.key + SCALE_SUFFIX)
            for k in (s.key, s.key + SCALE_SUFFIX):
                if k in keys and k not in used:
                    used.add(k)
                    plan.source_bytes += reader.info(k).nbytes
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{reader.describe()}: missing {len(missing)} tensor(s) that config.json implies: "
                              f"{', '.join(missing[:5])}{more}")
    unexpected = sorted(k for k in keys - used if load_mtp or not is_mtp(k))
    if unexpected:
        listed = ", ".join(f"{k} (in {reader.info(k).file.name})" for k in unexpected[:5])
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        msg = f"{reader.describe()}: {len(unexpected)} unexpected tensor(s), not part of the model config.json describes: {listed}{more}"
        if strict:
            raise CheckpointError(msg + "; pass strict=False to ignore them")
        warnings.warn(msg + "; ignored (strict=False)", CheckpointWarning, stacklevel=3)
    if extra_scales:
        listed = "; ".join(f"{k} {reader.info(k).shape} for weight {reader.info(k[: -len(SCALE_SUFFIX)]).shape}"
                           for k in extra_scales[:10])
        more = f" (and {len(extra_scales) - 10} more)" if len(extra_scales) > 10 else ""
        warnings.warn(f"{reader.describe()}: FP8 scale(s) with extra trailing rows/cols, read as standard "
                      f"{plan.block[0]}x{plan.block[1]} ceil blocks with the extras ignored: {listed}{more}",
                      CheckpointWarning, stacklevel=3)
    return plan


def _sources(name: str, shape: tuple[int, ...], keys: set[str], config: MiMoConfig) -> list[Source]:
    """Our tensor `name` [shape] -> the checkpoint tensors that fill it (hub, transformers or mixed layout):
    the whole tensor where the checkpoint has it (transformers' fused experts), else its hub parts (one
    tensor per expert, q/k/v and a dense gate/up as separate matrices)."""
    for key in (name, transformers_name(name)):
        if key in keys:
            return [Source(key, shape)]
    meta = torch.empty(shape, device="meta")
    return [Source(key, shape if idx is None else tuple(meta[idx].shape), idx)
            for key, idx in hub_parts(name, torch.Size(shape), config)]


def _check_source(plan: Plan, s: Source) -> bool:
    """Check one checkpoint tensor's shape, dtype and FP8 scale; True if its scale has extra rows/cols."""
    reader, keys = plan.reader, plan.reader.infos
    info = reader.info(s.key)
    if info.shape != s.shape:
        raise CheckpointError(f"{plan.where(s.key)} has shape {list(info.shape)}, but config.json implies "
                              f"{list(s.shape)}")
    scale_key = s.key + SCALE_SUFFIX
    if info.dtype == FP8:
        if scale_key not in keys:
            raise CheckpointError(f"{plan.where(s.key)} is FP8 (float8_e4m3fn) but has no {scale_key}")
        sinfo = reader.info(scale_key)
        if not sinfo.dtype.is_floating_point or sinfo.dtype.itemsize == 1:
            raise CheckpointError(f"{plan.where(scale_key)} has dtype {sinfo.dtype}; an FP8 scale must be float32")
        return check_scale(info.shape, sinfo.shape, plan.block, plan.where(scale_key))
    if not info.dtype.is_floating_point or info.dtype.itemsize == 1:
        raise CheckpointError(f"{plan.where(s.key)} has dtype {info.dtype}; expected a floating-point dtype "
                              "(float32, bfloat16, float16, or float8_e4m3fn with a scale)")
    if scale_key in keys:
        raise CheckpointError(f"{plan.where(scale_key)} is a scale for a tensor that is not FP8 ({info.dtype})")
    return False


def check_scale(weight_shape: tuple[int, ...], scale_shape: tuple[int, ...], block: tuple[int, int],
                where: str) -> bool:
    """True if the scale has extra trailing rows/cols (to be ignored); raises if it cannot serve.

    `where` names the file and tensor for the error message.
    """
    need = scale_grid(weight_shape, block)
    if len(scale_shape) != len(need) or tuple(scale_shape[:-2]) != need[:-2]:
        raise CheckpointError(f"{where}: scale shape {tuple(scale_shape)} does not fit weight shape "
                              f"{tuple(weight_shape)} (expected {need} for {block[0]}x{block[1]} blocks)")
    if scale_shape[-2] < need[-2] or scale_shape[-1] < need[-1]:
        raise CheckpointError(f"{where}: scale shape {tuple(scale_shape)} has too few rows/cols for weight shape "
                              f"{tuple(weight_shape)}: {block[0]}x{block[1]} blocks need {need}")
    return tuple(scale_shape) != need



def _check_structure(reader: CheckpointReader, raw: dict, config: MiMoConfig, load_mtp: bool, cfg) -> MiMoConfig:
    """Layer, expert and MTP counts of the checkpoint against the config; returns the config to build."""
    keys = reader.keys()
    layers = {i for i in map(layer_index, keys) if i is not None}
    if layers and max(layers) + 1 != config.num_hidden_layers:
        raise CheckpointError(f"{cfg} does not match the checkpoint: num_hidden_layers={config.num_hidden_layers}, "
                              f"but the checkpoint has layers 0..{max(layers)}")
    experts = {i for i in map(expert_index, keys) if i is not None}
    if experts and max(experts) + 1 != config.n_routed_experts:
        raise CheckpointError(f"{cfg} does not match the checkpoint: n_routed_experts={config.n_routed_experts}, "
                              f"but the checkpoint has experts 0..{max(experts)}")
    mtp = {i for i in map(mtp_index, keys) if i is not None}
    found = max(mtp) + 1 if mtp else 0
    if mtp and mtp != set(range(found)):
        raise CheckpointError(f"{reader.describe()}: MTP layers {sorted(mtp)} are not numbered 0..{found - 1}")
    n = config.num_nextn_predict_layers
    if not load_mtp:
        n = 0
    elif raw.get("num_nextn_predict_layers") is None:
        n = found  # the config does not say: the checkpoint decides
    elif found == 0 and n > 0:
        warnings.warn(f"{cfg} says num_nextn_predict_layers={n}, but the checkpoint has no MTP weights "
                      "(model.mtp.layers.*); the model is built without MTP layers", CheckpointWarning, stacklevel=4)
        n = 0
    elif found != n:
        raise CheckpointError(f"{cfg} does not match the checkpoint: num_nextn_predict_layers={n}, but the "
                              f"checkpoint has {found} MTP layer(s)")
    return config.replace(num_nextn_predict_layers=n, quantization_config=None)


def read_into(dst: torch.Tensor, reader: CheckpointReader, key: str, block: tuple[int, int],
              src: tuple | None = None) -> None:
    """Copy checkpoint tensor `key` (or its part `src`) into `dst`, dequantizing FP8 and casting to dst's dtype.

    src indexes the checkpoint tensor: None (all of it), (e,) or (e, rows) for one expert of a fused
    [E, ...] tensor. dst has the shape of the selected part.
    """
    t = reader.get(key)
    if t.dtype == FP8:
        s = reader.get(key + SCALE_SUFFIX)
        if src is not None and len(src) > 1:  # rows of one fused expert: dequantize the expert, then slice
            dst.copy_(dequantize(t[src[0]], s[src[0]], block)[src[1:]])
        else:
            if src is not None:
                t, s = t[src], s[src]
            dequantize(t, s, block, out=dst)
    else:
        dst.copy_(t if src is None else t[src])


def check_finite(t: torch.Tensor, where: str, fp8: bool) -> None:
    """Raise CheckpointError if float tensor t (FP8 included) holds a NaN or an Inf."""
    if t.numel() == 0 or not t.is_floating_point():
        return
    if t.dtype == FP8:  # e4m3fn has no Inf; NaN is the bit pattern S.1111.111
        bad = bool(((t.view(torch.uint8) & 0x7F) == 0x7F).any())
    else:  # min and max propagate NaN and show +-Inf, without isfinite's full-size temporaries
        lo, hi = torch.aminmax(t)
        bad = not bool(torch.isfinite(lo) & torch.isfinite(hi))
    if bad:
        raise CheckpointError(f"{where} has non-finite values (NaN or Inf)" + (" after dequantization" if fp8 else ""))


def progress_bar(total: int, desc: str, progress: bool | None):
    """A tqdm bar in bytes; shown when `progress` is True, or when None and stderr is a terminal."""
    show = sys.stderr.isatty() if progress is None else progress
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not show,
                dynamic_ncols=True)


def load_pretrained(path: str | os.PathLike, dtype=torch.bfloat16, device=None, load_mtp: bool = True,
                    strict: bool = True, allow_pickle: bool = False, progress: bool | None = None,
                    parallelize=None, fp8: bool = False):
    """Build MiMoForCausalLM from a checkpoint directory or file.

    path: a directory with config.json and model.safetensors / sharded safetensors + index (hub or
    transformers layout, FP8 or not), or one such file beside its config.json, or a checkpoint source object
    (reader.open_checkpoint: a synthetic.SyntheticCheckpoint, generated as it is read). dtype: the model's
    dtype ("auto" = config.torch_dtype); the router weight and correction bias stay fp32. FP8 tensors
    are dequantized with their per-block scales. load_mtp=False skips the MTP layers. strict=False
    turns unexpected tensors into a warning. allow_pickle=True accepts .bin/.pt files (weights_only).
    parallelize: called with the model while it is still on the meta device, returns {our tensor name:
    [slices.Piece]} for the tensors this process keeps only part of (distributed.inference); only those
    parts are read, so the process never holds the whole model.
    fp8=True keeps the weights the release quantizes FP8-resident (quant.quantize_model_'s modules, 128x128
    blocks): FP8 tensors of the checkpoint are copied as they are where their blocks align with ours, a
    float checkpoint is quantized on load (real amax/448 scales), and a tensor an FP8 checkpoint stores
    unquantized stays so. Everything else is loaded in `dtype`.
    """
    from ..model import MiMoForCausalLM

    with open_checkpoint(path, allow_pickle=allow_pickle) as reader:
        if isinstance(dtype, str) and dtype == "auto":
            dtype = reader.config()[1].torch_dtype
        dtype = parse_dtype(dtype)
        plan = plan_checkpoint(reader, load_mtp=load_mtp, strict=strict)
        plan.config = plan.config.replace(torch_dtype=str(dtype).removeprefix("torch."))
        with torch.device("meta"):
            model = MiMoForCausalLM(plan.config).to(dtype)
        if fp8:
            from ..quant import quantize_model_
            quantize_model_(model, _stored_fp8(plan) if plan.raw.get("quantization_config") else None)
        shards = parallelize(model) if parallelize is not None else {}
        model.to_empty(device=device or "cpu")
        state = model.state_dict()
        lost = [n for n, _ in model.named_buffers() if n not in state]
        if lost:
            raise RuntimeError(f"internal: non-persistent buffers {lost} are not restored by the loader")

        units = _fp8_units(plan, state, shards)  # FP8-resident tensors kept whole: filled whole, below
        fp8_shards = {n: _fp8_hits(plan, n, shards[n]) for n in plan.tensors if n in shards and state[n].dtype == FP8}
        jobs = []  # (our name, checkpoint key, index into the checkpoint tensor, local box)
        for name, (shape, sources) in plan.tensors.items():
            if state[name].dtype == FP8:
                continue
            pieces = shards.get(name) or [whole(shape)]
            if sum(math.prod(sl.stop - sl.start for sl in p.local) for p in pieces) < state[name].numel():
                state[name].zero_()  # padding (a vocabulary that does not split evenly) reads as zeros
            for piece in pieces:
                for s in sources:
                    hit = intersect(piece, s.dst, shape)
                    if hit is not None:
                        jobs.append((name, s.key, *hit))
        jobs.sort(key=lambda j: (str(reader.info(j[1]).file), reader.info(j[1]).start))
        total = sum(_read_bytes(reader, j[1], j[2]) for j in jobs)
        total += sum(reader.info(k).nbytes + (reader.info(k + SCALE_SUFFIX).nbytes if k + SCALE_SUFFIX in reader.infos
                                               else 0) for parts in units.values() for k, _, _ in parts)
        total += sum(_read_bytes(reader, k, ck) for hits in fp8_shards.values() for k, ck, _ in hits)
        with torch.no_grad(), progress_bar(total, "loading", progress) as bar:
            for (name, lead), parts in units.items():
                bar.update(_fill_fp8(plan, state[name][lead], state[name + SCALE_SUFFIX][lead], parts))
            for name, hits in fp8_shards.items():
                bar.update(_fill_fp8_shard(plan, state[name], state[name + SCALE_SUFFIX], hits))
            for name, key, index, box in jobs:
                dst = state[name][box]
                read_slice(dst, reader, key, plan.block, index)
                is_fp8 = reader.info(key).dtype == FP8
                check_finite(dst, plan.where(key), is_fp8)
                reader.release(key)
                if is_fp8:
                    reader.release(key + SCALE_SUFFIX)
                bar.update(_read_bytes(reader, key, index))
    return model.eval()


# ------------------------------------------------------------------------------------- FP8-resident loading
def _stored_fp8(plan: Plan):
    """Module name -> whether every checkpoint tensor of its weights is FP8 (an FP8 checkpoint's choice)."""
    fp8: dict[str, bool] = {}
    for name, (_, sources) in plan.tensors.items():
        mod = name.rpartition(".")[0]
        fp8[mod] = fp8.get(mod, True) and all(plan.reader.info(s.key).dtype == FP8 for s in sources)
    return lambda module_name: fp8.get(module_name, False)


def _fp8_units(plan: Plan, state: dict, shards: dict) -> dict[tuple[str, tuple], list[tuple[str, int, int]]]:
    """Our whole (not sharded) FP8 tensors as units of work: (name, leading index (one expert or ())) ->
    [(checkpoint key, first row, end row)] that fill it, in file order. Source.dst is None, (e,), (e, rows) or
    (rows,)."""
    units: dict[tuple[str, tuple], list[tuple[str, int, int]]] = {}
    for name, (shape, sources) in plan.tensors.items():
        if state[name].dtype != FP8 or name in shards:
            continue
        for s in sources:
            idx = () if s.dst is None else tuple(s.dst)
            lead = tuple(i for i in idx if isinstance(i, int))
            rows = next((i for i in idx if isinstance(i, slice)), slice(0, shape[-2]))
            units.setdefault((name, lead), []).append((s.key, rows.start or 0, rows.stop))
    first = {u: min(plan.reader.info(k).start for k, _, _ in parts) for u, parts in units.items()}
    return dict(sorted(units.items(), key=lambda u: (str(plan.reader.info(u[1][0][0]).file), first[u[0]])))


def _fill_fp8(plan: Plan, q: torch.Tensor, scale: torch.Tensor, parts: list[tuple[str, int, int]]) -> int:
    """Fill FP8 tensor q [..., R, C] and its scale grid from checkpoint tensors covering rows [r0, r1) each.

    FP8 sources whose rows fall on our 128-row block boundaries (the release's q/k/v, experts, MLPs) are
    copied byte for byte with their scale rows (extra trailing scale rows/cols, the k_proj trap, dropped).
    Otherwise (a float checkpoint, other block sizes, parts that split a block) the parts are gathered in
    fp32 (FP8 ones dequantized) and quantized once, with real amax/448 scales. Returns the bytes read."""
    from ..quant.blocks import BLOCK, trim_scale

    reader, R = plan.reader, q.shape[-2]
    br = BLOCK[0]
    aligned = plan.block == BLOCK and all(
        reader.info(k).dtype == FP8 and r0 % br == 0 and (r1 % br == 0 or r1 == R) for k, r0, r1 in parts)
    staging = None if aligned else torch.empty(q.shape, dtype=torch.float32)
    nbytes = 0
    for key, r0, r1 in parts:
        where = plan.where(key)
        if aligned:
            t, s = reader.get(key), reader.get(key + SCALE_SUFFIX)
            q[..., r0:r1, :].copy_(t)
            scale[..., r0 // br: -(-r1 // br), :].copy_(trim_scale(s, tuple(t.shape)))
            check_finite(q[..., r0:r1, :], where, True)
            check_finite(scale[..., r0 // br: -(-r1 // br), :], plan.where(key + SCALE_SUFFIX), False)
        else:
            read_into(staging[..., r0:r1, :], reader, key, plan.block)
            check_finite(staging[..., r0:r1, :], where, reader.info(key).dtype == FP8)
        nbytes += sum(reader.info(k).nbytes for k in (key, key + SCALE_SUFFIX) if k in reader.infos)
        _release(reader, key)
    if staging is not None:
        _store_quantized(staging, q, scale, parts[0][0])
    return nbytes


def _release(reader: CheckpointReader, key: str) -> None:
    """Drop the pages of checkpoint tensor `key` and of its scale (if it has one)."""
    for k in (key, key + SCALE_SUFFIX):
        if k in reader.infos:
            reader.release(k)


def _store_quantized(staging: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, name: str) -> None:
    """Quantize the fp32 staging tensor once (real amax/448 block scales) into FP8 q and its scale grid."""
    from ..quant.blocks import BLOCK, quantize

    qs, ss = quantize(staging.to(q.device), BLOCK, name)
    q.copy_(qs)
    scale.copy_(ss)


def _fp8_hits(plan: Plan, name: str, pieces) -> list[tuple[str, tuple, tuple]]:
    """A sharded FP8-resident tensor's reads: [(checkpoint key, index into it, local box it fills)]."""
    shape, sources = plan.tensors[name]
    return [(s.key, *hit) for piece in pieces for s in sources
            if (hit := intersect(piece, s.dst, shape)) is not None]


def _fill_fp8_shard(plan: Plan, q: torch.Tensor, scale: torch.Tensor, hits: list[tuple[str, tuple, tuple]]) -> int:
    """Fill a rank's FP8 shard q [..., r, c] and its scale grid from the parts of checkpoint tensors it keeps.

    Where every part is FP8 in our block size and starts and ends on block boundaries both in the checkpoint
    tensor and in q (quant.blocks.block_aligned: the release's q and v rows, intermediate shares that are
    multiples of 128) only those FP8 bytes and their scale rows/cols are read and copied, so the shard
    computes with the release's numbers. Otherwise (the k rows of a 192-row kv head starting inside a block, a
    float checkpoint) each part's covering blocks are read and dequantized into an fp32 staging tensor of the
    shard's size, which is quantized once with scales of its own (an FP8 rounding of the released values,
    as vLLM does). Never more than the shard plus one part in memory. Returns the bytes read."""
    from ..quant.blocks import BLOCK, block_aligned, block_box

    reader = plan.reader
    aligned = plan.block == BLOCK and all(
        reader.info(k).dtype == FP8 and block_aligned(ck, box, reader.info(k).shape, tuple(q.shape), BLOCK)
        for k, ck, box in hits)
    staging = None if aligned else torch.zeros(q.shape, dtype=torch.float32)
    nbytes = 0
    for key, ck, box in hits:
        where = plan.where(key)
        if aligned:
            q[box].copy_(reader.get(key)[ck])
            scale[block_box(box, BLOCK)].copy_(reader.get(key + SCALE_SUFFIX)[block_box(ck, BLOCK)])
            check_finite(q[box], where, True)
            check_finite(scale[block_box(box, BLOCK)], plan.where(key + SCALE_SUFFIX), False)
        else:
            read_slice(staging[box], reader, key, plan.block, ck)
            check_finite(staging[box], where, reader.info(key).dtype == FP8)
        nbytes += _read_bytes(reader, key, ck)
        _release(reader, key)
    if staging is not None:
        _store_quantized(staging, q, scale, hits[0][0])
    return nbytes


def _read_bytes(reader: CheckpointReader, key: str, index: tuple) -> int:
    """Bytes of checkpoint tensor `key`[index] (its scale included), for the progress bar."""
    info = reader.info(key)
    part = math.prod(i.stop - i.start if isinstance(i, slice) else 1 for i in index)
    n = part * info.dtype.itemsize
    if info.dtype == FP8:
        n += reader.info(key + SCALE_SUFFIX).nbytes * part // max(1, math.prod(info.shape))
    return n
