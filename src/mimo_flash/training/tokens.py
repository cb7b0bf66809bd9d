"""Token data on disk: written once (`mimo-flash tokenize`), read through memory maps, packed on the fly.

A token directory holds
    tokens.bin   uint32 [N]        every document's tokens, one after the other
    offsets.bin  uint64 [D + 1]    document d is tokens[offsets[d]:offsets[d + 1]]
    mask.bin     uint8  [N]        1 where the token is a training target (chat: assistant turns)
    split.bin    uint8  [D]        1 where the document may be cut at a row's end (plain text)
    header.json                    format, counts, pad id, the tokenizer's fingerprint, the source files
and is written under a temporary name and renamed when complete, so it is whole or absent.

`TokenRows` gives the rows training.data.pack_documents would give for the same documents, one at a time:
opening it walks the document lengths (offsets.bin, not the tokens) once to find where each row starts.
`TokenLoader` deals the rows out to data-parallel ranks in a seeded order per epoch; its state
(epoch, position, seed) resumes it mid-epoch without reading anything again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .data import IGNORE, Document

FORMAT = "mimo-flash-tokens"
VERSION = 1
FILES = ("tokens.bin", "offsets.bin", "mask.bin", "split.bin", "header.json")


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what turns text into ids: the tokenizer, its chat template and the EOS / pad ids."""
    h = hashlib.sha256()
    for part in (tokenizer.tokenizer.to_str(), tokenizer.chat_template or "", str(tokenizer.eos_id),
                 str(tokenizer.pad_id)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def write_tokens(docs: Iterable[Document], out: str | Path, pad_id: int, fingerprint: str,
                 sources: list[str] | None = None) -> dict:
    """Stream documents into a token directory `out` (must not exist) -> the header.

    Documents are written as they come (nothing but one document is held in memory); empty ones are kept
    (they pack to nothing, as in pack_documents).
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; tokenize into a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        n_tok, n_doc, offsets = 0, 0, [0]
        with open(tmp / "tokens.bin", "wb") as ft, open(tmp / "mask.bin", "wb") as fm, \
                open(tmp / "split.bin", "wb") as fs, open(tmp / "offsets.bin", "wb") as fo:
            for doc in docs:
                ids = np.asarray(doc.ids, dtype=np.int64)
                if ids.size and (ids.min() < 0 or ids.max() >= 2 ** 32):
                    raise ValueError(f"document {n_doc}: token ids must be in [0, 2^32)")
                mask = np.ones(len(ids), np.uint8) if doc.mask is None else np.asarray(doc.mask, np.uint8)
                if len(mask) != len(ids):
                    raise ValueError(f"document {n_doc}: {len(ids)} tokens but {len(mask)} mask entries")
                ft.write(ids.astype(np.uint32).tobytes())
                fm.write(mask.tobytes())
                fs.write(bytes([1 if doc.splittable else 0]))
                n_tok += len(ids)
                n_doc += 1
                offsets.append(n_tok)
                if len(offsets) >= 65536:  # flush the offsets in blocks
                    fo.write(np.asarray(offsets[:-1], np.uint64).tobytes())
                    offsets = offsets[-1:]
            fo.write(np.asarray(offsets, np.uint64).tobytes())
            for f in (ft, fm, fs, fo):
                f.flush()
                os.fsync(f.fileno())
        if n_tok == 0:
            raise ValueError("the data holds no tokens")
        header = dict(format=FORMAT, version=VERSION, num_tokens=n_tok, num_documents=n_doc, pad_id=int(pad_id),
                      tokenizer=fingerprint, sources=list(sources or []))
        with open(tmp / "header.json", "w") as f:
            json.dump(header, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return header


class TokenRows:
    """The packed rows of a token directory, each [seq_len], built on demand from the memory maps.

    Row i equals row i of pack_documents(documents, seq_len, pad_id) (same ids, labels, positions, segments).
    """

    def __init__(self, path: str | Path, seq_len: int, tokenizer=None) -> None:
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        self.path, self.seq_len = Path(path), seq_len
        hfile = self.path / "header.json"
        if not hfile.exists():
            raise FileNotFoundError(f"{self.path} is not a token directory (no header.json); "
                                    "write one with `mimo-flash tokenize`")
        self.header = json.loads(hfile.read_text())
        if self.header.get("format") != FORMAT or self.header.get("version") != VERSION:
            raise ValueError(f"{hfile}: format {self.header.get('format')!r} version {self.header.get('version')!r}"
                             f", expected {FORMAT!r} version {VERSION}")
        if tokenizer is not None and tokenizer_fingerprint(tokenizer) != self.header["tokenizer"]:
            raise ValueError(f"{self.path} was tokenized with another tokenizer (fingerprint "
                             f"{self.header['tokenizer']}, this one {tokenizer_fingerprint(tokenizer)})")
        n, d = self.header["num_tokens"], self.header["num_documents"]
        self.pad_id = self.header["pad_id"]
        self.tokens = self._map("tokens.bin", np.uint32, n)
        self.mask = self._map("mask.bin", np.uint8, n)
        self.split = self._map("split.bin", np.uint8, d)
        self.offsets = self._map("offsets.bin", np.uint64, d + 1)
        self.starts = self._row_starts()  # [R, 2]: (document, offset in it) where each row begins

    def _map(self, name: str, dtype, count: int) -> np.ndarray:
        f = self.path / name
        size = f.stat().st_size if f.exists() else -1
        if size != count * np.dtype(dtype).itemsize:
            raise ValueError(f"{f}: expected {count} entries of {np.dtype(dtype).name} ({size} bytes found); "
                             "the token directory is damaged")
        return np.memmap(f, dtype=dtype, mode="r", shape=(count,)) if count else np.zeros(0, dtype)

    def _row_starts(self) -> np.ndarray:
        """Walk the document lengths with pack_documents' rules; record where each row begins."""
        T = self.seq_len
        lengths = np.diff(np.asarray(self.offsets, dtype=np.int64)).tolist()
        split = np.asarray(self.split).tolist()
        starts: list[tuple[int, int]] = []
        cur = 0
        for d, (n, s) in enumerate(zip(lengths, split, strict=True)):
            if n == 0:
                continue
            if not s:  # kept whole (truncated to a row); starts a new row when it does not fit
                n = min(n, T)
                if cur + n > T:
                    cur = 0
                if cur == 0:
                    starts.append((d, 0))
                cur += n
                continue
            off = 0
            while off < n:
                if cur == 0:
                    starts.append((d, off))
                take = min(T - cur, n - off)
                cur, off = cur + take, off + take
                if cur == T:
                    cur = 0
        return np.asarray(starts, dtype=np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return self.starts.shape[0]

    def fingerprint(self) -> str:
        """What resuming checks: the header (token counts, tokenizer, sources) and the row length."""
        h = hashlib.sha256(json.dumps(self.header, sort_keys=True).encode() + f"/{self.seq_len}".encode())
        return h.hexdigest()[:16]

    def row(self, i: int) -> dict[str, torch.Tensor]:
        """Row i -> {input_ids, labels, position_ids, segment_ids}, each [seq_len] int64."""
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        T = self.seq_len
        ids, lab, pos, seg = (np.empty(T, np.int64) for _ in range(4))
        cur, s = 0, -1
        d, off = (int(x) for x in self.starts[i])
        n_docs = self.split.shape[0]

        def put(a: int, b: int) -> None:  # tokens a..b of the corpus as one segment
            nonlocal cur, s
            n = b - a
            s += 1
            ids[cur:cur + n] = self.tokens[a:b]
            lab[cur:cur + n] = np.where(self.mask[a:b] != 0, ids[cur:cur + n], IGNORE)
            pos[cur:cur + n] = np.arange(n)
            seg[cur:cur + n] = s
            cur += n

        while d < n_docs and cur < T:
            a, b = int(self.offsets[d]), int(self.offsets[d + 1])
            if a == b:
                d, off = d + 1, 0
                continue
            if not self.split[d]:
                n = min(b - a, T)
                if cur + n > T:
                    break
                put(a, a + n)
                d, off = d + 1, 0
                continue
            take = min(T - cur, b - a - off)
            put(a + off, a + off + take)
            off += take
            if a + off == b:
                d, off = d + 1, 0
        if cur < T:  # padding: a segment of its own, no target
            pad = T - cur
            ids[cur:], lab[cur:], pos[cur:], seg[cur:] = self.pad_id, IGNORE, np.arange(pad), s + 1
        return {k: torch.from_numpy(v) for k, v in
                (("input_ids", ids), ("labels", lab), ("position_ids", pos), ("segment_ids", seg))}

    def batch(self, rows: Iterable[int]) -> dict[str, torch.Tensor]:
        """rows: B row indices -> dict of [B, seq_len] tensors."""
        got = [self.row(int(i)) for i in rows]
        return {k: torch.stack([g[k] for g in got]) for k in got[0]}


class TokenLoader:
    """Batches of rows for rank `rank` of `world` data-parallel ranks, deterministic and resumable.

    Epoch e orders the rows by randperm(R, seed + e) (or in order, shuffle=False); rank r takes every
    world-th row of that order from r, R // world rows an epoch (the R % world rows left over sit out that
    epoch), so the ranks partition the epoch. state_dict() = {epoch, position, seed} (position: rows this
    rank has taken in the epoch; the same on every rank). The ranks together have taken the first
    position * world rows of the epoch's order, so a state loads on another number of ranks whenever that
    count divides among them.
    """

    def __init__(self, rows: TokenRows, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0,
                 shuffle: bool = True) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        if len(rows) < world:
            raise ValueError(f"{len(rows)} rows cannot be shared by {world} data-parallel ranks")
        self.rows, self.batch_size, self.rank, self.world = rows, batch_size, rank, world
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.position = 0, 0
        self._order: tuple[int, torch.Tensor] | None = None

    @property
    def rows_per_epoch(self) -> int:
        return len(self.rows) // self.world

    def _mine(self) -> torch.Tensor:
        """This rank's rows of the current epoch, in order [rows_per_epoch]."""
        if self._order is None or self._order[0] != self.epoch:
            R = len(self.rows)
            if self.shuffle:
                order = torch.randperm(R, generator=torch.Generator().manual_seed(self.seed + self.epoch))
            else:
                order = torch.arange(R)
            self._order = (self.epoch, order[self.rank::self.world][: self.rows_per_epoch])
        return self._order[1]

    def next_indices(self) -> list[int]:
        """The row indices of this rank's next batch (advances the state)."""
        out = []
        while len(out) < self.batch_size:
            mine = self._mine()
            take = min(self.batch_size - len(out), len(mine) - self.position)
            out += mine[self.position:self.position + take].tolist()
            self.position += take
            if self.position == len(mine):
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's next batch: dict of [batch_size, seq_len] tensors."""
        return self.rows.batch(self.next_indices())

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_rows": len(self.rows),
                "world": self.world}

    def load_state_dict(self, state: dict) -> None:
        if state["num_rows"] != len(self.rows):
            raise ValueError(f"the state was saved over {state['num_rows']} rows, the data has {len(self.rows)}")
        taken = state["position"] * state["world"]  # rows of this epoch's order read by all ranks together
        if taken % self.world:
            raise ValueError(f"the state was saved with {state['world']} data-parallel ranks after {taken} rows of "
                             f"epoch {state['epoch']}, which {self.world} ranks cannot share out evenly")
        self.epoch, self.position, self.seed = state["epoch"], taken // self.world, state["seed"]
        self._order = None
