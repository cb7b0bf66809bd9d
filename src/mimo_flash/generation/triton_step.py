"""The main model's one-token step for a single sequence through the Triton kernels of generation/kernels.py and
mlp_kernels.py.

GraphRunner uses it for batch-1 decode steps (one CUDA graph per cache bucket): the embedding row and the
slot tables, six kernels per MoE layer (five for a dense one), and the final norm with lm_head, the greedy
token: 73 kernels for the mini preset where the torch.compile'd step has 207. The
block sizes (options().triton_step, read when the step is built; prefetching and PDL: options().decode_prefetch,
decode_pdl) were chosen by measurement (bench/decode.py --sweep, bench/decode_kernels.py; docs/BENCHMARKS.md).
It reads the model's parameters (qkv_proj, gate_up_proj: fused as stored) and the cache's buffers
(KVCache.layer_slots, one_token_tables) in place: weights updated in place are seen by the next step.
`verify` runs T consecutive tokens (speculative verification, batch 1): the shared projections read once for
the T tokens (gemv_multi_kernel), the attention, router and expert kernels once per token in order. `draft`
runs an MTP layer over its T columns the same way (speculative drafting, batch 1), masked columns included.
FP8-resident projections (quant.FP8Linear, FP8Experts: the ones quant.QUANTIZED_MODULES names, or any subset
of them in a model loaded from a checkpoint that stores some unquantized) are read as FP8 bytes with their
128x128 block scales by the same kernels (W_FP8); the others in the model dtype.
"""

from __future__ import annotations

import torch

from ..model.moe import MoE
from ..options import TritonStepTuning, options
from ..quant.blocks import BLOCK, FP8, scale_grid
from .cache import KVCache, mtp_group


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gemv_blocks(n_rows: int, n_cols: int, tile: int | None = None,
                tuning: TritonStepTuning | None = None, fp8: bool = False) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) for a GEMV over [n_rows, n_cols]: K blocks up to tuning.max_k wide, rows per program
    halved from 64 until there are tuning.min_programs programs, the tile kept at most `tile` elements
    (default tuning.tile); both times tuning.fp8_tile for an FP8 weight. tuning: default options().triton_step."""
    t = options().triton_step if tuning is None else tuning
    f = t.fp8_tile if fp8 else 1
    tile = (t.tile if tile is None else tile) * f
    bk = min(_pow2(n_cols), t.max_k * f, tile // 2)
    bn = 64
    while bn > 2 and (_cdiv(n_rows, bn) < t.min_programs or bn * bk > tile):
        bn //= 2
    return bn, bk


def block_scales(module, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor | None]:
    """A projection's weight `name` and, if it is FP8-resident, its block scales `name`_scale_inv (else None)."""
    w = getattr(module, name)
    return w, (getattr(module, name + "_scale_inv", None) if w.dtype == FP8 else None)


def _projections(model) -> dict[str, torch.nn.Module]:
    """Qualified weight name -> its module, for every projection the step reads that may be FP8-resident (the
    main layers' and the MTP layers')."""
    out = {}
    layers = [(f"model.layers.{i}.", layer) for i, layer in enumerate(model.model.layers)]
    layers += [(f"model.mtp.layers.{k}.", layer) for k, layer in enumerate(model.model.mtp.layers)]
    for p, layer in layers:
        out[p + "self_attn.qkv_proj.weight"] = layer.self_attn.qkv_proj
        out[p + "self_attn.o_proj.weight"] = layer.self_attn.o_proj
        if isinstance(layer.mlp, MoE):
            out[p + "mlp.experts.gate_up_proj"] = layer.mlp.experts
            out[p + "mlp.experts.down_proj"] = layer.mlp.experts
        else:
            out[p + "mlp.gate_up_proj.weight"] = layer.mlp.gate_up_proj
            out[p + "mlp.down_proj.weight"] = layer.mlp.down_proj
        if p.startswith("model.mtp."):
            out[p + "eh_proj.weight"] = layer.eh_proj
    return out


