"""The OpenAI-compatible server, over HTTP, on a tiny model with a real BPE tokenizer."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest
import torch

from conftest import tiny_model
from mimo_flash.serving import Engine, make_server
from mimo_flash.tokenizer import Tokenizer

CORPUS = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine",
          "all that glitters is not gold", "hello world, hello model"] * 20
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tokenizers import Tokenizer as Tok, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("tok")
    tok = Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": CHATML}))
    tokenizer = Tokenizer(d)
    model = tiny_model(seed=7, vocab_size=tokenizer.vocab_size)
    engine = Engine(model, tokenizer, "tiny")
    srv = make_server(engine, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", engine
    srv.shutdown()
    srv.server_close()


def post(url, body, raw=None):
    req = urllib.request.Request(url, data=raw if raw is not None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.headers.get("Content-Type"), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read().decode()


def events(text):
    lines = [l[len("data: "):] for l in text.split("\n\n") if l.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(l) for l in lines[:-1]]


def test_models_and_health(server):
    url, _ = server
    with urllib.request.urlopen(url + "/v1/models") as r:
        assert [m["id"] for m in json.loads(r.read())["data"]] == ["tiny"]
    with urllib.request.urlopen(url + "/health") as r:
        assert json.loads(r.read()) == {"status": "ok"}


def test_completion_is_greedy_generate(server):
    url, engine = server
    status, _, text = post(url + "/v1/completions", {"model": "tiny", "prompt": "the quick brown", "max_tokens": 12,
                                                     "temperature": 0})
    assert status == 200
    out = json.loads(text)
    ids = engine.tok.encode("the quick brown")
    want = engine.model.generate(torch.tensor([ids]), max_new_tokens=12, eos_token_id=engine.tok.eos_token_ids)
    new = want[0, len(ids):].tolist()
    eos = engine.tok.eos_token_ids[0]
    n = new.index(eos) + 1 if eos in new else len(new)
    choice = out["choices"][0]
    assert choice["text"] == engine.tok.decode(new[:n])
    assert choice["finish_reason"] == ("stop" if eos in new else "length")
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}


def test_chat_stream_assembles_the_same_text(server):
    url, _ = server
    body = {"messages": [{"role": "user", "content": "hello world"}], "max_tokens": 10, "temperature": 0}
    status, _, text = post(url + "/v1/chat/completions", body)
    whole = json.loads(text)
    assert status == 200 and whole["object"] == "chat.completion"
    status, ctype, text = post(url + "/v1/chat/completions", {**body, "stream": True})
    assert status == 200 and ctype == "text/event-stream"
    chunks = events(text)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == whole["usage"]


def test_stop_string_and_sampling_seed(server):
    url, _ = server
    base = {"prompt": "hello", "max_tokens": 24, "temperature": 0}
    full = json.loads(post(url + "/v1/completions", base)[2])["choices"][0]["text"]
    if len(full) > 3:
        stop = full[2:4]
        cut = json.loads(post(url + "/v1/completions", {**base, "stop": stop})[2])["choices"][0]
        assert cut["text"] == full[: full.index(stop)] and cut["finish_reason"] == "stop"
    a = post(url + "/v1/completions", {**base, "temperature": 0.9, "seed": 3})[2]
    b = post(url + "/v1/completions", {**base, "temperature": 0.9, "seed": 3})[2]
    assert json.loads(a)["choices"] == json.loads(b)["choices"]


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"max_tokens": 3}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "temperature": 5}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "n": 2}, "n"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, "model"),
    ("/v1/completions", {"prompt": "hi", "num_speculative_tokens": 9}, "num_speculative_tokens"),
])
def test_bad_requests_get_openai_errors(server, path, body, param):
    url, _ = server
    status, _, text = post(url + path, body)
    err = json.loads(text)["error"]
    assert status == 400 and err["type"] == "invalid_request_error" and err["param"] == param
    assert param in err["message"] or param == "messages" or param == "prompt"


def test_malformed_and_unknown(server):
    url, _ = server
    status, _, text = post(url + "/v1/completions", None, raw=b"{oops")
    assert status == 400 and "not valid JSON" in json.loads(text)["error"]["message"]
    status, _, text = post(url + "/v1/nothing", {})
    assert status == 404


def test_serve_command_names_a_bad_model_dir(tmp_path, capsys):
    from mimo_flash.cli import main

    assert main(["serve", "--model", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
