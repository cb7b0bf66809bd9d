"""Memory-mapped token data: the rows equal the in-memory packer's, the loader shards and resumes, and the
`tokenize` command writes a whole directory or none."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mimo_flash.cli import main
from mimo_flash.training.data import Document, load_rows, pack_documents
from mimo_flash.training.demo import train_tokenizer
from mimo_flash.training.tokens import TokenLoader, TokenRows, tokenizer_fingerprint, write_tokens

KEYS = ("input_ids", "labels", "position_ids", "segment_ids")


def _docs(seed: int = 0) -> list[Document]:
    """Text documents (cut at row ends) and conversations (kept whole, masked), some empty, some longer than a row."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for i in range(60):
        n = int(torch.randint(0, 40, (1,), generator=g))
        ids = torch.randint(0, 70000, (n,), generator=g).tolist()  # ids over 2^16: uint32 is needed
        if i % 3 == 2:
            mask = (torch.rand(n, generator=g) < 0.5).tolist()
            docs.append(Document(ids, mask, splittable=False))
        else:
            docs.append(Document(ids))
    return docs


@pytest.mark.parametrize("seq_len", [7, 16, 33])
def test_rows_equal_in_memory_packing(tmp_path, seq_len):
    docs = _docs()
    write_tokens(docs, tmp_path / "tok", pad_id=5, fingerprint="x")
    rows = TokenRows(tmp_path / "tok", seq_len)
    ref = pack_documents(docs, seq_len, pad_id=5)
    assert len(rows) == len(ref)
    got = rows.batch(range(len(rows)))
    for k in KEYS:
        assert torch.equal(got[k], getattr(ref, k)), k


def test_loader_partitions_rows_over_ranks_and_epochs(tmp_path):
    write_tokens(_docs(1), tmp_path / "tok", pad_id=0, fingerprint="x")
    rows = TokenRows(tmp_path / "tok", 8)
    R = len(rows)
    loaders = [TokenLoader(rows, batch_size=1, rank=r, world=2, seed=4) for r in range(2)]
    per = loaders[0].rows_per_epoch
    assert per == R // 2
    epochs = [[sum((ld.next_indices() for _ in range(per)), []) for ld in loaders] for _ in range(2)]
    for e0, e1 in epochs:  # each epoch: the two ranks' rows are disjoint and cover all but the R % 2 left over
        assert len(e0) == len(e1) == per
        assert len(set(e0) | set(e1)) == R - R % 2
    assert epochs[0][0] != epochs[1][0]  # a new order each epoch
    assert all(ld.epoch == 2 and ld.position == 0 for ld in loaders)
    # a different seed deals a different order
    other = TokenLoader(rows, batch_size=per, rank=0, world=2, seed=5)
    assert other.next_indices() != epochs[0][0]


def test_loader_resumes_mid_epoch(tmp_path):
    write_tokens(_docs(2), tmp_path / "tok", pad_id=0, fingerprint="x")
    rows = TokenRows(tmp_path / "tok", 8)
    a = TokenLoader(rows, batch_size=5, rank=1, world=2, seed=9)
    for _ in range(3):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # what a checkpoint keeps
    assert 0 < state["position"] < a.rows_per_epoch and state["epoch"] == 0
    n = 2 * a.rows_per_epoch // 5 + 2  # runs into the next epochs
    expect = [a.next_batch() for _ in range(n)]
    assert a.epoch >= 1
    b = TokenLoader(TokenRows(tmp_path / "tok", 8), batch_size=5, rank=1, world=2, seed=0)
    b.load_state_dict(state)
    for e in expect:
        got = b.next_batch()
        for k in KEYS:
            assert torch.equal(got[k], e[k])
    with pytest.raises(ValueError, match="data-parallel ranks"):
        TokenLoader(rows, 5, rank=0, world=4).load_state_dict(state)


def test_loader_state_moves_to_another_number_of_ranks(tmp_path):
    write_tokens(_docs(3), tmp_path / "tok", pad_id=0, fingerprint="x")
    rows = TokenRows(tmp_path / "tok", 8)
    two = [TokenLoader(rows, batch_size=2, rank=r, world=2, seed=6) for r in range(2)]
    for _ in range(3):
        for loader in two:
            loader.next_indices()
    state = two[0].state_dict()
    assert state["position"] == 6 and state == two[1].state_dict()
    nxt = [loader.next_indices() for loader in two]  # rows 12..15 of the epoch's order, dealt out
    one = TokenLoader(rows, batch_size=4, rank=0, world=1, seed=0)
    one.load_state_dict(state)
    assert one.position == 12
    assert one.next_indices() == [nxt[0][0], nxt[1][0], nxt[0][1], nxt[1][1]]


