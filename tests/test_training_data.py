"""Training data: reading, chat masks, packing, and that packed rows compute exactly what the
documents compute alone (attention, positions and loss targets never cross a document boundary)."""

from __future__ import annotations

import json

import pytest
import torch

from mimo_flash import MiMoConfig, MiMoForCausalLM
from mimo_flash.model.loss import IGNORE, shifted_targets
from mimo_flash.training.data import Document, RowSampler, pack_documents, read_documents
from mimo_flash.training.demo import CHAT_TEMPLATE, train_tokenizer

TEXT = ("The for statement is used to iterate over the elements of a sequence. The while statement is used "
        "for repeated execution as long as an expression is true. ") * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer([TEXT], 400, tmp_path_factory.mktemp("tok"))


def test_pack_layout():
    docs = [Document([1, 2, 3]), Document([4, 5, 6, 7, 8, 9, 10]), Document([11, 12], mask=[False, True],
                                                                           splittable=False)]
    rows = pack_documents(docs, 6, pad_id=0)
    assert rows.input_ids.tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]
    # the long text document is cut at the row's end and continues as a new segment from position 0
    assert rows.position_ids.tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 0, 1]]
    assert rows.segment_ids.tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1]]
    assert rows.labels.tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, IGNORE, 12]]

    # a conversation that does not fit starts a new row; the last row is padded as its own segment
    rows = pack_documents([Document([1, 2, 3, 4]), Document([5, 6, 7], [True] * 3, splittable=False)], 6, pad_id=99)
    assert rows.input_ids.tolist() == [[1, 2, 3, 4, 99, 99], [5, 6, 7, 99, 99, 99]]
    assert rows.labels.tolist() == [[1, 2, 3, 4, IGNORE, IGNORE], [5, 6, 7, IGNORE, IGNORE, IGNORE]]
    assert rows.segment_ids.tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]


def test_shifted_targets_stop_at_boundaries():
    labels = torch.tensor([[10, 11, 12, 20, 21, 22, 23]])
    seg = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    assert shifted_targets(labels, 1, seg).tolist() == [[11, 12, IGNORE, 21, 22, 23, IGNORE]]
    assert shifted_targets(labels, 2, seg).tolist() == [[12, IGNORE, IGNORE, 22, 23, IGNORE, IGNORE]]
    assert shifted_targets(labels, 3, seg).tolist() == [[IGNORE, IGNORE, IGNORE, 23, IGNORE, IGNORE, IGNORE]]


def _packed_and_alone(lengths, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(3, 500, (n,), generator=g).tolist() for n in lengths]
    rows = pack_documents([Document(d) for d in docs], T)
    assert len(rows) == 1
    return docs, rows


@pytest.mark.parametrize("backend", ["reference", "blocked", "auto"])
def test_packed_row_equals_documents_alone(backend):
    """Logits of the main head and of every MTP layer in a packed row equal those of each document
    run alone (documents longer than two windows, so 'blocked'/'auto' take the banded path)."""
    torch.manual_seed(0)
    model = MiMoForCausalLM(MiMoConfig.preset("tiny")).eval().set_backends(attention=backend)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape) * 0.05)
        for m in model.modules():
            if getattr(m, "attention_sink_bias", None) is not None:
                m.attention_sink_bias.copy_(torch.randn(m.attention_sink_bias.shape))
    W = model.config.sliding_window
    docs, rows = _packed_and_alone([2 * W + 5, 3 * W + 1, W - 2, 2 * W + 7], T=10 * W)
    with torch.no_grad():
        packed = model(rows.input_ids, position_ids=rows.position_ids, segment_ids=rows.segment_ids, mtp=True)
        start = 0
        for d in docs:
            n = len(d)
            alone = model(torch.tensor([d]), mtp=True)
            torch.testing.assert_close(packed.logits[0, start:start + n], alone.logits[0], atol=1e-5, rtol=1e-5)
            for k, (lp, la) in enumerate(zip(packed.mtp_logits, alone.mtp_logits)):
                ok = n - (k + 1)  # positions whose MTP input token t + k + 1 lies in the document
                torch.testing.assert_close(lp[0, start:start + ok], la[0, :ok], atol=1e-5, rtol=1e-5)
            start += n
    # the padding after the documents changes nothing either
    assert start < rows.seq_len


def test_read_documents_text_jsonl_chat(tmp_path, tok):
    (tmp_path / "a.txt").write_text("The for statement is used.")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "The while statement."}) + "\n\n" + json.dumps(
        {"messages": [{"role": "user", "content": "What is for?"},
                      {"role": "assistant", "content": "A statement."}]}) + "\n")
    tok.chat_template = CHAT_TEMPLATE
    docs = list(read_documents([tmp_path], tok))
    assert len(docs) == 3
    assert docs[0].ids == tok.encode("The for statement is used.") + [tok.eos_id]
    assert docs[1].ids[-1] == tok.eos_id and docs[1].mask is None
    chat = docs[2]
    assert not chat.splittable
    trained = tok.decode([t for t, m in zip(chat.ids, chat.mask) if m], skip_special_tokens=False)
    assert trained == "A statement.<|im_end|>\n"
    assert "What is for?" in tok.decode(chat.ids) and "What" not in trained


def test_chat_render_matches_transformers(tok):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok.tokenizer.to_str()))
    fast.chat_template = CHAT_TEMPLATE
    tok.chat_template = CHAT_TEMPLATE
    for gen in (False, True):
        assert tok.render_chat(msgs, add_generation_prompt=gen) == \
            fast.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


def test_bad_data_names_the_line(tmp_path, tok):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        list(read_documents([f], tok))
    f.write_text(json.dumps({"content": "no text"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected a 'text'"):
        list(read_documents([f], tok))
    with pytest.raises(FileNotFoundError):
        list(read_documents([tmp_path / "missing.txt"], tok))


def test_row_sampler_is_a_deterministic_stream():
    a = RowSampler(5, seed=3)
    first = torch.cat([a.take(3) for _ in range(4)])  # 12 rows: two full epochs and a bit
    assert sorted(first[:5].tolist()) == list(range(5)) and sorted(first[5:10].tolist()) == list(range(5))
    b = RowSampler(5, seed=3)
    b.take(7)
    state = b.state_dict()
    c = RowSampler(5, seed=0)
    c.load_state_dict(state)
    assert c.take(5).tolist() == first[7:12].tolist()
