"""The HTTP side in a process of its own, as vLLM's API server runs beside its engine.

`mimo-flash serve` keeps the model and the Scheduler's thread in its own process and spawns one process for
uvicorn and the OpenAIServer. Each process then has its own GIL: the event loop's work for every chunk of every
stream (JSON, Starlette's response and middleware, h11, the socket) no longer holds up the scheduler thread
between the GPU's steps. One duplex pipe joins them:

    HTTP -> model:  ("submit", rid, request fields)   answered by ("ack", rid, None | (kind, message))
                    ("cancel", rid)
                    ("metrics", qid)                   answered by ("metrics", qid, text)
    model -> HTTP:  ("events", [(rid, Event), ...])    everything the scheduler emitted since the last message

`EngineLink` (the model's process) serves the requests and sends the events in batches: a sender thread takes
whatever piled up while it sent the last batch, so a busy step costs one message, not one per stream.
`RemoteScheduler` (the HTTP process) is what the OpenAIServer sees there: the Scheduler's submit (awaited: a
full queue or a bad prompt is answered as in one process), check, S, vocab_size and metrics_text. Its reader
thread hands each event to the request's sink, as the scheduler thread does in one process.

When either process ends, the other follows: the HTTP process stops serving at the pipe's end of file, and the
model's process (cmd_serve) stops when the HTTP process exits, terminating it on SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import sys
import threading
import time

from .requests import Event, QueueFull, Request, check_size
from .scheduler import Scheduler

# Request fields that travel (the rest belong to one process: the sink, cancellation, timing)
_LOCAL = {"sink", "cancelled", "submitted", "rid", "on_cancel"}
FIELDS = tuple(f.name for f in dataclasses.fields(Request) if f.name not in _LOCAL)


class EngineLink:
    """The model's process's end of the pipe: submits, cancels and metrics against `sched`; events back in
    batches. start() runs its two threads; `closed` is set when the HTTP process's end goes away."""

    def __init__(self, sched: Scheduler, conn) -> None:
        self.sched, self.conn = sched, conn
        self.reqs: dict[int, Request] = {}
        self.out: list[tuple[int, Event]] = []
        self.cv = threading.Condition()
        self.send_lock = threading.Lock()
        self.closed = threading.Event()

    def start(self) -> "EngineLink":
        threading.Thread(target=self._receive, name="mimo-flash-link-in", daemon=True).start()
        threading.Thread(target=self._send_events, name="mimo-flash-link-out", daemon=True).start()
        return self

    def _post(self, msg) -> None:
        with self.send_lock:
            self.conn.send(msg)

    def _sink(self, rid: int):
        def sink(e: Event) -> None:  # the scheduler thread: never blocks on the pipe
            if e.finish is not None:
                self.reqs.pop(rid, None)
            with self.cv:
                self.out.append((rid, e))
                if len(self.out) == 1:
                    self.cv.notify()
        return sink

    def _send_events(self) -> None:
        while True:
            with self.cv:
                while not self.out and not self.closed.is_set():
                    self.cv.wait(0.5)
                if self.closed.is_set():
                    return
                items, self.out = self.out, []
            try:
                self._post(("events", items))
            except (OSError, ValueError):
                self._close()
                return

    def _receive(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                self._close()
                return
            kind = msg[0]
            if kind == "submit":
                _, rid, fields = msg
                req = Request(**fields, sink=self._sink(rid))
                self.reqs[rid] = req
                err = None
                try:
                    self.sched.submit(req)
                except QueueFull as e:
                    err = ("full", str(e))
                except ValueError as e:
                    err = ("invalid", str(e))
                if err is not None:
                    self.reqs.pop(rid, None)
                self._post(("ack", rid, err))
            elif kind == "cancel":
                req = self.reqs.pop(msg[1], None)
                if req is not None:
                    req.cancel()
            elif kind == "metrics":
                self._post(("metrics", msg[1], self.sched.metrics_text()))

    def _close(self) -> None:
        """The HTTP process is gone: nobody reads these requests' output any more."""
        self.closed.set()
        for req in list(self.reqs.values()):
            req.cancel()
        with self.cv:
            self.cv.notify()


class RemoteScheduler:
    """The Scheduler as the HTTP process sees it (see the module docstring). on_close: called (from the reader
    thread) when the model's process goes away, after every open request got an error event."""

    def __init__(self, conn, S: int, vocab_size: int, on_close=None) -> None:
        self.conn, self.S, self.vocab_size, self.on_close = conn, S, vocab_size, on_close
        self.reqs: dict[int, Request] = {}
        self.waiters: dict[tuple[str, int], tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self.ids = itertools.count()
        self.send_lock = threading.Lock()
        self.reader = threading.Thread(target=self._receive, name="mimo-flash-link-in", daemon=True)
        self.reader.start()

    def check(self, prompt_len: int, max_tokens: int) -> None:
        check_size(prompt_len, max_tokens, self.S)

    def _post(self, msg) -> None:
        with self.send_lock:
            self.conn.send(msg)

    async def _ask(self, kind: str, n: int, msg):
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.waiters[(kind, n)] = (loop, fut)
        try:
            self._post(msg)
        except (OSError, ValueError):
            self.waiters.pop((kind, n), None)
            raise RuntimeError("the model's process is gone") from None
        return await fut

    async def asubmit(self, req: Request) -> None:
        """Send req to the model's process; raises what Scheduler.submit raises there (QueueFull, ValueError)."""
        rid = next(self.ids)
        req.submitted = time.perf_counter()
        self.reqs[rid] = req
        req.on_cancel = lambda: self._cancel(rid)
        err = await self._ask("ack", rid, ("submit", rid, {f: getattr(req, f) for f in FIELDS}))
        if err is not None:
            self.reqs.pop(rid, None)
            req.on_cancel = None
            kind, message = err
            raise QueueFull(message) if kind == "full" else ValueError(message)

    def _cancel(self, rid: int) -> None:
        if self.reqs.pop(rid, None) is not None:
            try:
                self._post(("cancel", rid))
            except (OSError, ValueError):
                pass  # the model's process is gone: nothing runs there

    async def metrics_text(self) -> str:
        qid = next(self.ids)
        return await self._ask("metrics", qid, ("metrics", qid))

    def _receive(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                break
            kind = msg[0]
            if kind == "events":
                for rid, e in msg[1]:
                    req = self.reqs.get(rid)
                    if req is not None:
                        if e.finish is not None:
                            self.reqs.pop(rid, None)
                        req.sink(e)
            else:  # ("ack", rid, err) / ("metrics", qid, text)
                loop, fut = self.waiters.pop((kind, msg[1]), (None, None))
                if fut is not None:
                    loop.call_soon_threadsafe(_resolve, fut, msg[2])
        for req in list(self.reqs.values()):
            req.sink(Event([], "", finish="error", error="the model's process exited"))
        self.reqs.clear()
        for loop, fut in list(self.waiters.values()):
            loop.call_soon_threadsafe(_fail, fut)
        if self.on_close is not None:
            self.on_close()


def _resolve(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _fail(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(RuntimeError("the model's process exited"))


def http_main(conn, model_dir: str, name: str, host: str, port: int, S: int, vocab_size: int,
              max_tokens_limit: int, request_timeout: float, banner: str) -> None:
    """The HTTP process: the checkpoint's tokenizer, an OpenAIServer over a RemoteScheduler, uvicorn on
    host:port; prints `banner` once listening; ends when the model's process does."""
    from ..tokenizer import Tokenizer
    from .api import OpenAIServer, make_uvicorn

    tok = Tokenizer(model_dir)
    srv = None

    def close():
        if srv is not None:
            srv.should_exit = True

    remote = RemoteScheduler(conn, S, vocab_size, on_close=close)
    server = OpenAIServer(remote, tok, name, max_tokens_limit=max_tokens_limit, request_timeout=request_timeout)
    srv = make_uvicorn(server, host, port)

    def announce():
        while not srv.started and not srv.should_exit:
            time.sleep(0.05)
        if srv.started:
            print(banner, file=sys.stderr, flush=True)
    threading.Thread(target=announce, daemon=True).start()
    srv.run()
