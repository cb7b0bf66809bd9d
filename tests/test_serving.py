"""The OpenAI-compatible server, live over HTTP, driven by the official `openai` client, on a tiny model."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch

from conftest import tiny_model
from mimo_flash.serving import OpenAIServer, Scheduler, start_in_thread
from mimo_flash.serving.requests import Event, QueueFull, Request
from mimo_flash.serving.detok import Detokenizer
from mimo_flash.serving.parsers import ReplyParser, parse_reply
from mimo_flash.serving.remote import EngineLink, RemoteScheduler
from serving_helpers import make_tokenizer


def over(sched, remote: bool):
    """What the OpenAIServer drives: the Scheduler itself, or (remote) a RemoteScheduler joined to it by a pipe
    through an EngineLink, as `serve` joins its two processes (here both ends in this process)."""
    if not remote:
        return sched, lambda: None
    ours, theirs = multiprocessing.Pipe()
    link = EngineLink(sched, ours).start()
    rs = RemoteScheduler(theirs, sched.S, sched.vocab_size)

    def close():
        theirs.close()
        ours.close()
        link.closed.wait(5)
    return rs, close


@pytest.fixture(scope="module", params=["in-process", "remote"])
def live(tmp_path_factory, request):
    tok = make_tokenizer(tmp_path_factory.mktemp("tok"))
    model = tiny_model(seed=7, vocab_size=tok.vocab_size)
    sched = Scheduler(model, tok, max_slots=4, max_context=256, prefill_chunk=16, prefix_blocks=16).start()
    front, close = over(sched, request.param == "remote")
    server = OpenAIServer(front, tok, "tiny", max_tokens_limit=240, body_timeout=1.0)
    http, url = start_in_thread(server)
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    yield {"url": url, "client": client, "model": model, "tok": tok, "sched": sched}
    http.should_exit = True
    close()
    sched.stop()


def greedy_alone(model, tok, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, eos_token_id=tok.eos_token_ids)
    new = out[0, len(ids):].tolist()
    eos = tok.eos_token_ids[0]
    return new[: new.index(eos) + 1] if eos in new else new


def shown(tok, ids):
    """The text a reply shows for ids: bytes that end inside a character at the very end are held back."""
    return tok.decode(ids).rstrip("\ufffd")


def log_softmax_forward(model, ids):
    """[T, V] log-probabilities of the model's own forward over ids."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), -1)


def raw(url, path, body: bytes | None = None, headers=None, method=None):
    req = urllib.request.Request(url + path, data=body, headers=headers or {"Content-Type": "application/json"},
                                 method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers.get("Content-Type"), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read().decode()


def test_models_health_metrics(live):
    c = live["client"]
    assert [m.id for m in c.models.list().data] == ["tiny"]
    assert json.loads(raw(live["url"], "/health")[2]) == {"status": "ok"}
    c.completions.create(model="tiny", prompt="hello", max_tokens=3, temperature=0)
    status, ctype, text = raw(live["url"], "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    lines = dict(l.rsplit(" ", 1) for l in text.splitlines() if l and not l.startswith("#"))
    assert float(lines["mimo_flash_generation_tokens_total"]) >= 3
    assert float(lines['mimo_flash_time_to_first_token_seconds_bucket{le="+Inf"}']) >= 1
    assert "mimo_flash_num_requests_waiting" in lines and "mimo_flash_time_per_output_token_seconds_sum" in lines
    # the scheduler thread's time per phase and its forwards: the request was prefilled once, then decoded
    phase = {p: float(lines[f'mimo_flash_scheduler_seconds_total{{phase="{p}"}}']) for p in ("admit", "prefill", "decode")}
    runs = {p: int(lines[f'mimo_flash_forwards_total{{phase="{p}"}}']) for p in ("prefill", "decode")}
    assert all(v > 0 for v in phase.values()) and runs["prefill"] >= 1 and runs["decode"] >= 2, (phase, runs)


def test_completion_is_greedy_generate_for_text_and_token_prompts(live):
    c, model, tok = live["client"], live["model"], live["tok"]
    ids = tok.encode("the quick brown")
    want = greedy_alone(model, tok, ids, 12)
    for prompt in ("the quick brown", ids):
        out = c.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        assert out.choices[0].text == shown(tok, want)
        assert out.choices[0].finish_reason == ("stop" if want[-1] in tok.eos_token_ids else "length")
        assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(want)
    two = c.completions.create(model="tiny", prompt=["hello world", "a stitch"], max_tokens=5, temperature=0)
    assert [ch.text for ch in two.choices] == [shown(tok, greedy_alone(model, tok, tok.encode(p), 5))
                                               for p in ("hello world", "a stitch")]


def test_concurrent_requests_equal_alone(live):
    c, model, tok = live["client"], live["model"], live["tok"]
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, tok.vocab_size, (n,), generator=g).tolist() for n in (2, 40, 7, 19, 33, 5, 12, 26)]
    lens = [9, 4, 20, 6, 11, 15, 3, 8]

    def one(i):
        if i % 3 == 2:  # a sampled neighbour
            c.completions.create(model="tiny", prompt=prompts[i], max_tokens=lens[i], temperature=0.8, seed=i)
            return None
        return c.completions.create(model="tiny", prompt=prompts[i], max_tokens=lens[i], temperature=0,
                                    logprobs=0).choices[0].logprobs.tokens

    with cf.ThreadPoolExecutor(8) as ex:
        got = list(ex.map(one, range(8)))
    for i, toks in enumerate(got):
        if toks is not None:
            assert toks == [live["tok"].decode([t], skip_special_tokens=False)
                            for t in greedy_alone(model, tok, prompts[i], lens[i])]


