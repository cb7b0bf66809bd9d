"""KV cache: every position for full-attention layers, a ring of the window for sliding-window layers.

Layout (B = batch, Hkv = kv heads of the layer, D / Dv = key / value head dims):

    full-attention layer  k [B, Hkv, S, D], v [B, Hkv, S, Dv]   slot j holds position j (S = max_length)
    sliding-window layer  k [B, Hkv, R, D], v [B, Hkv, R, Dv]   slot p % R holds position p (R = window + slack)
    MTP layer k           a ring like the SWA layers, at cache slot num_hidden_layers + k

Every row of the batch has its own positions (left-padded prompts, rows that accept different numbers
of speculative tokens). Which key a query may see is decided by positions and validity, as in
ops/attention.py, so the cache hands the attention its keys' positions and segments: a valid key has
segment 0, an empty or rolled-back slot segment -1, an invalid (padding) query segment -2.

Layers that always see the same positions share one table of slot positions/validity ("groups"):
all main full-attention layers, all main SWA layers, and each MTP layer on its own.

THE CONTRACT (the only way anything outside this file touches a cache; its tensors are private):

    cache.step(group, q_pos, q_valid, kv_len) -> AttnMeta
        before a forward (runner): plans the writes of its new tokens, updates the group's slot tables
    cache.update(layer_idx, k, v, meta) -> (keys, values, meta)
        model/attention.py, per layer: writes this step's keys/values, returns what to attend over
    cache.attention(q, k, v, meta, scale, window, sink) -> out
        model/attention.py: attention over what update() returned (decode-shaped kernels)
    cache.rollback(lengths, group) / cache.reset()
        speculative decoding (rejected drafts) / a new generate() call
    cache.layers() -> [layer_idx, ...]; cache.layer_slots(layer_idx, row) -> LayerSlots
        the batch-1 Triton step: one row's buffers of one layer, in place (keys, values, slot positions and
        validity, ring or not)
    cache.one_token_tables(row, group) -> OneTokenTables
        the batch-1 Triton step's table kernels: the tensors that a one-token step of `row` at position p
        updates (the main model's, or an MTP layer's ring), and the rule it must apply to them (the
        one-token, all-valid case of step()):
            full_valid[p] = True; ring_valid[p % ring] = True; ring_pos[p % ring] = p
        (tests/test_generation.py checks the rule against step(), tests/test_triton_decode.py the kernel)
    sizes: B (rows), S (max_length), R / ring_size() (ring slots), slack, device, dtype, nbytes()

Two ways to attend in a ring, chosen per step:
  - write-then-attend (static shapes, the decode path): valid when the T new tokens cannot overwrite a key
    that one of them still needs, i.e. T <= R - window + 1. Slack R - window = 2 * num_speculative_tokens
    covers verification (K + 1 tokens) and the re-run of MTP layers (up to 2K + 1 tokens), and also keeps the
    keys that rolled-back tokens overwrote out of the window (see speculative.py).
  - concat (chunked prefill, T large): keys = the ring before writing ++ the new tokens; then only the
    last R tokens of each row are written.

Invalid tokens of a step (left padding, rows with fewer tokens, frozen rows) must not change the cache. A
scatter with static shapes still writes one value per token, so every buffer and slot table is stored flat with
one element more than it holds (the scratch slot, after the last row), where invalid tokens write; no step reads
it, and the [B, Hkv, n, D] views of the rows stay contiguous. (Writing them over a valid token's slot instead,
with that token's value, reads the buffer or the new tokens back before the scatter: torch.compile then cannot
fuse the RoPE and value scale into the scatter, 3-4 more kernels a layer in every masked verification.)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..config import MiMoConfig
from ..ops.attention import AttnMeta
from .attention import cache_attention

MAIN = "main"  # group name for a main-model step (covers both the full and the SWA tables)


def mtp_group(k: int) -> str:
    return f"mtp{k}"


@dataclass(frozen=True)
class LayerSlots:
    """One row's cache of one layer (views of the cache's buffers: writes go to the cache)."""

    k: torch.Tensor  # [Hkv, n, D] keys (n = S for a full layer, R for a ring)
    v: torch.Tensor  # [Hkv, n, Dv] values
    pos: torch.Tensor  # [n] long, the position each slot holds (full layers: the slot index)
    valid: torch.Tensor  # [n] bool, whether the slot holds a key of this row
    ring: bool  # a sliding-window ring (slot = position % n) or every position (slot = position)


@dataclass(frozen=True)
class OneTokenTables:
    """What a one-token step of one row updates (see the module docstring for the rule); None where the
    model has no layer of that kind."""

    full_valid: torch.Tensor | None  # [S] bool
    ring_valid: torch.Tensor | None  # [R] bool
    ring_pos: torch.Tensor | None  # [R] long
    ring: int  # R


@dataclass
class _Plan:
    """One group's writes for the current step (B rows, T new tokens)."""

    rows: torch.Tensor  # [B, 1] long, each row's index in the storage (rows() views start further in)
    slots: torch.Tensor  # [B, T] long, slot each token writes (if it writes)
    write: torch.Tensor | None  # [B, T] bool, tokens that really write (None = all; the others: the scratch slot)
    meta: AttnMeta  # queries vs the keys returned by update()
    concat: bool  # keys = old buffer ++ new tokens
    kv_len: int  # slots attended: [0, kv_len) (full layers: the step's bound; rings: all R)