def _fp8_unsupported(model) -> str | None:
    """Why the step cannot read the model's FP8 tensors (None: it can). It reads FP8 in the projections of
    _projections only, scales as quant.blocks lays them out."""
    if BLOCK != (128, 128):
        return f"FP8 block {BLOCK} (the kernels read 128x128 blocks)"
    names = _projections(model)
    for name, module in names.items():
        w, s = block_scales(module, name.rpartition(".")[2])
        if w.dtype != FP8:
            continue
        if s is None:
            return f"FP8 weight {name} has no block scales"
        want = scale_grid(tuple(w.shape), BLOCK)
        if (s.dtype != torch.float32 or s.dim() != w.dim() or s.stride(-1) != 1 or not w.is_contiguous()
                or any(a < b for a, b in zip(s.shape, want, strict=True))):
            return (f"FP8 weight {name} {tuple(w.shape)} with scales {s.dtype} {tuple(s.shape)} (this step reads "
                    f"a contiguous weight and fp32 scales of at least {want}, rows of contiguous columns)")
    for name, t in model.named_parameters():
        if t.dtype == FP8 and name not in names:
            return f"FP8 weight {name} (this step reads FP8 only in q/k/v, o_proj, eh_proj and the MLP projections)"
    return None


def unsupported(model, cache: KVCache) -> str | None:
    """Why this step cannot run `model` over `cache` (None: it can)."""
    c = model.config
    if getattr(model, "parallel", None) is not None:
        return "tensor / expert parallel model (this step runs one process's whole model)"
    if cache.B != 1:
        return "batch size is not 1"
    if c.n_group != 1:
        return "grouped routing (n_group > 1)"
    why = _fp8_unsupported(model)
    if why:
        return why
    if cache.device.type == "cuda" and model.dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {model.dtype} (bf16 / fp16 only on CUDA)"
    if cache.dtype != model.dtype:
        return "cache dtype differs from the model's"
    for swa in (False, True):
        d = c.attn_dims(swa)
        if d["v_dim"] & (d["v_dim"] - 1) or d["v_dim"] < 16 or d["qk_dim"] > 256 or d["heads"] % d["kv_heads"]:
            return f"attention dims {d} (V dim a power of two >= 16, Q/K dim <= 256)"
        if d["rotary_dim"] % 2:
            return "odd rotary dim"
    return None


def _strides(scale: torch.Tensor | None) -> tuple[int, int]:
    """(expert stride, row stride) of block scales [E, rows, cols] or [rows, cols] (a dense MLP: one expert)."""
    if scale is None:
        return 0, 0
    return (scale.stride(0), scale.stride(1)) if scale.dim() == 3 else (0, scale.stride(0))


_PDL_OK: dict = {}


def pdl_works(device: torch.device) -> bool:
    """Whether kernels launched with programmatic dependent launch run in order, eagerly and captured in a
    CUDA graph, on this device (Hopper or newer; checked once per device)."""
    key = str(device)
    if key not in _PDL_OK:
        ok = False
        if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9:
            try:
                from .kernels import probe_kernel
                x = torch.zeros(1, device=device, dtype=torch.int32)
                for _ in range(3):
                    probe_kernel[(1,)](x, PDL=True, launch_pdl=True)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    for _ in range(4):
                        probe_kernel[(1,)](x, PDL=True, launch_pdl=True)
                g.replay()
                torch.cuda.synchronize(device)
                ok = int(x.item()) == 3 + 4  # capturing runs nothing; the replay runs the 4 launches
            except Exception:
                ok = False
        _PDL_OK[key] = ok
    return _PDL_OK[key]