def test_chat_stream_assembles_the_same_text_with_usage(live):
    c = live["client"]
    msgs = [{"role": "user", "content": "hello world"}]
    whole = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
    assert whole.object == "chat.completion"
    chunks = list(c.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_max_completion_tokens_n_and_seed(live):
    c = live["client"]
    msgs = [{"role": "user", "content": "a stitch in time"}]
    out = c.chat.completions.create(model="tiny", messages=msgs, max_completion_tokens=6, temperature=0, n=3,
                                    extra_body={"ignore_eos": True})
    assert len(out.choices) == 3 and out.usage.completion_tokens == 18
    assert len({ch.message.content for ch in out.choices}) == 1  # greedy: all the same
    a = c.completions.create(model="tiny", prompt="hello", max_tokens=16, temperature=1.0, seed=5, n=2)
    b = c.completions.create(model="tiny", prompt="hello", max_tokens=16, temperature=1.0, seed=5, n=2)
    assert [x.text for x in a.choices] == [x.text for x in b.choices]
    assert a.choices[0].text != a.choices[1].text  # choice j samples with seed + j


def test_stop_string(live):
    c = live["client"]
    full = c.completions.create(model="tiny", prompt="hello", max_tokens=24, temperature=0,
                                extra_body={"ignore_eos": True}).choices[0].text
    assert len(full) > 4
    stop = full[2:4]
    cut = c.completions.create(model="tiny", prompt="hello", max_tokens=24, temperature=0, stop=[stop],
                               extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"


def test_logprobs_match_the_model_forward(live):
    c, model, tok = live["client"], live["model"], live["tok"]
    ids = tok.encode("all that glitters")
    out = c.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0, logprobs=3,
                               extra_body={"ignore_eos": True}).choices[0]
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                     temperature=0, logprobs=True, top_logprobs=2)
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in chat.choices[0].logprobs.content)
    gen = greedy_alone(model, tok, ids, 6)
    lsm = log_softmax_forward(model, ids + gen)
    want = [lsm[len(ids) - 1 + j, t].item() for j, t in enumerate(gen)]
    assert out.logprobs.token_logprobs == pytest.approx(want, abs=1e-4)
    for j, top in enumerate(out.logprobs.top_logprobs):
        best = lsm[len(ids) - 1 + j].topk(3).values.tolist()  # tokens that decode alike share one key
        assert max(top.values()) == pytest.approx(best[0], abs=1e-4)
        assert all(min(abs(v - b) for b in best) < 1e-4 for v in top.values())
    assert len(out.logprobs.tokens) == 6


