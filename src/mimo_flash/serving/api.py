"""The OpenAI-compatible HTTP API (FastAPI on uvicorn) over the continuous-batching Scheduler.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with server-sent-event streams),
GET /v1/models, /health, /metrics (Prometheus text). Each choice of a request is one scheduler Request; the
scheduler thread (under `serve`, the pipe's reader thread: the scheduler runs in the model's process,
serving/remote.py) hands events to the event loop (call_soon_threadsafe) and the handler turns them into
OpenAI objects. A client that disconnects, or a request past --request-timeout, cancels its Requests at
the scheduler's next step. Every error is OpenAI's error object: {"error": {"message", "type", "param",
"code"}}: 400 for a bad request (naming the field), 404 unknown model or route, 408 a body that does not
arrive in time, 413 a body too large, 429 a full queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import socket
import threading
import time
import uuid
import weakref

import h11
import uvicorn
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from . import protocol as proto
from .parsers import ReplyParser, parse_reply
from .protocol import RequestError
from .requests import Event, QueueFull, Request
from .scheduler import Scheduler


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status)


def merge_events(items: list[tuple[int, Event]]) -> list[tuple[int, Event]]:
    """Queued (index, Event)s with consecutive events of one index joined into one: when the response falls
    behind the scheduler (many streams at once), it sends one chunk for the tokens that piled up instead of
    one per token, so its per-chunk cost does not hold back the steps. Order and content are kept."""
    out: list[tuple[int, Event]] = []
    for i, e in items:
        if out and out[-1][0] == i and out[-1][1].finish is None:
            a = out[-1][1]
            lps = None if a.logprobs is None and e.logprobs is None else (a.logprobs or []) + (e.logprobs or [])
            e = dataclasses.replace(e, token_ids=a.token_ids + e.token_ids, text=a.text + e.text, logprobs=lps,
                                    prompt_logprobs=a.prompt_logprobs if e.prompt_logprobs is None
                                    else e.prompt_logprobs)
            out[-1] = (i, e)
        else:
            out.append((i, e))
    return out


class _Bridge:
    """Carries events from the scheduler thread into one event loop: the first event of a burst wakes the
    loop (call_soon_threadsafe, a syscall); the rest of the step's events, of every request, ride along."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.lock, self.items = loop, threading.Lock(), []

    def put(self, q: asyncio.Queue, item) -> None:
        with self.lock:
            self.items.append((q, item))
            wake = len(self.items) == 1  # otherwise a drain is already scheduled and will take it
        if wake:
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        for q, item in items:
            q.put_nowait(item)