class TritonStep:
    """step(ids [1, 1], pos [1, 1], bucket, token=None) -> (logits [1, 1, V], hidden after the final norm
    [1, 1, D]); the argmax of the logits (the greedy next token, int64) goes to `token` [1] (default: the
    attribute `token`). Outputs are buffers that the next step overwrites. Full-attention layers read cache
    slots [0, bucket); SWA layers their ring."""

    def __init__(self, model, cache: KVCache, rope_tables: dict) -> None:
        from . import kernels as dk, mlp_kernels as mk  # need triton

        why = unsupported(model, cache)
        if why:
            raise ValueError(f"TritonStep: {why}")
        self.dk, self.mk, self.model, self.cache, self.rope_tables = dk, mk, model, cache, rope_tables
        opts = options()
        self.t = opts.triton_step  # block shapes, fixed for this object's life (its graphs bake them in)
        self.prefetch_on = opts.decode_prefetch
        self.pdl = opts.decode_pdl and pdl_works(cache.device)
        c = model.config
        dev, dt = cache.device, model.dtype
        self.D, self.V = c.hidden_size, c.vocab_size
        self.eps = model.model.norm.eps
        qkv_rows, o_rows, heads, dv, kv_heads, gu_rows, topk = 0, 0, 0, 0, 1, 0, 1
        for layer in [*model.model.layers, *model.model.mtp.layers]:  # (the split buffers serve draft() too)
            a = layer.self_attn
            qkv_rows = max(qkv_rows, a.heads * a.qk_dim + a.kv_heads * (a.qk_dim + a.v_dim))
            o_rows = max(o_rows, a.heads * a.v_dim)
            heads, dv, kv_heads = max(heads, a.heads), max(dv, a.v_dim), max(kv_heads, a.kv_heads)
            if isinstance(layer.mlp, MoE):
                ex = layer.mlp.experts
                gu_rows = max(gu_rows, layer.mlp.gate.top_k * ex.gate_up_proj.shape[1])
                topk = max(topk, layer.mlp.gate.top_k)
            else:
                gu_rows = max(gu_rows, layer.mlp.gate_up_proj.weight.shape[0])
        f32 = dict(device=dev, dtype=torch.float32)
        self.x = torch.zeros(self.D, device=dev, dtype=dt)  # residual stream between layers
        self.h = torch.zeros(self.D, device=dev, dtype=dt)  # residual stream after attention
        self.qkv = torch.zeros(qkv_rows, device=dev, dtype=dt)
        self.o = torch.zeros(o_rows, device=dev, dtype=dt)  # attention output (all heads)
        self.acc = torch.zeros(self.t.max_splits * heads * dv, **f32)  # split states of the attention
        self.m = torch.zeros(self.t.max_splits * heads, **f32)
        self.l = torch.zeros(self.t.max_splits * heads, **f32)
        self.counters = torch.zeros(kv_heads, device=dev, dtype=torch.int32)  # each kernel leaves them at 0
        self.dummy = torch.zeros(1, **f32)  # the prefetch programs' sink for their (never stored) sums
        self.router = torch.zeros(max(c.n_routed_experts, 1), **f32)
        self.gu = torch.zeros(gu_rows, device=dev, dtype=dt)
        self.sel = torch.zeros(topk, device=dev, dtype=torch.int32)
        self.wt = torch.zeros(topk, **f32)
        self.sel_dense = torch.zeros(1, device=dev, dtype=torch.int32)
        self.wt_dense = torch.ones(1, **f32)
        self.logits = torch.zeros(1, 1, self.V, device=dev, dtype=dt)
        self.hidden = torch.zeros(1, 1, self.D, device=dev, dtype=dt)
        self.token = torch.zeros(1, device=dev, dtype=torch.long)
        bn, _ = gemv_blocks(self.V, self.D, self.t.lm_head_tile, self.t)
        self.pmax = torch.zeros(_cdiv(self.V, bn), **f32)  # the lm_head programs' best logits and their indices
        self.pidx = torch.zeros(_cdiv(self.V, bn), device=dev, dtype=torch.int32)
        self.prefetch = self._prefetch_plan()
        self._verifying = False
        self._multi: dict[int, dict] = {}  # T -> the verification step's buffers (verify)
        self._drafts: dict[tuple, dict] = {}  # (k, T) -> MTP layer k's buffers (draft)

    def _prefetch_plan(self) -> list[tuple[list, list]]:
        """Per layer, the weights (at most two tensors each) that extra programs of its attention kernel and of
        its router kernel pull into L2 while those kernels run (latency-bound, they read little): the next
        layer's q/k/v, or in the last layer the start of lm_head, by this layer's router, or by its attention
        where it has none (a dense MLP); a layer's o_proj by the previous layer's router, or by its own
        attention. (The experts' weights are known only once routed.)"""
        layers = self.model.model.layers
        plan = [([], []) for _ in layers]
        moe = [isinstance(layer.mlp, MoE) for layer in layers]
        for i, layer in enumerate(layers):
            (plan[i - 1][1] if i > 0 and moe[i - 1] else plan[i][0]).append(layer.self_attn.o_proj.weight)
            ahead = (layers[i + 1].self_attn.qkv_proj.weight if i + 1 < len(layers)
                     else self.model.lm_head.weight.view(-1)[:self.t.lm_head_prefetch])
            if ahead.numel():
                plan[i][1 if moe[i] else 0].append(ahead)
        return plan

    def _launch(self, num_warps: int) -> dict:
        """Launch options; with PDL each kernel may start while the previous one finishes (Hopper+). Never in
        the verification step (`verify`): there a kernel's early loads could read a cache slot the previous
        token's attention kernel is still writing."""
        pdl = self.pdl and not self._verifying
        return dict(num_warps=num_warps, PDL=True, launch_pdl=True) if pdl else dict(num_warps=num_warps, PDL=False)

    def _pf(self, regions):
        """Prefetch arguments for up to two weight regions, and the number of PF_CHUNK chunks."""
        assert len(regions) <= 2
        regions = regions if self.prefetch_on else []
        a = regions[0] if regions else self.dummy
        b = regions[1] if len(regions) > 1 else a
        an = a.numel() if regions else 0
        bn = b.numel() if len(regions) > 1 else 0
        c = self.t.pf_chunk
        return dict(pfa_ptr=a, pfa_n=an, pfb_ptr=b, pfb_n=bn, dummy_ptr=self.dummy, PF_CHUNK=c), \
            _cdiv(an, c) + _cdiv(bn, c)

    def _gemv(self, x, norm_w, w, out, n_rows, res=None, token=None, scale=None, wide: bool = False, hidden=None):
        """out = w @ rmsnorm(x) (norm_w None: w @ x) (+ res); token (lm_head): also the hidden state (into `hidden`,
        D contiguous elements, or self.hidden), and the greedy token into `token` [1]. scale: w's block scales if w
        is FP8 (block_scales). wide: lm_head's tile without the token (an MTP layer's logits)."""
        lm_head = token is not None
        t = self.t
        bn, bk = gemv_blocks(n_rows, x.numel(), t.lm_head_tile if lm_head or wide else None, t, scale is not None)
        n_prog = _cdiv(n_rows, bn)
        warps = t.num_warps if n_rows * x.numel() >= 1 << 24 else t.small_gemv_warps
        self.dk.gemv_kernel[(n_prog,)](
            x, x if norm_w is None else norm_w, w, w if scale is None else scale, out, out if res is None else res,
            self.hidden if hidden is None else hidden, self.pmax, self.pidx, token if lm_head else self.token,
            self.counters, n_rows, self.eps,
            0 if scale is None else scale.stride(0), D=x.numel(), HAS_NORM=norm_w is not None,
            HAS_RES=res is not None, WRITE_XN=lm_head, ARGMAX=lm_head, W_FP8=scale is not None, NPROG=n_prog,
            BLOCK_N=bn, BLOCK_K=bk, BLOCK_P=min(1024, _pow2(n_prog)), **self._launch(warps))

    def _attention(self, layer, pos, bucket: int, pf: list) -> None:
        self._attend(layer, self.qkv, self.o, pos, bucket, pf)
        w, s = block_scales(layer.self_attn.o_proj)
        self._gemv(self.o, None, w, self.h, self.D, res=self.x, scale=s)

    def _attend(self, layer, qkv, o, pos, bucket: int, pf: list, write: torch.Tensor | None = None) -> None:
        """The attention kernel: one token's projections qkv -> its head outputs o, its k/v into the cache (if
        write [1] (uint8) is None or nonzero)."""
        a = layer.self_attn
        slots = self.cache.layer_slots(a.layer_idx)
        ring, kc, vc = slots.ring, slots.k, slots.v
        n_slots = kc.shape[1]
        n_keys = n_slots if ring else min(bucket, n_slots)
        block_d = max(16, _pow2(a.qk_dim))
        block_s = 64
        # one block of keys per program where MAX_SPLITS allows: their loads all start before the PDL wait
        split = _cdiv(_cdiv(n_keys, min(self.t.max_splits, _cdiv(n_keys, block_s))), block_s) * block_s
        ns = _cdiv(n_keys, split)
        rep = a.heads // a.kv_heads
        cos, sin = self.rope_tables[a.swa]
        sink = a.attention_sink_bias
        pfargs, n_pf = self._pf(pf)  # extra programs pull weights into L2 meanwhile
        self.dk.attn_kernel[(a.kv_heads + _cdiv(n_pf, ns), ns)](
            qkv, pos, cos, sin, kc, vc, slots.pos, slots.valid.view(torch.uint8),
            o if sink is None else sink, o, self.acc, self.m, self.l, self.counters, n_keys, n_slots,
            a.window if a.window is not None else 1 << 30, a.scale, float(a.v_scale),
            H=a.heads, HKV=a.kv_heads, DQK=a.qk_dim, DV=a.v_dim, ROT=a.rotary_dim, RING=ring,
            HAS_SINK=sink is not None, NS=ns, NS_PAD=max(2, _pow2(ns)), REP_PAD=max(2, _pow2(rep)), SPLIT=split,
            BLOCK_R=max(16, _pow2(rep)), BLOCK_D=block_d, BLOCK_S=block_s, **pfargs,
            write_ptr=pos if write is None else write, HAS_WRITE=write is not None, **self._launch(self.t.attn_warps))

    def _mlp(self, layer, pf: list, h: torch.Tensor | None = None, x: torch.Tensor | None = None) -> None:
        """The MLP of one token: x = h + mlp(post_attention_layernorm(h)) (default: the step's own h and x)."""
        mk, mlp, D, t = self.mk, layer.mlp, self.D, self.t
        h = self.h if h is None else h
        x = self.x if x is None else x
        norm_w = layer.post_attention_layernorm.weight
        if isinstance(mlp, MoE):
            r, ex = mlp.gate, mlp.experts
            E, I = ex.gate_up_proj.shape[0], ex.gate_up_proj.shape[1] // 2
            bn, bk = gemv_blocks(E, D, None, t)
            pfargs, n_pf = self._pf(pf)
            mk.router_kernel[(_cdiv(E, bn) + n_pf,)](
                h, norm_w, r.weight, r.e_score_correction_bias, self.router, self.sel, self.wt,
                self.counters, self.eps, float(r.scaling), E=E, E_PAD=max(2, _pow2(max(E, r.top_k))),
                TOPK=r.top_k, NORM_TOPK=bool(r.norm_topk_prob), D=D, NPROG=_cdiv(E, bn), BLOCK_N=bn, BLOCK_K=bk,
                **pfargs, **self._launch(t.expert_warps))
            w, s = block_scales(ex, "gate_up_proj")
            bn, bk = gemv_blocks(r.top_k * I, D, t.gate_up_tile, t, s is not None)
            while s is not None and I % bn:  # FP8: the up rows' tiles, from row I on, within 128-row blocks too
                bn //= 2
            mk.gate_up_kernel[(r.top_k, _cdiv(I, bn))](
                h, norm_w, self.sel, w, w if s is None else s, self.gu, self.eps, *_strides(s), I=I, D=D,
                W_FP8=s is not None, BLOCK_N=bn, BLOCK_K=bk, DOWN_EARLY=t.down_early, **self._launch(t.expert_warps))
            sel, wt, (down, down_s), k = self.sel, self.wt, block_scales(ex, "down_proj"), r.top_k
            gu = self.gu
        else:
            w, s = block_scales(mlp.gate_up_proj)
            I = w.shape[0] // 2
            gu = self.gu
            self._gemv(h, norm_w, w, gu, 2 * I, scale=s)
            sel, wt, (down, down_s), k = self.sel_dense, self.wt_dense, block_scales(mlp.down_proj), 1
        kp = max(2, _pow2(k))
        f8 = down_s is not None
        # all k experts' rows in one tile
        bn, bk = gemv_blocks(D, min(I, 512 * (t.fp8_tile if f8 else 1)), t.down_tile // kp, t, f8)
        mk.down_kernel[(_cdiv(D, bn),)](gu, sel, wt, down, down if down_s is None else down_s, h, x,
                                        D, *_strides(down_s), TOPK=k, TOPK_PAD=kp, I=I,
                                        GATED=not isinstance(mlp, MoE), W_FP8=down_s is not None, BLOCK_N=bn,
                                        BLOCK_K=bk, EARLY=t.down_early, **self._launch(t.expert_warps))

    def _tables(self, ids: torch.Tensor, x: torch.Tensor, pos: torch.Tensor) -> None:
        """One token's start: x = its embedding row; the cache's one-token rule (KVCache.one_token_tables)."""
        tab = self.cache.one_token_tables()
        full, ring = tab.full_valid is not None, tab.ring_valid is not None
        self.dk.tables_kernel[(1,)](
            ids, self.model.model.embed_tokens.weight, x, pos, tab.full_valid.view(torch.uint8) if full else pos,
            tab.ring_valid.view(torch.uint8) if ring else pos, tab.ring_pos if ring else pos, tab.ring,
            D=self.D, BLOCK=min(4096, _pow2(self.D)), HAS_FULL=full, HAS_RING=ring, **self._launch(1))

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, bucket: int, token: torch.Tensor | None = None,
                 hidden: torch.Tensor | None = None):
        """One token -> (logits [1, 1, V], the hidden state after the final norm [1, 1, D]: self.hidden, which the
        next step overwrites, or written into `hidden` (D contiguous elements) and returned from there)."""
        model = self.model
        self._tables(ids, self.x, pos)
        layers = model.model.layers
        for i, layer in enumerate(layers):
            a = layer.self_attn
            w, s = block_scales(a.qkv_proj)
            self._gemv(self.x, layer.input_layernorm.weight, w, self.qkv,
                       a.heads * a.qk_dim + a.kv_heads * (a.qk_dim + a.v_dim), scale=s)
            self._attention(layer, pos, bucket, self.prefetch[i][0])
            self._mlp(layer, self.prefetch[i][1])
        self._gemv(self.x, model.model.norm.weight, model.lm_head.weight, self.logits, self.V,
                   token=self.token if token is None else token, hidden=hidden)
        return self.logits, self.hidden if hidden is None else hidden.view(1, 1, self.D)

    # ------------------------------------------------------------------ T tokens (speculative verification)
    def _gemv_multi(self, x, norm_w, w, out, n_rows, res=None, xn=None, scale=None, lm_head: bool = False,
                    gated: bool = False):
        """out [T, n_rows] = rmsnorm(x [T, D]) @ w.T (norm_w None: x @ w.T) (+ res [T, n_rows], out's strides);
        xn [T, D] contiguous: also the normalised x (the hidden states after the final norm). x and out may be
        column slices of wider buffers (rows contiguous). Each weight tile is read once for the T tokens.
        gated: x [T, 2D] holds a dense MLP's (gate, up) and the input is silu(gate) * up (its down projection)."""
        T, D = x.shape
        D = D // 2 if gated else D
        assert x.stride(1) == 1 and out.stride(1) == 1 and (res is None or res.stride() == out.stride())
        tp = max(2, _pow2(T))
        t = self.t
        bn, bk = gemv_blocks(n_rows, D, (t.lm_head_tile if lm_head else t.tile) // tp, t, scale is not None)
        warps = t.num_warps if n_rows * D >= 1 << 24 else t.small_gemv_warps
        self.dk.gemv_multi_kernel[(_cdiv(n_rows, bn),)](
            x, x if norm_w is None else norm_w, w, w if scale is None else scale, out, out if res is None else res,
            x if xn is None else xn, n_rows, self.eps, 0 if scale is None else scale.stride(0), x.stride(0),
            out.stride(0), T=T, T_PAD=tp, D=D,
            HAS_NORM=norm_w is not None, HAS_RES=res is not None, WRITE_XN=xn is not None, GATED=gated,
            W_FP8=scale is not None, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)

    def _dense_multi(self, mlp, norm_w, h, gu, out) -> None:
        """out [T, D] = h + mlp(rmsnorm(h)) for T tokens of a dense MLP, each weight read once for all of them
        (gu: a [T, >= 2I] buffer for the gate/up products)."""
        w, s = block_scales(mlp.gate_up_proj)
        gu = gu[:, :w.shape[0]]
        self._gemv_multi(h, norm_w, w, gu, w.shape[0], scale=s)
        w, s = block_scales(mlp.down_proj)
        self._gemv_multi(gu, None, w, out, self.D, res=h, scale=s, gated=True)

    def _buffers(self, T: int) -> dict:
        b = self._multi.get(T)
        if b is None:
            dev, dt = self.x.device, self.x.dtype
            b = self._multi[T] = dict(
                x=torch.zeros(T, self.D, device=dev, dtype=dt), h=torch.zeros(T, self.D, device=dev, dtype=dt),
                qkv=torch.zeros(T, self.qkv.numel(), device=dev, dtype=dt),
                o=torch.zeros(T, self.o.numel(), device=dev, dtype=dt),
                gu=torch.zeros(T, self.gu.numel(), device=dev, dtype=dt),
                logits=torch.zeros(1, T, self.V, device=dev, dtype=dt),
                hidden=torch.zeros(1, T, self.D, device=dev, dtype=dt))
        return b

    def verify(self, ids: torch.Tensor, pos: torch.Tensor, bucket: int):
        """T consecutive tokens of the sequence (speculative verification): ids, pos [1, T] -> (logits [1, T, V],
        hidden after the final norm [1, T, D]), buffers that the next call overwrites. Each projection's weights
        (q/k/v, o_proj, a dense MLP's gate/up, lm_head) are read once for the T tokens (gemv_multi_kernel); the
        attention kernel runs once per token in order (token t's key is in the cache when token t + 1 attends;
        later tokens' slots, already in the tables, are masked by position), and so do the router, the experts
        (each token's own) and the down projections. Launched without PDL and without prefetch programs."""
        T = ids.shape[1]
        b = self._buffers(T)
        ids1, pos1 = ids.reshape(-1), pos.reshape(-1)
        model = self.model
        self._verifying = True
        try:
            for t in range(T):
                self._tables(ids1[t:t + 1], b["x"][t], pos1[t:t + 1])
            for layer in model.model.layers:
                a = layer.self_attn
                w, s = block_scales(a.qkv_proj)
                self._gemv_multi(b["x"], layer.input_layernorm.weight, w, b["qkv"][:, :a.heads * a.qk_dim + a.kv_heads
                                 * (a.qk_dim + a.v_dim)], a.heads * a.qk_dim + a.kv_heads * (a.qk_dim + a.v_dim),
                                 scale=s)
                for t in range(T):
                    self._attend(layer, b["qkv"][t], b["o"][t], pos1[t:t + 1], bucket, [])
                w, s = block_scales(a.o_proj)
                self._gemv_multi(b["o"][:, :a.heads * a.v_dim], None, w, b["h"], self.D, res=b["x"], scale=s)
                if isinstance(layer.mlp, MoE):  # each token's own experts
                    for t in range(T):
                        self._mlp(layer, [], b["h"][t], b["x"][t])
                else:  # a dense MLP's weights, once for the T tokens
                    self._dense_multi(layer.mlp, layer.post_attention_layernorm.weight, b["h"], b["gu"], b["x"])
            self._gemv_multi(b["x"], model.model.norm.weight, model.lm_head.weight, b["logits"].view(T, self.V),
                             self.V, xn=b["hidden"].view(T, self.D), lm_head=True)
        finally:
            self._verifying = False
        return b["logits"], b["hidden"]

    # ------------------------------------------------------------------ an MTP layer's T columns (drafting)
    def draft(self, k: int, ids: torch.Tensor, h_prev: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor | None):
        """MTP layer k over T columns of the sequence (speculative drafting; Runner.mtp's contract): ids, pos [1, T]
        (pos >= 0), h_prev [1, T, D], valid [1, T] bool or None (all valid) -> (logits of the last column
        [1, 1, V], the block outputs [1, T, D]), buffers that the next call for the same (k, T) overwrites.
        Columns are consecutive positions; a masked one (valid False: already computed by an earlier step)
        writes nothing to the cache and its outputs are not meaningful. One kernel for the norms of the
        embedding and of h_prev (and the ring's table update), then, each weight read once for the T columns:
        eh_proj, q/k/v, the attention once per column in order (as in verify), o_proj, the dense MLP; the
        final norm and lm_head for the last column only. Launched without PDL and prefetch programs."""
        layer = self.model.model.mtp.layers[k]
        a = layer.self_attn
        T, D = ids.shape[1], self.D
        b = self._drafts.get((k, T))
        if b is None:
            dev, dt = self.x.device, self.x.dtype
            n_qkv = a.heads * a.qk_dim + a.kv_heads * (a.qk_dim + a.v_dim)
            b = self._drafts[(k, T)] = dict(
                xcat=torch.zeros(T, 2 * D, device=dev, dtype=dt), h0=torch.zeros(T, D, device=dev, dtype=dt),
                h1=torch.zeros(T, D, device=dev, dtype=dt), out=torch.zeros(1, T, D, device=dev, dtype=dt),
                qkv=torch.zeros(T, n_qkv, device=dev, dtype=dt),
                o=torch.zeros(T, a.heads * a.v_dim, device=dev, dtype=dt),
                gu=torch.zeros(T, layer.mlp.gate_up_proj.weight.shape[0], device=dev, dtype=dt),
                logits=torch.zeros(1, 1, self.V, device=dev, dtype=dt),
                all=torch.ones(T, device=dev, dtype=torch.uint8))
        ids1, pos1 = ids.reshape(-1), pos.reshape(-1)
        write = b["all"] if valid is None else valid.reshape(-1).to(torch.uint8)
        h_in = h_prev[0] if h_prev[0].stride(-1) == 1 else h_prev[0].contiguous()
        tab = self.cache.one_token_tables(group=mtp_group(k))
        self._verifying = True
        try:
            self.dk.mtp_input_kernel[(T, 2)](
                ids1, self.model.model.embed_tokens.weight, h_in, layer.enorm.weight, layer.hnorm.weight, b["xcat"],
                write, pos1, tab.ring_valid.view(torch.uint8), tab.ring_pos, tab.ring, self.eps, h_in.stride(0),
                D=D, BLOCK=min(4096, _pow2(D)), num_warps=4)
            w, s = block_scales(layer.eh_proj)
            self._gemv_multi(b["xcat"], None, w, b["h0"], D, scale=s)
            w, s = block_scales(a.qkv_proj)
            self._gemv_multi(b["h0"], layer.input_layernorm.weight, w, b["qkv"], b["qkv"].shape[1], scale=s)
            for t in range(T):
                self._attend(layer, b["qkv"][t], b["o"][t], pos1[t:t + 1], self.cache.S, [], write[t:t + 1])
            w, s = block_scales(a.o_proj)
            self._gemv_multi(b["o"], None, w, b["h1"], D, res=b["h0"], scale=s)
            out = b["out"].view(T, D)
            self._dense_multi(layer.mlp, layer.pre_mlp_layernorm.weight, b["h1"], b["gu"], out)
            w, s = block_scales(self.model.lm_head)
            self._gemv(out[T - 1], layer.final_layernorm.weight, w, b["logits"], self.V, scale=s, wide=True)
        finally:
            self._verifying = False
        return b["logits"], b["out"]
