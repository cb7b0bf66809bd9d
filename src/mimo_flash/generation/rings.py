"""Adaptive K's rings (SpecRings): each row's last committed tokens and main hidden states, from which
speculative.spec_reprime re-runs MTP layers that fell behind (generation/adaptive.py; the server's slots that join
or decode plainly)."""

from __future__ import annotations

import torch


class SpecRings:
    """The last `size` committed tokens and main hidden states of every row, slot p % size for position p
    (written for every verified position; committed ones are final): what spec_reprime re-runs the MTP layers
    over. ids [B, size] long, h [B, size, D]."""

    def __init__(self, B: int, size: int, D: int, device, dtype) -> None:
        self.size = size
        self.ids = torch.zeros(B, size, dtype=torch.long, device=device)
        self.h = torch.zeros(B, size, D, dtype=dtype, device=device)

    def write(self, pos: torch.Tensor, ids: torch.Tensor, h: torch.Tensor, valid: torch.Tensor | None = None,
              keep: torch.Tensor | None = None):
        """pos, ids [B, T] (distinct positions per row where valid, at most `size` apart); h [B, T, D];
        valid [B, T] or None (all valid); keep [B] or None: rows left as they are (frozen rows: what they hold
        is written back). In place, graph-safe."""
        if valid is not None:  # left padding (position -1): rewrite what the row's position 0 writes to slot 0
            first = valid.long().argmax(1, keepdim=True)
            pos = torch.where(valid, pos, 0)
            ids = torch.where(valid, ids, ids.gather(1, first))
            h = torch.where(valid[..., None], h, h.gather(1, first[..., None].expand(-1, 1, h.shape[-1])))
        slot = pos % self.size
        if keep is not None:
            old_ids, old_h = self.read(pos)
            ids = torch.where(keep[:, None], old_ids, ids)
            h = torch.where(keep[:, None, None], old_h, h.to(self.h.dtype))
        self.ids.scatter_(1, slot, ids)
        self.h.scatter_(1, slot[..., None].expand(*slot.shape, self.h.shape[-1]), h.to(self.h.dtype))

    def rows(self, start: int, stop: int) -> "SpecRings":
        """The rings of rows [start, stop), sharing this one's storage."""
        view = SpecRings.__new__(SpecRings)
        view.size, view.ids, view.h = self.size, self.ids[start:stop], self.h[start:stop]
        return view

    def read(self, pos: torch.Tensor):
        """pos [B, T] -> (ids [B, T], h [B, T, D])."""
        slot = pos % self.size
        return self.ids.gather(1, slot), self.h.gather(1, slot[..., None].expand(*slot.shape, self.h.shape[-1]))
