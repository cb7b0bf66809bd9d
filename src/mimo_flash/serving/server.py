"""An OpenAI-compatible HTTP server over the generation engine (standard library only).

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with `stream`, as
server-sent events), GET /health. Requests run one at a time on the model (a lock); each is one
`generate` call, with MTP speculative decoding when the server was started with it or the request asks
for it (`num_speculative_tokens`, an extension). Bad requests get OpenAI's error object with status 400.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator

import torch

from ..generation import generate
from ..generation.streamer import TextStreamer


class RequestError(ValueError):
    """A bad request: becomes a 400 with OpenAI's error object."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _number(body: dict, name: str, default, kind=float, lo=None, hi=None):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise RequestError(f"'{name}' must be a {'integer' if kind is int else 'number'}, got {v!r}", name)
    v = kind(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise RequestError(f"'{name}' must be in [{lo}, {hi}], got {v}", name)
    return v


class Engine:
    """Turns OpenAI request bodies into generate() calls on one model."""

    def __init__(self, model, tokenizer, name: str, speculative: int = 0, max_tokens_limit: int = 4096) -> None:
        self.model, self.tok, self.name = model, tokenizer, name
        self.speculative, self.max_tokens_limit = speculative, max_tokens_limit
        self.lock = threading.Lock()
        self.created = int(time.time())
        # a tensor / expert parallel model: rank 0 announces each run to the other ranks (distributed/steps.py)
        self.steps = None

    # ------------------------------------------------------------ parameters
    def _params(self, body: dict) -> dict:
        for unsupported in ("frequency_penalty", "presence_penalty"):
            if body.get(unsupported):
                raise RequestError(f"'{unsupported}' is not supported; use 'repetition_penalty'", unsupported)
        if _number(body, "n", 1, int, 1) != 1:
            raise RequestError("only n=1 is supported", "n")
        limit = self.max_tokens_limit
        max_tokens = _number(body, "max_completion_tokens", None, int, 1, limit)
        max_tokens = max_tokens or _number(body, "max_tokens", 16 if "messages" not in body else 256, int, 1, limit)
        temperature = _number(body, "temperature", 1.0, float, 0.0, 2.0)
        stop = body.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
            raise RequestError("'stop' must be a string or a list of at most 4 strings", "stop")
        kw = dict(max_new_tokens=max_tokens, do_sample=temperature > 0,
                  temperature=temperature if temperature > 0 else 1.0,
                  top_p=_number(body, "top_p", None, float, 0.0, 1.0),
                  top_k=_number(body, "top_k", None, int, 1),
                  min_p=_number(body, "min_p", None, float, 0.0, 1.0),
                  repetition_penalty=_number(body, "repetition_penalty", None, float, 0.0),
                  seed=_number(body, "seed", None, int),
                  num_speculative_tokens=_number(body, "num_speculative_tokens", self.speculative, int, 0,
                                                 self.model.config.num_nextn_predict_layers))
        if kw["top_p"] == 0.0:
            raise RequestError("'top_p' must be > 0", "top_p")
        if self.tok.eos_token_ids:
            kw["eos_token_id"] = self.tok.eos_token_ids
        if self.tok.pad_token_id is not None:
            kw["pad_token_id"] = self.tok.pad_token_id
        return {"gen": kw, "stop": stop}

    def _prompt_ids(self, text: str) -> list[int]:
        ids = self.tok.encode(text)
        if not ids:
            raise RequestError("the prompt encodes to no tokens", "prompt")
        limit = self.model.config.max_position_embeddings
        if len(ids) >= limit:
            raise RequestError(f"the prompt has {len(ids)} tokens; this model takes fewer than {limit}", "prompt")
        return ids

    # ------------------------------------------------------------ generation
    def run(self, text: str, params: dict, on_text: Callable[[str], None] | None = None) -> dict:
        """Generate for one prompt. -> {"text", "finish_reason", "prompt_tokens", "completion_tokens"}"""
        ids = self._prompt_ids(text)
        streamer = TextStreamer(self.tok, write=on_text or (lambda s: None), stop_strings=params["stop"])
        with self.lock, torch.no_grad():
            if self.steps is not None:  # the other ranks run the same generate; they must sample alike
                if params["gen"].get("seed") is None:
                    params["gen"]["seed"] = random.randrange(2 ** 31)
                self.steps.announce(text, params)
            out = generate(self.model, torch.tensor([ids], device=self.model.device), streamer=streamer,
                           stopping=streamer if params["stop"] else None, **params["gen"])
        new = out[0, len(ids):].tolist()
        eos = set(params["gen"].get("eos_token_id") or [])
        hit_eos = next((i for i, t in enumerate(new) if t in eos), None)
        if hit_eos is not None:
            new = new[: hit_eos + 1]
        finish = "stop" if streamer.stopped or hit_eos is not None else "length"
        return {"text": streamer.text, "finish_reason": finish, "prompt_tokens": len(ids),
                "completion_tokens": len(new)}

    def _chat_prompt(self, body: dict) -> str:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' must be a non-empty list", "messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
                raise RequestError(f"messages[{i}] needs a 'role' of system, user or assistant", "messages")
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    raise RequestError(f"messages[{i}]: only text content parts are supported", "messages")
                m = {**m, "content": "".join(p.get("text", "") for p in content)}
                messages[i] = m
            elif not isinstance(content, str):
                raise RequestError(f"messages[{i}] needs a string 'content'", "messages")
        return self.tok.apply_chat_template(messages, add_generation_prompt=True)

    def _prompts(self, body: dict) -> list[str]:
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise RequestError("'prompt' must be a non-empty string or a list of them", "prompt")
        return prompts

    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model != self.name:
            raise RequestError(f"model {model!r} is not served here; this server serves {self.name!r}", "model")

    def completions(self, body: dict) -> dict | Iterator[dict]:
        self._check_model(body)
        prompts, params = self._prompts(body), self._params(body)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": self.name}
        if body.get("stream"):
            if len(prompts) > 1:
                raise RequestError("streaming takes one prompt", "prompt")
            return self._stream(prompts[0], params, lambda piece, finish: {
                **head, "choices": [{"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}]})
        results = [self.run(p, params) for p in prompts]
        return {**head, "choices": [{"index": i, "text": r["text"], "logprobs": None,
                                     "finish_reason": r["finish_reason"]} for i, r in enumerate(results)],
                "usage": _usage(results)}

    def chat(self, body: dict) -> dict | Iterator[dict]:
        self._check_model(body)
        prompt, params = self._chat_prompt(body), self._params(body)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion", "created": created, "model": self.name}
        if body.get("stream"):
            chunk = {**head, "object": "chat.completion.chunk"}

            def make(piece, finish):
                delta = {"content": piece} if finish is None else {}
                return {**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

            first = {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                           "finish_reason": None}]}
            return self._stream(prompt, params, make, first)
        r = self.run(prompt, params)
        return {**head, "choices": [{"index": 0, "message": {"role": "assistant", "content": r["text"]},
                                     "finish_reason": r["finish_reason"]}], "usage": _usage([r])}

    def _stream(self, prompt: str, params: dict, make, first: dict | None = None) -> Iterator[dict]:
        """Run generation in a thread; yield a chunk per text piece, then the finishing chunk."""
        self._prompt_ids(prompt)  # fail before the response starts
        pieces: list = []
        ready = threading.Condition()
        result: dict = {}

        def on_text(s: str) -> None:
            with ready:
                pieces.append(s)
                ready.notify()

        def work() -> None:
            try:
                result.update(self.run(prompt, params, on_text))
            except Exception as e:  # reported in the stream
                result["error"] = str(e)
            with ready:
                pieces.append(None)
                ready.notify()

        threading.Thread(target=work, daemon=True).start()

        def chunks() -> Iterator[dict]:
            if first is not None:
                yield first
            while True:
                with ready:
                    while not pieces:
                        ready.wait()
                    piece = pieces.pop(0)
                if piece is None:
                    break
                yield make(piece, None)
            if "error" in result:
                yield {"error": {"message": result["error"], "type": "server_error", "param": None, "code": None}}
                return
            yield {**make("", result["finish_reason"]), "usage": _usage([result])}

        return chunks()

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                            "owned_by": "mimo-flash"}]}


def _usage(results: list[dict]) -> dict:
    p = sum(r["prompt_tokens"] for r in results)
    c = sum(r["completion_tokens"] for r in results)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def make_handler(engine: Engine):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet; the CLI prints one line per request instead
            pass

        def _send(self, status: int, obj: Any) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, kind: str, param: str | None = None) -> None:
            self._send(status, {"error": {"message": message, "type": kind, "param": param, "code": None}})

        def do_GET(self):
            if self.path in ("/v1/models", "/models"):
                return self._send(200, engine.models())
            if self.path == "/health":
                return self._send(200, {"status": "ok"})
            self._error(404, f"no route {self.path}", "not_found_error")

        def do_POST(self):
            routes = {"/v1/completions": engine.completions, "/v1/chat/completions": engine.chat}
            fn = routes.get(self.path)
            if fn is None:
                return self._error(404, f"no route {self.path}", "not_found_error")
            try:
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n) or b"null")
                if not isinstance(body, dict):
                    raise RequestError("the request body must be a JSON object")
                result = fn(body)
            except json.JSONDecodeError as e:
                return self._error(400, f"the request body is not valid JSON ({e})", "invalid_request_error")
            except RequestError as e:
                return self._error(400, str(e), "invalid_request_error", e.param)
            except ValueError as e:  # the engine's own checks (sampling parameters, prompt length)
                return self._error(400, str(e), "invalid_request_error")
            except Exception as e:
                return self._error(500, f"{type(e).__name__}: {e}", "server_error")
            if isinstance(result, dict):
                return self._send(200, result)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            try:
                for chunk in result:
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away; generation finishes and is dropped

    return Handler


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), make_handler(engine))
    server.daemon_threads = True
    return server