def test_echo_prompt_logprobs_for_loglikelihood(live):
    """lm-eval's local-completions log-likelihood request: max_tokens 0, echo, logprobs 1."""
    c, model, tok = live["client"], live["model"], live["tok"]
    ids = tok.encode("a stitch in time saves nine")
    out = c.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
    ch = out.choices[0]
    assert ch.text == tok.decode(ids) and out.usage.completion_tokens == 0
    lsm = log_softmax_forward(model, ids)
    assert ch.logprobs.token_logprobs[0] is None and len(ch.logprobs.token_logprobs) == len(ids)
    want = [lsm[j - 1, ids[j]].item() for j in range(1, len(ids))]
    assert ch.logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    for j in range(1, len(ids)):  # the top entry is the argmax, as lm-eval's is_greedy check reads it
        assert max(ch.logprobs.top_logprobs[j].values()) == pytest.approx(lsm[j - 1].max().item(), abs=1e-4)
    assert ch.logprobs.text_offset == [sum(len(t) for t in ch.logprobs.tokens[:j]) for j in range(len(ids))]


def test_tools_reach_the_template_and_replies_are_parsed(live):
    c = live["client"]
    msgs = [{"role": "user", "content": "weather?"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    plain = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=1, temperature=0)
    with_tools = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=1, temperature=0, tools=tools)
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens  # the template rendered them
    r = parse_reply("<think>plan it</think>\nok <tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
                    "</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>", tools=True)
    assert r["reasoning_content"] == "plan it" and r["content"] == "ok"
    assert [(t["name"], json.loads(t["arguments"])) for t in r["tool_calls"]] == [
        ("get_weather", {"city": "Paris", "days": 3})]
    r = parse_reply('thinking...</think>hi<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>',
                    thinking=True, tools=True)
    assert (r["reasoning_content"], r["content"], json.loads(r["tool_calls"][0]["arguments"])) == (
        "thinking...", "hi", {"x": 1})
    assert parse_reply("<tool_call>not json</tool_call>", tools=True)["content"] == "<tool_call>not json</tool_call>"
    text = "<think>ab</think>cd<tool_call>{\"name\": \"g\", \"arguments\": {}}</tool_call>"
    p = ReplyParser(tools=True)
    deltas = [d for ch in text for d in p.feed(ch)] + p.finish()  # one character at a time
    assert "".join(v for k, v in deltas if k == "reasoning") == "ab"
    assert "".join(v for k, v in deltas if k == "content") == "cd"
    assert [v["name"] for k, v in deltas if k == "tool_call"] == ["g"]


def test_streamed_text_holds_back_incomplete_utf8(live):
    tok = live["tok"]
    ids = tok.encode("naïve café — 日本語 ünïcödé")
    assert any("\ufffd" in tok.decode([t]) for t in ids)  # some token ends inside a character
    d = Detokenizer(tok)
    pieces = [d.add([t]) for t in ids] + [d.finish()]
    assert not any("\ufffd" in p for p in pieces) and "".join(pieces) == tok.decode(ids)
    d = Detokenizer(tok)  # cut mid-character at the end: the dangling bytes are dropped, not shown as U+FFFD
    cut = next(j for j in range(1, len(ids)) if tok.decode(ids[:j]).endswith("\ufffd"))
    text = "".join(d.add([t]) for t in ids[:cut]) + d.finish()
    assert text == tok.decode(ids[:cut]).rstrip("\ufffd")


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/chat/completions", {"max_tokens": 3}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 99999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "temperature": 5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 241}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 250}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, 400,
     "tool_choice"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
])
def test_bad_requests_get_openai_errors(live, path, body, status, param):
    code, ctype, text = raw(live["url"], path, json.dumps(body).encode())
    err = json.loads(text)["error"]
    assert code == status and ctype == "application/json" and err["param"] == param
    assert param in err["message"] or param in ("messages", "prompt")