class KVCache:
    """Static KV cache for MiMoForCausalLM.

    config: the model's MiMoConfig; batch_size B; max_length S = the largest position + 1 it can hold.
    num_mtp: MTP layers to give a ring (0 without speculative decoding); slack: extra ring slots beyond
    the window (generate(): 2 * num_speculative_tokens with speculative decoding, else 15 so that a graphed
    chunk of 16 greedy steps can run twice from one state while it is captured).
    sliding=False keeps every position in the SWA layers too (the all-global comparison of bytes_report).
    """

    def __init__(self, config: MiMoConfig, batch_size: int, max_length: int, *, device=None,
                 dtype: torch.dtype = torch.bfloat16, num_mtp: int = 0, slack: int = 0, sliding: bool = True):
        if batch_size <= 0 or max_length <= 0:
            raise ValueError(f"KVCache: batch_size and max_length must be positive, got {batch_size}, {max_length}")
        if num_mtp > config.num_nextn_predict_layers:
            raise ValueError(f"KVCache: {num_mtp} MTP layers requested, the model has {config.num_nextn_predict_layers}")
        self.config, self.B, self.S, self.window = config, batch_size, max_length, config.sliding_window
        self.R = min(self.window + slack, max_length) if sliding else max_length
        self.sliding, self.slack = sliding, slack
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        # storage, flat with the scratch slot last (module docstring): keys [B * Hkv * n + 1, D], values likewise;
        # per group, slot validity [B * n + 1] and (rings) slot positions [B * n + 1]. Views: _kv(), _tables().
        self._k: dict[int, torch.Tensor] = {}
        self._v: dict[int, torch.Tensor] = {}
        self._heads: dict[int, int] = {}
        self._rows, self._r0 = batch_size, 0  # rows of the storage; this cache's first (rows() views)
        self._group_of: dict[int, str] = {}
        L = config.num_hidden_layers
        layers = [(i, config.is_swa(i)) for i in range(L)] + [(L + k, True) for k in range(num_mtp)]
        for i, swa in layers:
            d = config.attn_dims(swa)
            ring = swa and sliding
            n = self.R if ring else self.S
            m = batch_size * d["kv_heads"] * n + 1
            self._k[i] = torch.zeros(m, d["qk_dim"], device=self.device, dtype=dtype)
            self._v[i] = torch.zeros(m, d["v_dim"], device=self.device, dtype=dtype)
            self._heads[i] = d["kv_heads"]
            if i >= L:
                self._group_of[i] = mtp_group(i - L)
            else:
                self._group_of[i] = "swa" if ring else "full"
        self._pos: dict[str, torch.Tensor] = {}
        self._valid: dict[str, torch.Tensor] = {}
        for g in sorted(set(self._group_of.values())):
            n = self._slots(g)
            if g == "full":  # slot j always holds position j (a table never written)
                self._pos[g] = torch.arange(n, device=self.device)
            else:
                self._pos[g] = torch.full((batch_size * n + 1,), -1, device=self.device, dtype=torch.long)
            self._valid[g] = torch.zeros(batch_size * n + 1, device=self.device, dtype=torch.bool)
        self._plans: dict[str, _Plan] = {}

    # ------------------------------------------------------------------ sizes
    def nbytes(self) -> int:
        """Bytes this cache allocated (keys, values and the position/validity tables)."""
        ts = list(self._k.values()) + list(self._v.values()) + list(self._valid.values())
        ts += [p for g, p in self._pos.items() if g != "full"]  # the full table is one arange, not per row
        return sum(t.numel() * t.element_size() for t in ts)

    def ring_size(self) -> int:
        return self.R

    def _slots(self, g: str) -> int:
        """Slots a row of group g holds."""
        return self.S if g == "full" else self.R

    def _view(self, flat: torch.Tensor, *shape: int) -> torch.Tensor:
        """This cache's rows of a flat storage tensor (scratch slot dropped) as [B, *shape]."""
        return flat[:-1].view(self._rows, *shape)[self._r0:self._r0 + self.B]

    def _kv(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer layer_idx's keys [B, Hkv, n, D] and values [B, Hkv, n, Dv] (views)."""
        n, H = self._slots(self._group_of[layer_idx]), self._heads[layer_idx]
        k, v = self._k[layer_idx], self._v[layer_idx]
        return self._view(k, H, n, k.shape[-1]), self._view(v, H, n, v.shape[-1])

    def _tables(self, g: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Group g's slot positions [B, n] (long) and validity [B, n] (bool) (views)."""
        n = self._slots(g)
        pos = self._pos[g].expand(self.B, n) if g == "full" else self._view(self._pos[g], n)
        return pos, self._view(self._valid[g], n)

    # ------------------------------------------------------------------ steps
    def _ring_groups(self, group: str) -> list[str]:
        if group == MAIN:
            return [g for g in ("full", "swa") if g in self._valid]
        return [group]

    def step(self, group: str, q_pos: torch.Tensor, q_valid: torch.Tensor | None, kv_len: int) -> AttnMeta:
        """Plan the writes of one forward and update the group's tables.

        group: MAIN or mtp_group(k); q_pos [B, T] long positions of the new tokens (each row consecutive
        over its valid tokens); q_valid [B, T] bool or None (all valid); kv_len: host bound on
        max(q_pos of valid tokens) + 1 (full layers attend over slots [0, kv_len)).
        Returns the AttnMeta to run the model with.
        """
        B, T = q_pos.shape
        if B != self.B:
            raise ValueError(f"KVCache holds {self.B} rows, got a batch of {B}")
        if kv_len > self.S:
            raise ValueError(f"position {kv_len - 1} does not fit in a KV cache of max_length {self.S}")
        q_seg = None if q_valid is None else torch.where(q_valid, 0, -2)
        for g in self._ring_groups(group):
            self._plans[g] = self._plan(g, q_pos, q_valid, q_seg, kv_len)
        return AttnMeta(q_pos=q_pos, k_pos=q_pos, q_seg=q_seg, k_seg=q_seg, aligned=False, plain=False)

    def _plan(self, g, q_pos, q_valid, q_seg, kv_len) -> _Plan:
        B, T = q_pos.shape
        full = g == "full"
        n = self._slots(g)
        concat = not full and T > n - self.window + 1
        write = q_valid
        if concat and T > n:  # only the last n tokens of a row survive; earlier ones must not write
            last = torch.where(q_valid, q_pos, -1).amax(1, keepdim=True) if q_valid is not None \
                else q_pos[:, -1:]
            keep = q_pos > last - n
            write = keep if write is None else write & keep
        slots = q_pos if full else torch.remainder(q_pos, n)
        k_seg_new = torch.zeros_like(q_pos) if q_valid is None else torch.where(q_valid, 0, -1)
        pos, valid = self._tables(g)
        if concat:
            old_pos = pos.clone()
            old_seg = torch.where(valid, 0, -1)
        rows = self._r0 + torch.arange(B, device=slots.device)[:, None]
        cell = rows * n + slots  # the tokens' table entries in the flat storage
        if write is not None:  # tokens that must not write: the scratch slot
            cell = torch.where(write, cell, self._valid[g].shape[0] - 1)
        self._valid[g].index_fill_(0, cell.view(-1), True)  # (a scalar fill: no host tensor in a CUDA graph)
        if not full:
            self._pos[g][cell] = q_pos
        if concat:
            k_pos = torch.cat([old_pos, q_pos], 1)
            k_seg = torch.cat([old_seg, k_seg_new], 1)
        else:
            m = kv_len if full else n
            k_pos, k_seg = pos[:, :m], torch.where(valid[:, :m], 0, -1)
        meta = AttnMeta(q_pos=q_pos, k_pos=k_pos, q_seg=torch.zeros_like(q_pos) if q_seg is None else q_seg,
                        k_seg=k_seg, aligned=False, plain=False)
        return _Plan(rows=rows, slots=slots, write=write, meta=meta, concat=concat, kv_len=kv_len if full else n)

    @staticmethod
    def _write(flat: torch.Tensor, n: int, new: torch.Tensor, plan: _Plan) -> None:
        """flat storage [B * H * n + 1, d] <- new [B, H, T, d] at plan.slots (one index_put_, which torch.compile
        keeps in place and fuses with what computed `new`)."""
        H = new.shape[1]
        heads = torch.arange(H, device=new.device)
        idx = (plan.rows[:, :, None] * H + heads) * n + plan.slots[:, :, None]  # [B, T, H]
        if plan.write is not None:
            idx = torch.where(plan.write[:, :, None], idx, flat.shape[0] - 1)
        flat[idx] = new.transpose(1, 2)  # values [B, T, H, d]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, meta: AttnMeta):
        """The attention hook. k [B, Hkv, T, D], v [B, Hkv, T, Dv] (rotated, value-scaled) ->
        (keys [B, Hkv, Tk, D], values [B, Hkv, Tk, Dv], AttnMeta of queries vs those keys)."""
        g = self._group_of[layer_idx]
        plan = self._plans[g]
        K, V = self._kv(layer_idx)
        if plan.concat:
            k_all, v_all = torch.cat([K, k.to(K.dtype)], 2), torch.cat([V, v.to(V.dtype)], 2)
        n = K.shape[2]
        self._write(self._k[layer_idx], n, k.to(K.dtype), plan)
        self._write(self._v[layer_idx], n, v.to(V.dtype), plan)
        if plan.concat:
            return k_all, v_all, plan.meta
        return K[:, :, :plan.kv_len], V[:, :, :plan.kv_len], plan.meta

    # ------------------------------------------------------------------ the batch-1 Triton step
    def layer_slots(self, layer_idx: int, row: int = 0) -> LayerSlots:
        """Row `row` of layer `layer_idx`'s buffers and slot tables (views, see LayerSlots)."""
        g = self._group_of[layer_idx]
        (k, v), (pos, valid) = self._kv(layer_idx), self._tables(g)
        return LayerSlots(k=k[row], v=v[row], pos=pos[row], valid=valid[row], ring=g != "full")

    def layers(self) -> list[int]:
        """The layer indices this cache holds (main layers, then the MTP layers' slots)."""
        return sorted(self._k)

    def one_token_tables(self, row: int = 0, group: str = MAIN) -> OneTokenTables:
        """The tables a one-token step of `row` updates (see the module docstring for the rule): the main
        model's, or an MTP layer's (group mtp_group(k): its ring only)."""
        ring = "swa" if group == MAIN else group
        ring_pos, ring_valid = self._tables(ring) if ring in self._valid else (None, None)
        full_valid = self._tables("full")[1][row] if group == MAIN and "full" in self._valid else None
        return OneTokenTables(full_valid=full_valid, ring_valid=None if ring_valid is None else ring_valid[row],
                              ring_pos=None if ring_pos is None else ring_pos[row], ring=self.R)

    @staticmethod
    def attention(q, k, v, meta, scale, window, sink):
        """Attention over the cache (see generation/attention.py)."""
        return cache_attention(q, k, v, meta, scale, window, sink)

    # ------------------------------------------------------------------ rollback
    def rollback(self, lengths: torch.Tensor, group: str = MAIN) -> None:
        """Forget every entry at a position >= lengths[b] in row b. lengths [B] long."""
        for g in self._ring_groups(group):
            pos, valid = self._tables(g)
            valid &= pos < lengths[:, None]

    def reset(self) -> None:
        for g in self._valid:
            pos, valid = self._tables(g)
            valid.zero_()
            if g != "full":
                pos.fill_(-1)

    # ------------------------------------------------------------------ row views (serving)
    def rows(self, start: int, stop: int | None = None) -> "KVCache":
        """A cache over rows [start, stop) (default: the one row `start`) that shares this cache's storage:
        a forward, rollback() or reset() through it changes those rows here and no others. The serving
        scheduler prefills one slot's prompt through such a view while the whole batch decodes through
        this cache. The view has its own write plans, so do not interleave a step() on it and on this cache
        before their update()s have run."""
        stop = start + 1 if stop is None else stop
        if not 0 <= start < stop <= self.B:
            raise ValueError(f"KVCache.rows: rows [{start}, {stop}) outside a cache of {self.B} rows")
        view = copy.copy(self)  # storage, sizes and settings shared; its rows start at _r0
        view._r0, view.B = self._r0 + start, stop - start
        view._plans = {}
        return view


def cache_bytes(config: MiMoConfig, context: int, *, batch_size: int = 1, dtype: torch.dtype = torch.bfloat16,
                num_mtp: int = 0, slack: int = 0, sliding: bool = True) -> int:
    """Bytes a KVCache for `context` positions allocates (built on the meta device: nothing is allocated)."""
    return KVCache(config, batch_size, context, device="meta", dtype=dtype, num_mtp=num_mtp, slack=slack,
                   sliding=sliding).nbytes()


def bytes_report(config: MiMoConfig, contexts=(4096, 32768, 262144), dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Per-sequence cache bytes at each context: this cache (main layers, + MTP rings) vs every layer global."""
    rows = []
    for n in contexts:
        ours = cache_bytes(config, n, dtype=dtype)
        mtp = cache_bytes(config, n, dtype=dtype, num_mtp=config.num_nextn_predict_layers)
        glob = cache_bytes(config, n, dtype=dtype, sliding=False)
        rows.append(dict(context=n, ours=ours, ours_with_mtp=mtp, all_global=glob, saving=glob / ours))
    return rows


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n}"


def format_bytes_report(config: MiMoConfig, contexts=(4096, 32768, 262144), dtype=torch.bfloat16,
                        name: str = "") -> str:
    rows = bytes_report(config, contexts, dtype)
    lines = [f"KV cache bytes per sequence{(' (' + name + ')') if name else ''}, {str(dtype).replace('torch.', '')}, "
             f"window {config.sliding_window}:",
             f"{'context':>9} | {'ours (main)':>12} | {'ours + MTP':>12} | {'all-global':>12} | saving"]
    for r in rows:
        lines.append(f"{r['context']:>9} | {format_bytes(r['ours']):>12} | {format_bytes(r['ours_with_mtp']):>12} | "
                     f"{format_bytes(r['all_global']):>12} | {r['saving']:.1f}x")
    lines.append("(rings of exactly the window; generate() adds ring slots: 2K with K speculative tokens, else 15)")
    return "\n".join(lines)