def test_trainer_reads_token_files_and_resumes_mid_epoch(tmp_path):
    from mimo_flash import MiMoConfig, MiMoForCausalLM
    from mimo_flash.distributed.materialize import SeededInit
    from mimo_flash.training import TrainConfig, Trainer

    g = torch.Generator().manual_seed(4)
    write_tokens([Document(torch.randint(3, 500, (int(n),), generator=g).tolist())
                  for n in torch.randint(10, 90, (40,), generator=g)], tmp_path / "tok", pad_id=0, fingerprint="x")
    rows = TokenRows(tmp_path / "tok", 32)

    def trainer(out: str, **kw) -> Trainer:
        cfg = TrainConfig(steps=4, batch_size=2, grad_accum=2, warmup_steps=1, lr=3e-3, bias_update_rate=1e-2,
                          progress=False, plot=False, out_dir=str(tmp_path / out), **kw)
        with torch.device("meta"):
            model = MiMoForCausalLM(MiMoConfig.preset("tiny", num_hidden_layers=2))
        return Trainer(model, rows, cfg, init=SeededInit(1))

    ref = [r["loss"] for r in trainer("ref").fit()]
    first = trainer("run")
    first.cfg.steps = 2  # stops as a killed run would; its checkpoint holds the loader's position
    head = [r["loss"] for r in first.fit()]
    assert 0 < first.epoch < 1 and first.loader.position == 8  # mid-epoch
    second = trainer("run")
    assert second.resume() and second.loader.state_dict() == first.loader.state_dict()
    assert head + [r["loss"] for r in second.fit()] == ref  # one process, same layout: the same numbers


def test_tokenize_command_matches_load_rows(tmp_path):
    text = "The for statement is used to iterate over the elements of a sequence. " * 30
    tok = train_tokenizer([text], 300, tmp_path / "tokenizer")
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text(text)
    (data / "b.jsonl").write_text("\n".join(json.dumps({"text": text[: 40 * i]}) for i in range(1, 6)) + "\n")
    out = tmp_path / "tokens"
    assert main(["tokenize", "--data", str(data), "--tokenizer", str(tmp_path / "tokenizer"), "--out", str(out)]) == 0
    header = json.loads((out / "header.json").read_text())
    assert header["tokenizer"] == tokenizer_fingerprint(tok) and header["num_documents"] == 6
    assert np.fromfile(out / "tokens.bin", np.uint32).size == header["num_tokens"]
    rows = TokenRows(out, 32, tokenizer=tok)
    ref = load_rows([data], tok, 32)
    got = rows.batch(range(len(rows)))
    for k in KEYS:
        assert torch.equal(got[k], getattr(ref, k)), k
    # an existing directory is never overwritten
    assert main(["tokenize", "--data", str(data), "--tokenizer", str(tmp_path / "tokenizer"), "--out", str(out)]) == 2


def test_failed_write_leaves_nothing(tmp_path):
    def docs():
        yield Document([1, 2, 3])
        raise RuntimeError("killed while reading the corpus")

    with pytest.raises(RuntimeError, match="killed"):
        write_tokens(docs(), tmp_path / "tok", pad_id=0, fingerprint="x")
    assert list(tmp_path.iterdir()) == []


def test_damaged_or_foreign_directory_is_refused(tmp_path):
    write_tokens(_docs(), tmp_path / "tok", pad_id=0, fingerprint="abc")
    with pytest.raises(ValueError, match="another tokenizer"):
        class Fake:
            class tokenizer:
                to_str = staticmethod(lambda: "{}")
            chat_template, eos_id, pad_id = None, 1, 0
        TokenRows(tmp_path / "tok", 8, tokenizer=Fake())
    with open(tmp_path / "tok" / "tokens.bin", "r+b") as f:
        f.truncate(8)
    with pytest.raises(ValueError, match="tokens.bin.*damaged"):
        TokenRows(tmp_path / "tok", 8)
    with pytest.raises(FileNotFoundError, match="not a token directory"):
        TokenRows(tmp_path, 8)