def test_malformed_http(live):
    url = live["url"]
    for body, needle in ((b"{oops", "not valid JSON"), (b'{"prompt": "hi", "temperature": NaN}', "NaN"),
                         (b"[1, 2]", "JSON object"), (b"\xff\xfe", "UTF-8")):
        code, ctype, text = raw(url, "/v1/completions", body)
        assert code == 400 and ctype == "application/json" and needle in json.loads(text)["error"]["message"]
    code, _, text = raw(url, "/v1/completions", b'{"prompt": "hi", "temperature": 1e999}')  # parses as inf
    assert code == 400 and json.loads(text)["error"]["param"] == "temperature"
    code, _, text = raw(url, "/v1/nothing", b"{}")
    assert code == 404 and json.loads(text)["error"]["type"] == "not_found_error"
    code, _, text = raw(url, "/v1/completions", method="GET")
    assert code == 405 and "error" in json.loads(text)
    host, port = url.removeprefix("http://").split(":")

    def exchange(data: bytes) -> bytes:
        """Send raw bytes; read one response (headers and a Content-Length body)."""
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(data)
            got = b""
            while b"\r\n\r\n" not in got:
                got += s.recv(65536)
            head_, _, rest = got.partition(b"\r\n\r\n")
            n = int(next(l.split(b":")[1] for l in head_.split(b"\r\n") if l.lower().startswith(b"content-length")))
            while len(rest) < n:
                rest += s.recv(65536)
            return head_ + b"\r\n\r\n" + rest
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    huge = exchange((head + "Content-Length: 1000000000000\r\n\r\n{").encode())
    assert huge.startswith(b"HTTP/1.1 413") and b'"error"' in huge
    t0 = time.time()
    short = exchange((head + "Content-Length: 100\r\n\r\n{\"prompt\"").encode())  # the rest never comes
    assert short.startswith(b"HTTP/1.1 408") and b'"error"' in short and time.time() - t0 < 10
    for bad in (b"GARBAGE\r\n\r\n", (head + "Content-Length: -5\r\n\r\n").encode(),
                (head + "Content-Length: 12abc\r\n\r\n").encode()):
        got = exchange(bad)
        assert got.startswith(b"HTTP/1.1 400") and b"application/json" in got and b'"invalid_request_error"' in got
    body = b'{"prompt": "hi", "max_tokens": 2, "temperature": 0}'
    chunked = exchange((head + "Transfer-Encoding: chunked\r\n\r\n").encode() + b"%x\r\n" % len(body) + body
                       + b"\r\n0\r\n\r\n")
    assert chunked.startswith(b"HTTP/1.1 200") and b"text_completion" in chunked


def test_cancelled_stream_frees_its_slot(live):
    c, sched = live["client"], live["sched"]
    before = sched.metrics.requests["cancelled"]
    stream = c.completions.create(model="tiny", prompt="hello", max_tokens=230, temperature=0, stream=True,
                                  extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    deadline = time.time() + 20
    while (sched.running() or sched.metrics.requests["cancelled"] == before) and time.time() < deadline:
        time.sleep(0.02)
    assert sched.running() == 0 and sched.metrics.requests["cancelled"] == before + 1
    assert sched.metrics.generation_tokens < 10_000


@pytest.mark.parametrize("remote", [False, True])
def test_timeout_cancels_and_full_queue_answers_429(live, remote):
    sched = Scheduler(live["model"], live["tok"], max_slots=1, max_context=64, max_queue=1)  # not started: no step
    front, close = over(sched, remote)
    http, url = start_in_thread(OpenAIServer(front, live["tok"], "tiny", request_timeout=0.5))
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.APIStatusError, match="longer than 0.5 s") as e:
            client.completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert e.value.status_code == 408
        deadline = time.time() + 5  # (remote: the cancel crosses the pipe)
        while not sched.waiting[0].cancelled and time.time() < deadline:
            time.sleep(0.01)
        assert len(sched.waiting) == 1 and sched.waiting[0].cancelled  # dropped at the next step
        with pytest.raises(openai.RateLimitError, match="at capacity"):
            client.completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert sched.metrics.rejected == 1
        if remote:  # what the model's side refuses comes back as the Scheduler's own error
            with pytest.raises(ValueError, match="prompt token ids must be in"):
                asyncio.run(front.asubmit(Request([5, 10_000], 2)))
            with pytest.raises(QueueFull, match="at capacity"):
                asyncio.run(front.asubmit(Request([5], 2)))
    finally:
        http.should_exit = True
        close()