class OpenAIServer:
    """The request handling behind the routes. scheduler: the Scheduler (same process) or a RemoteScheduler
    (serving/remote.py: the model in another process); max_tokens_limit: largest max_tokens a request may ask;
    request_timeout: seconds a request may run; max_body / body_timeout: request body bytes and seconds."""

    def __init__(self, scheduler: Scheduler, tokenizer, name: str, max_tokens_limit: int = 4096,
                 request_timeout: float = 600.0, max_body: int = 8 << 20, body_timeout: float = 30.0) -> None:
        self.sched, self.tok, self.name = scheduler, tokenizer, name
        self.limit, self.request_timeout = max_tokens_limit, request_timeout
        self.max_body, self.body_timeout = max_body, body_timeout
        self.vocab = scheduler.vocab_size
        self.eos = tuple(tokenizer.eos_token_ids or [])
        self.created = int(time.time())
        self._tokstr: dict[int, str] = {}
        self._bridges: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> _Bridge

    # ------------------------------------------------------------------ plumbing
    async def body(self, http: HTTPRequest) -> dict:
        cl = http.headers.get("content-length")
        if cl is not None and cl.isdigit() and int(cl) > self.max_body:
            raise RequestError(f"the request body is larger than this server's limit of {self.max_body} bytes",
                               status=413)
        chunks, size = [], 0

        async def read():
            nonlocal size
            async for c in http.stream():
                size += len(c)
                if size > self.max_body:
                    raise RequestError(f"the request body is larger than {self.max_body} bytes", status=413)
                chunks.append(c)
        try:
            await asyncio.wait_for(read(), self.body_timeout)
        except asyncio.TimeoutError:
            raise RequestError(f"the request body did not arrive within {self.body_timeout:g} s", status=408,
                               kind="timeout_error") from None
        return proto.parse_json(b"".join(chunks))

    def token_str(self, t: int) -> str:
        s = self._tokstr.get(t)
        if s is None:
            s = self._tokstr[t] = self.tok.decode([t], skip_special_tokens=False)
        return s

    def make_requests(self, ids: list[int], st: proto.Settings, max_tokens: int, prompt_logprobs: bool = False):
        try:
            self.sched.check(len(ids), max_tokens)
        except ValueError as e:
            raise RequestError(str(e), "max_tokens") from None
        return [Request(ids, max_tokens, st.params, seed=None if st.seed is None else st.seed + j, stop=st.stop,
                        eos=() if st.ignore_eos else self.eos, logprobs=st.logprobs,
                        prompt_logprobs=prompt_logprobs) for j in range(st.n)]

    async def events(self, reqs: list[Request], http: HTTPRequest | None):
        """Submit reqs; yield (index, Event) until all finish. http: poll it for a disconnect (non-streamed
        responses; a stream's disconnect cancels this generator). Leaving early cancels what is left."""
        loop = asyncio.get_running_loop()
        bridge = self._bridges.get(loop)
        if bridge is None:
            bridge = self._bridges[loop] = _Bridge(loop)
        q: asyncio.Queue = asyncio.Queue()
        for i, r in enumerate(reqs):
            r.sink = lambda e, i=i: bridge.put(q, (i, e))
        try:
            for r in reqs:
                await self.sched.asubmit(r)
        except QueueFull as e:
            for r in reqs:
                r.cancel()
            raise RequestError(str(e), status=429, kind="rate_limit_error") from None
        except ValueError as e:
            raise RequestError(str(e), "prompt") from None
        pending = len(reqs)
        deadline = loop.time() + self.request_timeout
        try:
            while pending:
                left = deadline - loop.time()
                if left <= 0:
                    raise RequestError(f"the request ran longer than {self.request_timeout:g} s", status=408,
                                       kind="timeout_error")
                try:  # (wait_for makes a task per call: only when there is nothing to take)
                    items = [q.get_nowait() if not q.empty() else await asyncio.wait_for(q.get(), min(0.25, left))]
                except asyncio.TimeoutError:
                    if http is not None and await http.is_disconnected():
                        return
                    continue
                while not q.empty():
                    items.append(q.get_nowait())
                for i, e in merge_events(items):
                    if e.finish is not None:
                        pending -= 1
                        if e.finish == "error":
                            raise RequestError(f"generation failed: {e.error}", status=500, kind="server_error")
                    yield i, e
        finally:
            for r in reqs:
                r.cancel()

    def sse(self, chunks):
        async def gen():
            try:
                async for c in chunks:
                    yield f"data: {json.dumps(c, ensure_ascii=False)}\n\n"
            except RequestError as e:
                err = {"message": str(e), "type": e.kind, "param": e.param, "code": e.status}
                yield f"data: {json.dumps({'error': err})}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(gen(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def collect(self, reqs: list[Request], http: HTTPRequest, n: int, prefix=None):
        """A non-streamed response's events gathered per choice. reqs: n choices per prompt, prompt by prompt;
        prefix(i, first event of choice i) -> (text, tokens, logprobs) that choice i starts with (the echoed
        prompt). -> ([{"text", "tokens", "lps", "finish"} per choice], usage [prompt, completion, cached]
        tokens, each prompt counted once), or None when the client went away before every choice finished."""
        acc = [None] * len(reqs)
        usage = [0, 0, 0]
        async for i, e in self.events(reqs, http):
            if acc[i] is None:
                text, tokens, lps = prefix(i, e) if prefix is not None else ("", [], [])
                acc[i] = {"text": text, "tokens": list(tokens), "lps": list(lps), "finish": None}
            a = acc[i]
            a["text"] += e.text
            a["tokens"] += e.token_ids
            a["lps"] += e.logprobs or []
            if e.finish is not None:
                a["finish"] = e.finish
                usage[1] += e.completion_tokens
                if i % n == 0:
                    usage[0] += e.prompt_tokens
                    usage[2] += e.cached_tokens
        if any(a is None or a["finish"] is None for a in acc):
            return None
        return acc, usage

    @staticmethod
    def usage(prompt: int, completion: int, cached: int = 0) -> dict:
        u = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        if cached:
            u["prompt_tokens_details"] = {"cached_tokens": cached}
        return u

    # ------------------------------------------------------------------ /v1/completions
    def completion_logprobs(self, tokens: list[int], lps: list, offset: int) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, lp in zip(tokens, lps, strict=True):
            s = self.token_str(t)
            out["tokens"].append(s)
            out["text_offset"].append(offset)
            offset += len(s)
            out["token_logprobs"].append(None if lp is None else lp[0])
            out["top_logprobs"].append(None if lp is None else
                                       {**{self.token_str(a): b for a, b in lp[1]}, s: lp[0]})
        return out

    async def completions(self, http: HTTPRequest):
        body = await self.body(http)
        proto.check_fields(body, proto.COMPLETION_FIELDS)
        st = proto.common(body, self.name, chat=False, limit=self.limit)
        echo = proto.flag(body, "echo")
        texts = body["prompt"] if isinstance(body.get("prompt"), list) else [body.get("prompt")]
        prompts = proto.prompts(body, self.tok, self.vocab)
        max_tokens = 16 if st.max_tokens is None else st.max_tokens
        reqs = [r for ids in prompts for r in self.make_requests(ids, st, max_tokens, echo and st.logprobs is not None)]
        echo_text = [t if isinstance(t, str) else self.tok.decode(ids) for t, ids in
                     zip(texts if all(isinstance(t, str) for t in texts) else [None] * len(prompts), prompts,
                         strict=True)]
        rid = f"cmpl-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.name}
        n = st.n

        def prompt_part(i, e):
            """Echo: the prompt's text, tokens and logprobs before choice i's first output."""
            p = prompts[i // n]
            if not echo:
                return "", [], []
            return echo_text[i // n], p, (e.prompt_logprobs or [None] * len(p))

        if st.stream:
            async def chunks():
                started = set()
                usage = [0, 0]
                async for i, e in self.events(reqs, None):
                    text, toks, lps = "", e.token_ids, e.logprobs or []
                    if i not in started:
                        started.add(i)
                        ptext, ptoks, plps = prompt_part(i, e)
                        text, toks, lps = ptext, ptoks + toks, list(plps) + lps
                    text += e.text
                    choice = {"index": i, "text": text, "logprobs": None, "finish_reason": e.finish}
                    if st.logprobs is not None:
                        choice["logprobs"] = self.completion_logprobs(toks, lps[:len(toks)], 0)
                    if e.finish is not None:
                        usage[1] += e.completion_tokens
                        if i % n == 0:
                            usage[0] += e.prompt_tokens
                    if text or e.finish is not None or st.logprobs is not None:
                        yield {**head, "choices": [choice]}
                if st.include_usage:
                    yield {**head, "choices": [], "usage": self.usage(*usage)}
            return self.sse(chunks())

        got = await self.collect(reqs, http, n, prompt_part)
        if got is None:  # the client went away
            return None
        acc, usage = got
        choices = []
        for i, a in enumerate(acc):
            lp = self.completion_logprobs(a["tokens"], a["lps"], 0) if st.logprobs is not None else None
            choices.append({"index": i, "text": a["text"], "logprobs": lp, "finish_reason": a["finish"]})
        return {**head, "choices": choices, "usage": self.usage(*usage)}

    # ------------------------------------------------------------------ /v1/chat/completions
    def chat_logprobs(self, tokens: list[int], lps: list) -> list[dict]:
        out = []
        for t, (lp, top) in zip(tokens, lps, strict=True):
            s = self.token_str(t)
            out.append({"token": s, "logprob": lp, "bytes": list(s.encode()),
                        "top_logprobs": [{"token": self.token_str(a), "logprob": b,
                                          "bytes": list(self.token_str(a).encode())} for a, b in top]})
        return out

    async def chat(self, http: HTTPRequest):
        body = await self.body(http)
        proto.check_fields(body, proto.CHAT_FIELDS)
        st = proto.common(body, self.name, chat=True, limit=self.limit)
        msgs = proto.messages(body)
        tools = proto.tools(body)
        kw = body.get("chat_template_kwargs") or {}
        if not isinstance(kw, dict):
            raise RequestError("'chat_template_kwargs' must be an object", "chat_template_kwargs")
        try:
            text = self.tok.apply_chat_template(msgs, add_generation_prompt=True, tools=tools, **kw)
        except (ValueError, TypeError) as e:
            raise RequestError(f"the chat template failed: {e}", "messages") from None
        ids = self.tok.encode(text)
        thinking = text.rstrip().endswith("<think>")
        max_tokens = st.max_tokens if st.max_tokens is not None else max(1, min(self.limit, self.sched.S - len(ids)))
        reqs = self.make_requests(ids, st, max_tokens)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": self.name}

        if st.stream:
            chunk = {**head, "object": "chat.completion.chunk"}

            async def chunks():
                parsers = [ReplyParser(thinking, bool(tools)) for _ in reqs]
                calls = [0] * len(reqs)
                usage = [0, 0]
                for i in range(len(reqs)):
                    yield {**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]}
                async for i, e in self.events(reqs, None):
                    deltas = parsers[i].feed(e.text) + (parsers[i].finish() if e.finish is not None else [])
                    lp = {"content": self.chat_logprobs(e.token_ids, e.logprobs)} if st.logprobs is not None \
                        and e.token_ids else None
                    out = []
                    for kind, v in deltas:
                        if kind == "tool_call":
                            calls[i] += 1
                            d = {"tool_calls": [{"index": v["index"], "id": v["id"], "type": "function",
                                                 "function": {"name": v["name"], "arguments": v["arguments"]}}]}
                        else:
                            d = {"reasoning_content" if kind == "reasoning" else "content": v}
                        out.append(d)
                    if lp is not None and not out:
                        out.append({})
                    for d in out:
                        yield {**chunk, "choices": [{"index": i, "delta": d, "logprobs": lp, "finish_reason": None}]}
                        lp = None
                    if e.finish is not None:
                        usage[0] += e.prompt_tokens if i == 0 else 0
                        usage[1] += e.completion_tokens
                        reason = "tool_calls" if calls[i] and e.finish == "stop" else e.finish
                        yield {**chunk, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                                     "finish_reason": reason}]}
                if st.include_usage:
                    yield {**chunk, "choices": [], "usage": self.usage(*usage)}
            return self.sse(chunks())

        got = await self.collect(reqs, http, len(reqs))  # one prompt, n choices
        if got is None:  # the client went away
            return None
        acc, usage = got
        choices = []
        for i, a in enumerate(acc):
            r = parse_reply(a["text"], thinking, bool(tools))
            msg = {"role": "assistant", "content": r["content"]}
            if r["reasoning_content"] is not None:
                msg["reasoning_content"] = r["reasoning_content"]
            if r["tool_calls"]:
                msg["tool_calls"] = [{"id": c["id"], "type": "function",
                                      "function": {"name": c["name"], "arguments": c["arguments"]}}
                                     for c in r["tool_calls"]]
            reason = "tool_calls" if r["tool_calls"] and a["finish"] == "stop" else a["finish"]
            choices.append({"index": i, "message": msg, "finish_reason": reason,
                            "logprobs": {"content": self.chat_logprobs(a["tokens"], a["lps"])}
                            if st.logprobs is not None else None})
        return {**head, "choices": choices, "usage": self.usage(*usage)}

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                            "owned_by": "mimo-flash", "max_model_len": self.sched.S}]}


