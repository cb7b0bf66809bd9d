"""Tokenizer, chat template, streaming with stop strings, and the generate / chat / kv-cache commands."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch

from conftest import tiny_model
from mimo_flash.cli import main
from mimo_flash.generation import engine, generate
from mimo_flash.generation.streamer import StopStrings, TextStreamer
from mimo_flash.options import options, override
from mimo_flash.tokenizer import Tokenizer

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SPECIAL = ["<unk>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]


def write_tokenizer(d, vocab_size=512, template=CHATML, eos="<|endoftext|>"):
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Tok
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {t: i for i, t in enumerate(SPECIAL)}
    for i in range(vocab_size - len(SPECIAL)):
        vocab[f"w{i}"] = len(vocab)
    tok = Tok(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL])
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": "<unk>",
           "bos_token": None}
    if template is not None:
        cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    model = tiny_model()
    model.save_pretrained(d)
    write_tokenizer(d)
    return d


def run_cli(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


# ---------------------------------------------------------------------------- tokenizer / template
def test_tokenizer_and_chat_template(tmp_path):
    d = write_tokenizer(tmp_path / "tok")
    tok = Tokenizer(d)
    assert tok.encode("w1 w2 w3") == [5, 6, 7]
    assert tok.decode([5, 6, 2]) == "w1 w2"  # special tokens skipped
    assert tok.eos_token_ids == [3] and tok.pad_token_id == 0
    msgs = [{"role": "system", "content": "w9"}, {"role": "user", "content": "w1 w2"}]
    text = tok.apply_chat_template(msgs)
    assert text == "<|im_start|>system\nw9<|im_end|>\n<|im_start|>user\nw1 w2<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode(text)[:3] == [1, 0, 13]  # <|im_start|> system(<unk>) w9
    tr = pytest.importorskip("transformers")
    try:
        ref = tr.AutoTokenizer.from_pretrained(str(d))
    except Exception as e:  # pragma: no cover - transformers' own loading quirks
        pytest.skip(f"transformers cannot load the test tokenizer: {e}")
    assert ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == text
    assert ref.encode("w1 w2 w3", add_special_tokens=False) == tok.encode("w1 w2 w3")


def test_chat_template_fallbacks_and_errors(tmp_path):
    tok = Tokenizer(write_tokenizer(tmp_path / "a", template=None))
    assert tok.apply_chat_template([{"role": "user", "content": "w1"}]) == \
        "<|im_start|>user\nw1<|im_end|>\n<|im_start|>assistant\n"  # ChatML from the vocabulary
    (tmp_path / "a" / "chat_template.jinja").write_text("{{ raise_exception('no system role') }}")
    with pytest.raises(ValueError, match="no system role"):
        Tokenizer(tmp_path / "a").apply_chat_template([{"role": "user", "content": "w1"}])
    with pytest.raises(ValueError, match="role"):
        tok.apply_chat_template([{"content": "w1"}])
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer(tmp_path)


def test_text_streamer_stop_strings(tmp_path):
    tok = Tokenizer(write_tokenizer(tmp_path / "t"))
    got = []
    s = TextStreamer(tok, write=got.append, stop_strings=["w7 w8"])
    for t in tok.encode("w1 w2 w7 w3 w7 w8 w9"):
        s.put([t])
    s.end()
    assert "".join(got) == "w1 w2 w7 w3 " and s.stopped and s.text == "w1 w2 w7 w3 "
    # a partial match is held back, then released when it does not complete
    got.clear()
    s = TextStreamer(tok, write=got.append, stop_strings=["w7 w8"])
    s.put(tok.encode("w1 w7"))
    assert "".join(got) == "w1 "
    s.put(tok.encode("w2"))
    s.end()
    assert "".join(got) == "w1 w7 w2" and not s.stopped
    assert StopStrings(tok, ["w3"])([tok.encode("w1 w3"), tok.encode("w1")]) == [True, False]


# ---------------------------------------------------------------------------- commands
def test_generate_command_streams_the_greedy_text(ckpt, capsys):
    tok = Tokenizer(ckpt)
    model = tiny_model()
    ids = tok.encode("w1 w2 w3 w4")
    ref = generate(model, torch.tensor([ids]), max_new_tokens=8, eos_token_id=tok.eos_token_ids, pad_token_id=0)
    text = tok.decode(ref[0, len(ids):].tolist())
    rc, out, err = run_cli(["generate", "--model", str(ckpt), "--prompt", "w1 w2 w3 w4", "--max-new-tokens", "8",
                            "--device", "cpu"], capsys)
    assert rc == 0, err
    assert out == text + "\n"
    rc, out2, err = run_cli(["generate", "--model", str(ckpt), "--prompt", "w1 w2 w3 w4", "--max-new-tokens", "8",
                             "--device", "cpu", "--speculative", "2"], capsys)
    assert rc == 0 and out2 == out and "acceptance length" in err
    rc, out2, err = run_cli(["generate", "--model", str(ckpt), "--prompt", "w1 w2 w3 w4", "--max-new-tokens", "8",
                             "--device", "cpu", "--speculative", "auto"], capsys)
    assert rc == 0 and out2 == out and "speculative auto" in err
    # --decode-experts and --cache-attention set the options before the model runs (override(): restored after this test); the text is the
    # same (this CPU run decodes eagerly: the option's paths are tested in test_generation_decode.py)
    with override():
        rc, out2, err = run_cli(["generate", "--model", str(ckpt), "--prompt", "w1 w2 w3 w4", "--max-new-tokens",
                                 "8", "--device", "cpu", "--decode-experts", "grouped_mm", "--cache-attention", "triton"],
                                capsys)
        assert rc == 0 and out2 == out
        assert (options().decode_experts, options().cache_attention) == ("grouped_mm", "triton")
    assert (options().decode_experts, options().cache_attention) == ("routed", "auto")
    # a stop string cuts the text and ends generation
    words = text.split(" ")
    stop = words[3]
    expected = text[: text.find(stop)]
    rc, out3, _ = run_cli(["generate", "--model", str(ckpt), "--prompt", "w1 w2 w3 w4", "--max-new-tokens", "8",
                           "--device", "cpu", "--stop", stop], capsys)
    assert rc == 0 and out3 == expected + "\n"
    rc, out4, err = run_cli(["generate", "--model", str(ckpt), "--prompt", "w1 w2", "--max-new-tokens", "4",
                             "--device", "cpu", "--temperature", "0.9", "--top-p", "0.9", "--seed", "1",
                             "--chat-template"], capsys)
    assert rc == 0, err


def test_chat_command_multi_turn(ckpt, capsys, monkeypatch):
    prompts = []
    real = engine.generate

    def spy(model, input_ids, **kw):
        prompts.append(input_ids[0].tolist())
        return real(model, input_ids, **kw)

    monkeypatch.setattr(engine, "generate", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("w1 w2\n\nw3\n/exit\n"))
    rc, out, err = run_cli(["chat", "--model", str(ckpt), "--max-new-tokens", "5", "--device", "cpu",
                            "--system", "w9"], capsys)
    assert rc == 0, err
    tok = Tokenizer(ckpt)
    assert len(prompts) == 2
    first_reply = out.split("\n")[0]
    second = tok.decode(prompts[1], skip_special_tokens=False)
    assert second.startswith("<|im_start|> <unk> w9 <|im_end|>")  # roles are <unk> in this word-level vocabulary
    assert first_reply.strip() in second and second.count("<|im_start|>") == 5  # sys, user, assistant, user, gen
    assert prompts[1][: len(prompts[0])] == prompts[0]


def test_kv_cache_command(capsys):
    rc, out, _ = run_cli(["kv-cache", "--preset", "flash"], capsys)
    assert rc == 0 and "262144" in out and "all-global" in out and "9.6x" in out


def test_command_errors(ckpt, tmp_path, capsys):
    (tmp_path / "notok").mkdir()
    tiny_model().save_pretrained(tmp_path / "notok")
    short = tmp_path / "short"
    tiny_model(max_position_embeddings=16).save_pretrained(short)
    write_tokenizer(short)
    base = ["generate", "--model", str(ckpt), "--prompt", "w1 w2", "--device", "cpu"]
    cases = [
        (["generate", "--model", str(tmp_path / "nope"), "--prompt", "w1"], "does not exist"),
        (["generate", "--model", str(tmp_path / "notok"), "--prompt", "w1"], "no tokenizer.json"),
        (["generate", "--model", str(ckpt), "--prompt", "", "--device", "cpu"], "empty prompt"),
        (base[:-1] + ["tpu"], "device"),
        (base + ["--dtype", "int8"], "unknown dtype"),
        (base + ["--temperature", "-1"], "temperature"),
        (base + ["--temperature", "1", "--top-p", "1.5"], "top_p"),
        (base + ["--speculative", "9"], "MTP layers"),
        (base + ["--speculative", "most"], "integer >= 0 or 'auto'"),
        (base + ["--max-new-tokens", "0"], "max-new-tokens"),
        (["generate", "--model", str(short), "--prompt", " ".join(["w1"] * 20), "--device", "cpu"],
         "longer than the model's max_position_embeddings"),
    ]
    if not torch.cuda.is_available():
        cases.append((base[:-1] + ["cuda"], "CUDA is not available"))
    for argv, msg in cases:
        rc, _, err = run_cli(argv, capsys)
        assert rc == 2 and msg in err, (argv, err)