def test_requests_die_with_the_models_process(live):
    """Remote: when the model's end of the pipe goes away (its process ended), a stream in flight ends with an
    error chunk and the HTTP side's on_close runs (in `serve` it stops uvicorn); when the HTTP end goes away, the
    EngineLink cancels what it had submitted. (The model's end is played by hand here: a pipe end that a thread of
    this process reads cannot be closed under it.)"""
    ours, theirs = multiprocessing.Pipe()
    closed = threading.Event()
    rs = RemoteScheduler(theirs, 64, live["tok"].vocab_size, on_close=closed.set)
    http, url = start_in_thread(OpenAIServer(rs, live["tok"], "tiny"))
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
        with cf.ThreadPoolExecutor(1) as ex:
            fut = ex.submit(lambda: list(client.completions.create(model="tiny", prompt="hi", max_tokens=5,
                                                                   stream=True)))
            assert ours.poll(10)
            kind, rid, fields = ours.recv()
            assert kind == "submit" and fields["max_tokens"] == 5 and fields["prompt"]
            ours.send(("ack", rid, None))
            ours.send(("events", [(rid, Event([7], "x"))]))
            time.sleep(0.2)
            ours.close()
            with pytest.raises(openai.APIError, match="the model's process exited"):
                fut.result(30)
        assert closed.wait(5) and rs.reqs == {}
    finally:
        http.should_exit = True

    sched = Scheduler(live["model"], live["tok"], max_slots=1, max_context=64)  # not started: nothing runs
    ours, theirs = multiprocessing.Pipe()
    link = EngineLink(sched, ours).start()
    theirs.send(("submit", 0, {"prompt": [5, 6], "max_tokens": 2}))
    deadline = time.time() + 5
    while not sched.waiting and time.time() < deadline:
        time.sleep(0.01)
    assert theirs.recv() == ("ack", 0, None)
    theirs.close()  # the HTTP process ended
    assert link.closed.wait(5) and sched.waiting[0].cancelled


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"), reason="needs Linux /proc")
def test_serve_runs_the_http_side_in_its_own_process(tmp_path):
    """`mimo-flash serve`: the model's process spawns the HTTP process; a completion through it is greedy
    generate()'s; SIGTERM to the model's process ends both; a port that is taken ends `serve` with an error."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    tok = make_tokenizer(ckpt)
    model = tiny_model(seed=7, vocab_size=tok.vocab_size)
    model.save_pretrained(ckpt)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "mimo_flash.cli", "serve", "--model", str(ckpt), "--device", "cpu",
           "--port", str(port), "--max-context", "128", "--name", "tiny"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=30)
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert time.time() < deadline, "serve did not answer within 120 s"
                time.sleep(0.3)
        kids = _children(proc.pid)  # the HTTP process (and multiprocessing's resource tracker)
        assert sum("spawn_main" in open(f"/proc/{k}/cmdline").read() for k in kids) == 1
        ids = tok.encode("hello world")
        r = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
        assert r.choices[0].text == shown(tok, greedy_alone(model, tok, ids, 8))
        with socket.socket() as s:  # the same port again: uvicorn cannot bind, `serve` says so and fails
            busy = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert busy.returncode == 1 and "address already in use" in (busy.stdout + busy.stderr).lower()
        proc.terminate()
        code = proc.wait(30)
        assert code == 128 + signal.SIGTERM, (code, proc.stdout.read()[-3000:])  # (its output says why, if not)
        deadline = time.time() + 10
        while any(map(_alive, kids)) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(map(_alive, kids))  # none left behind
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_command_names_a_bad_model_dir(tmp_path, capsys):
    from mimo_flash.cli import main

    assert main(["serve", "--model", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_serve_threads(tmp_path, capsys, monkeypatch):
    from mimo_flash.cli import main
    from mimo_flash.serving.commands import cpu_threads

    assert main(["serve", "--model", str(tmp_path), "--threads", "0"]) == 2
    assert "--threads must be >= 1, got 0" in capsys.readouterr().err
    assert cpu_threads(3) == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert cpu_threads(None) == 1  # one core left to the HTTP side
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    assert cpu_threads(None) == 1


def test_merge_events_joins_a_requests_piled_up_events_in_order():
    from mimo_flash.serving.api import merge_events
    from mimo_flash.serving.requests import Event

    items = [(0, Event([5], "a", prompt_logprobs=[None])), (0, Event([6], "b")), (1, Event([7], "c", [(-1.0, [])])),
             (1, Event([8], "d", [(-2.0, [])], finish="stop", completion_tokens=2)), (1, Event([], "", finish=None)),
             (0, Event([9], "e", finish="length", completion_tokens=3))]
    out = merge_events(items)
    assert [i for i, _ in out] == [0, 1, 1, 0]  # nothing joins across another index or past a finish
    (_, a), (_, b), (_, c), (_, d) = out
    assert (a.token_ids, a.text, a.prompt_logprobs, a.logprobs, a.finish) == ([5, 6], "ab", [None], None, None)
    assert (b.token_ids, b.text, b.logprobs, b.finish, b.completion_tokens) == \
        ([7, 8], "cd", [(-1.0, []), (-2.0, [])], "stop", 2)
    assert c.token_ids == [] and d.token_ids == [9] and d.finish == "length"