def make_app(server: OpenAIServer) -> FastAPI:
    app = FastAPI(title="mimo-flash", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestError)
    async def _bad(_, e: RequestError):
        return error_response(e.status, str(e), e.kind, e.param)

    @app.exception_handler(HTTPException)
    async def _http(_, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, str(e.detail), kind)

    @app.exception_handler(Exception)
    async def _crash(_, e: Exception):
        return error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    async def handle(fn, http):
        out = await fn(http)
        if out is None:  # the client disconnected: nobody reads this
            return error_response(499, "client closed the request", "cancelled")
        return out if isinstance(out, StreamingResponse) else JSONResponse(out)

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        return await handle(server.completions, http)

    @app.post("/v1/chat/completions")
    async def chat(http: HTTPRequest):
        return await handle(server.chat, http)

    @app.get("/v1/models")
    async def models():
        return server.models()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        text = server.sched.metrics_text()  # (a RemoteScheduler's asks the model's process)
        return PlainTextResponse(await text if inspect.isawaitable(text) else text,
                                 media_type="text/plain; version=0.0.4")

    return app


class JSONErrorH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol whose own 400 (a request line, header or Content-Length it cannot parse,
    answered before the app sees the request) is OpenAI's error object instead of plain text."""

    def send_400_response(self, msg: str) -> None:
        body = json.dumps({"error": {"message": f"malformed HTTP request: {msg}", "type": "invalid_request_error",
                                     "param": None, "code": 400}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


def make_uvicorn(server: OpenAIServer, host: str = "127.0.0.1", port: int = 8000,
                 log_level: str = "warning") -> uvicorn.Server:
    """A uvicorn server for the app: keep-alive 5 s, headers capped at 64 KiB (slow or huge bodies are the
    handler's: OpenAIServer.body)."""
    config = uvicorn.Config(make_app(server), host=host, port=port, log_level=log_level, access_log=False,
                            timeout_keep_alive=5, h11_max_incomplete_event_size=64 << 10, lifespan="off",
                            http=JSONErrorH11Protocol)
    return uvicorn.Server(config)


def start_in_thread(server: OpenAIServer, host: str = "127.0.0.1", port: int = 0):
    """Run the HTTP server in a daemon thread (tests, the benchmark) -> (uvicorn.Server, base URL)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    srv = make_uvicorn(server, host, sock.getsockname()[1])
    threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True).start()
    deadline = time.time() + 30
    while not srv.started:
        if time.time() > deadline:
            raise RuntimeError("the HTTP server did not start")
        time.sleep(0.01)
    return srv, f"http://{host}:{sock.getsockname()[1]}"
