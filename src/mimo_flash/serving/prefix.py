"""Prefix caching: KV of prompt prefixes kept by blocks of positions, restored into a slot instead of recomputed.

A prompt is prefilled in chunks aligned to multiples of `block` positions. After the chunk that ends at
position e = j * block, the slot's cache holds exactly the state of a prefill of prompt[:e], which is stored:
  - full-attention layers: the keys/values of positions [e - block, e) (the earlier blocks are stored by the
    entries of the shorter prefixes);
  - sliding-window layers: the whole ring as it is at e (the window at the prefix's end) with its tables.
Entries are keyed by a hash chain over the blocks' tokens (sha256), so a key names the whole prefix.
A request whose prompt starts with stored blocks 1..n gets them copied into its slot (full layers: each
block in place; SWA rings: entry n's ring) and prefills from n * block on, in the same aligned chunks as a
fresh prefill: the KV and therefore the outputs are the same bits as without the cache.
Eviction is least-recently-used; a lookup touches an entry after its descendants, so prefixes outlive
their extensions.
Only the main model's layers are kept: a cache with MTP rings (speculative serving) has its slot's rings
reset by restore() and primed from the prompt's tail, which the scheduler always prefills (speculate.py).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from ..generation.cache import KVCache


def _chain(parent: bytes, tokens: list[int]) -> bytes:
    h = hashlib.sha256(parent)
    h.update(",".join(map(str, tokens)).encode())
    return h.digest()


class PrefixCache:
    """Blocks of prompt KV for a KVCache's rows. block: positions per block (the scheduler's prefill chunk);
    capacity: blocks kept (each holds `block` positions of every full layer and one ring of every SWA layer)."""

    def __init__(self, cache: KVCache, block: int, capacity: int) -> None:
        if block < 1 or capacity < 1:
            raise ValueError(f"PrefixCache: block and capacity must be >= 1, got {block}, {capacity}")
        layers = [i for i in cache.layers() if i < cache.config.num_hidden_layers]  # (not the MTP rings)
        self.block, self.capacity = block, capacity
        self.full = [i for i in layers if not cache.layer_slots(i).ring]
        self.ring = [i for i in layers if cache.layer_slots(i).ring]
        self.entries: OrderedDict[bytes, dict] = OrderedDict()
        self.hits = 0  # blocks restored
        self.misses = 0  # lookups that stopped short of the longest possible prefix

    def _keys(self, tokens: list[int], n: int) -> list[bytes]:
        keys, k = [], b""
        for j in range(n):
            k = _chain(k, tokens[j * self.block:(j + 1) * self.block])
            keys.append(k)
        return keys

    def lookup(self, tokens: list[int], limit: int) -> list[dict]:
        """The stored entries of the longest cached prefix of `tokens` that is at most `limit` positions."""
        found = []
        for key in self._keys(tokens, limit // self.block):
            e = self.entries.get(key)
            if e is None:
                break
            found.append((key, e))
        for key, _ in reversed(found):  # parents end up most recent
            self.entries.move_to_end(key)
        self.hits += len(found)
        self.misses += int(len(found) < limit // self.block)
        return [e for _, e in found]

    def restore(self, row: KVCache, entries: list[dict]) -> int:
        """Reset the one-row view `row` and load the prefix of `entries` into it. Returns its length.
        (The layers of a kind share one slot table, so setting it through one layer sets it for all.)"""
        row.reset()
        if not entries:
            return 0
        b = self.block
        n = len(entries) * b
        for i in self.full:
            ls = row.layer_slots(i)
            for j, e in enumerate(entries):
                k, v = e["full"][i]
                ls.k[:, j * b:(j + 1) * b] = k
                ls.v[:, j * b:(j + 1) * b] = v
            ls.valid[:n] = True
        last = entries[-1]
        for i in self.ring:
            ls = row.layer_slots(i)
            k, v = last["ring"][i]
            ls.k.copy_(k)
            ls.v.copy_(v)
            ls.pos.copy_(last["pos"])
            ls.valid.copy_(last["valid"])
        return n

    def store(self, row: KVCache, tokens: list[int]) -> None:
        """After a prefill of tokens (a multiple of block long) in the one-row view `row`: keep its last block."""
        n = len(tokens) // self.block
        if n == 0 or len(tokens) % self.block:
            raise ValueError(f"PrefixCache.store: {len(tokens)} tokens is not a positive multiple of {self.block}")
        key = self._keys(tokens, n)[-1]
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        s, e = (n - 1) * self.block, n * self.block
        entry: dict = {"full": {}, "ring": {}}
        for i in self.full:
            ls = row.layer_slots(i)
            entry["full"][i] = (ls.k[:, s:e].clone(), ls.v[:, s:e].clone())
        for i in self.ring:
            ls = row.layer_slots(i)
            entry["ring"][i] = (ls.k.clone(), ls.v.clone())
            entry["pos"], entry["valid"] = ls.pos.clone(), ls.valid.clone()
        self.entries[key] = entry
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for e in self.entries.values()
                   for part in ("full", "ring") for kv in e[part].values() for t in kv)

    def clear(self) -> None:
        self.entries.clear()

