"""Training data: read documents, tokenize them, pack them into fixed-length rows.

Sources (files, or directories of them):
    *.txt, *.md, ... - plain text; each file is one document.
    *.jsonl          - one JSON object a line: {"text": "..."} (pre-training) or
                       {"messages": [{"role": ..., "content": ...}, ...]} (chat; loss on assistant turns only).

Packing puts several documents in one row of `seq_len` tokens. Each row carries
    input_ids    [T]  token ids
    labels       [T]  the ids again where the token is a training target, -100 elsewhere
    position_ids [T]  restart at 0 at each document
    segment_ids  [T]  0, 1, 2, ... one per document in the row (padding is a segment of its own)
so that attention never crosses a document boundary (the model masks by segment) and a loss term
that would predict across a boundary is dropped (model.loss.shifted_targets).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from ..model.loss import IGNORE, shifted_targets
from ..tokenizer import Tokenizer

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}


@dataclass
class Document:
    ids: list[int]
    mask: list[bool] | None = None  # per token: is it a training target (None = all)
    splittable: bool = True  # plain text may be cut at a row's end; a conversation is kept whole


def data_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand directories (sorted, recursively) into the data files they hold (*.jsonl, *.json, and text:
    *.txt, *.md, *.rst, *.text); a file named directly is read whatever its suffix."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and (f.suffix in TEXT_SUFFIXES or
                                                                       f.suffix in (".jsonl", ".json")))
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"training data {p} does not exist")
    if not out:
        raise ValueError(f"no training data files in {', '.join(map(str, paths))}")
    return out


def read_documents(paths: Iterable[str | Path], tokenizer: Tokenizer, add_eos: bool = True) -> Iterator[Document]:
    """Tokenized documents of every file, in order. Text documents end with the EOS token when known."""
    eos = [tokenizer.eos_id] if add_eos and tokenizer.eos_id is not None else []
    for f in data_files(paths):
        if f.suffix in (".jsonl", ".json"):
            with open(f, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{f}:{n}: not valid JSON ({e})") from None
                    if not isinstance(obj, dict):
                        raise ValueError(f"{f}:{n}: expected a JSON object with 'text' or 'messages'")
                    if "messages" in obj:
                        try:
                            ids, mask = tokenizer.encode_chat(obj["messages"])
                        except ValueError as e:
                            raise ValueError(f"{f}:{n}: {e}") from None
                        if any(mask):
                            yield Document(ids, mask, splittable=False)
                    elif isinstance(obj.get("text"), str):
                        yield Document(tokenizer.encode(obj["text"]) + eos)
                    else:
                        raise ValueError(f"{f}:{n}: expected a 'text' string or a 'messages' list")
        else:
            try:
                text = f.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{f}: not UTF-8 text") from None
            if text.strip():
                yield Document(tokenizer.encode(text) + eos)


@dataclass
class PackedRows:
    """Packed training rows; every tensor is [R, T] (int64)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def batch(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """rows [B] row indices -> dict of [B, T] tensors."""
        return {k: getattr(self, k)[rows] for k in ("input_ids", "labels", "position_ids", "segment_ids")}

    def one_document_per_row(self) -> bool:
        """Every row is one document from position 0 (no packing, no padding): the model can take the rows
        as a plain batch, without positions or segments."""
        T = self.seq_len
        return bool((self.segment_ids == self.segment_ids[:, :1]).all() and (self.position_ids == torch.arange(T)).all()
                    and (self.segment_ids >= 0).all())

    def fingerprint(self) -> str:
        """A hash of the packed tokens and labels: resuming checks it sees the same data."""
        h = hashlib.sha256()
        for t in (self.input_ids, self.labels, self.segment_ids):
            h.update(t.numpy().tobytes())
        return h.hexdigest()[:16]

    def target_tokens(self) -> int:
        """How many next-token targets the rows hold (the tokens that train the main head)."""
        return int(shifted_targets(self.labels, 1, self.segment_ids).ne(IGNORE).sum())


def pack_documents(docs: Iterable[Document], seq_len: int, pad_id: int = 0) -> PackedRows:
    """Pack documents into rows of seq_len tokens, in order.

    A document that fits in the current row goes there. Plain text that does not fit fills the rest
    of the row and continues on the next (each piece is its own segment, positions from 0); a
    conversation that does not fit starts a new row (one longer than a row is truncated).
    The last row is padded with `pad_id` (a segment of its own, label -100).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    rows: list[tuple[list[int], list[int], list[int], list[int]]] = []
    ids: list[int] = []
    lab: list[int] = []
    pos: list[int] = []
    seg: list[int] = []

    def flush():
        nonlocal ids, lab, pos, seg
        if not ids:
            return
        pad = seq_len - len(ids)
        if pad:
            ids += [pad_id] * pad
            lab += [IGNORE] * pad
            pos += list(range(pad))
            seg += [seg[-1] + 1] * pad
        rows.append((ids, lab, pos, seg))
        ids, lab, pos, seg = [], [], [], []

    def put(piece_ids, piece_mask):
        s = seg[-1] + 1 if seg else 0
        ids.extend(piece_ids)
        lab.extend(t if m else IGNORE for t, m in zip(piece_ids, piece_mask))
        pos.extend(range(len(piece_ids)))
        seg.extend([s] * len(piece_ids))

    for doc in docs:
        d_ids = doc.ids
        d_mask = doc.mask if doc.mask is not None else [True] * len(d_ids)
        if not d_ids:
            continue
        if not doc.splittable:
            if len(d_ids) > seq_len:
                d_ids, d_mask = d_ids[:seq_len], d_mask[:seq_len]
            if len(ids) + len(d_ids) > seq_len:
                flush()
            put(d_ids, d_mask)
            continue
        while d_ids:
            room = seq_len - len(ids)
            put(d_ids[:room], d_mask[:room])
            d_ids, d_mask = d_ids[room:], d_mask[room:]
            if len(ids) == seq_len:
                flush()
    flush()
    if not rows:
        raise ValueError("the training data holds no tokens")
    cols = list(zip(*rows))
    t = [torch.tensor(c, dtype=torch.long) for c in cols]
    return PackedRows(*t)


class RowSampler:
    """Deterministic order of rows across epochs: epoch e visits the rows in randperm(R, seed + e).

    The state is the number of rows consumed, so resuming only needs that count.
    """

    def __init__(self, num_rows: int, seed: int = 0, shuffle: bool = True) -> None:
        self.num_rows, self.seed, self.shuffle = num_rows, seed, shuffle
        self.consumed = 0
        self._perm: tuple[int, torch.Tensor] | None = None

    def _order(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._perm = (epoch, torch.randperm(self.num_rows, generator=g))
            else:
                self._perm = (epoch, torch.arange(self.num_rows))
        return self._perm[1]

    def take(self, n: int) -> torch.Tensor:
        """The next n row indices [n]."""
        out = []
        for i in range(self.consumed, self.consumed + n):
            out.append(self._order(i // self.num_rows)[i % self.num_rows])
        self.consumed += n
        return torch.stack(out)

    @property
    def epoch(self) -> float:
        return self.consumed / self.num_rows

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed, "num_rows": self.num_rows, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        if state["num_rows"] != self.num_rows:
            raise ValueError(f"the checkpoint was trained on {state['num_rows']} packed rows, "
                             f"the data now packs into {self.num_rows}")
        self.seed, self.shuffle, self.consumed = state["seed"], state["shuffle"], state["consumed"]


def load_rows(paths: Iterable[str | Path], tokenizer: Tokenizer, seq_len: int) -> PackedRows:
    """Read, tokenize and pack: the whole data pipeline in one call."""
    return pack_documents(read_documents(paths, tokenizer), seq_len, tokenizer.pad_id)
