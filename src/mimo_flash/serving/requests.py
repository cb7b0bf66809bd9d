"""What a client hands the scheduler and what comes back: a Request (a prompt, its limits and sampling, a sink
for its output, cancel()), the Events its sink receives, QueueFull when the waiting queue is at its bound, and
check_size, the context limit that both the Scheduler and the HTTP process's RemoteScheduler apply. The
scheduler (serving/scheduler.py) runs them; the HTTP side (api.py, remote.py) makes them and reads their events.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

from ..generation.sampling import SamplingParams

TopLogprobs = list[tuple[int, float]]  # (token id, logprob), best first


class QueueFull(RuntimeError):
    """The waiting queue is at its bound: the HTTP layer answers 429."""


def check_size(prompt_len: int, max_tokens: int, S: int) -> None:
    """Raise ValueError if a request of this size cannot run in a context of S tokens."""
    if prompt_len < 1:
        raise ValueError("the prompt has no tokens")
    if prompt_len + max_tokens > S:
        raise ValueError(f"the prompt has {prompt_len} tokens and max_tokens is {max_tokens}: together more "
                         f"than this server's context of {S} tokens")


@dataclass
class Event:
    """A piece of a request's output. token_ids / text: new since the last event; logprobs: per new token
    (logprob of the token, top alternatives) when asked; finish: None, "stop", "length", "cancelled" or
    "error" (with `error`). prompt_logprobs (first event, when asked): per prompt token, None for the first."""

    token_ids: list[int]
    text: str
    logprobs: list[tuple[float, TopLogprobs]] | None = None
    finish: str | None = None
    error: str | None = None
    prompt_logprobs: list[tuple[float, TopLogprobs] | None] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class Request:
    """One sequence to generate. logprobs: None, or the number of top alternatives (0: the token's only).
    prompt_logprobs: also the prompt's logprobs (the prefill then computes logits at every position)."""

    prompt: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    eos: tuple[int, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: bool = False
    sink: Callable[[Event], None] = lambda e: None
    cancelled: bool = False
    submitted: float = 0.0
    rid: int = -1  # its number among the requests sent to the other ranks (parallel models; -1: not sent)
    on_cancel: Callable[[], None] | None = None  # cancel() calls it too (serving/remote.py: tells the model's process)

    def cancel(self) -> None:
        """Ask the scheduler to drop the request at its next step boundary (any thread)."""
        self.cancelled = True
        if self.on_cancel is not None:
            self.on_cancel()


def run_blocking(scheduler, req: Request, timeout: float | None = None) -> list[Event]:
    """Submit req to a started scheduler and wait for all its events (tests, benchmarks)."""
    events: list[Event] = []
    done = threading.Event()

    def sink(e: Event) -> None:
        events.append(e)
        if e.finish is not None:
            done.set()

    req.sink = sink
    scheduler.submit(req)
    if not done.wait(timeout):
        req.cancel()
        raise TimeoutError("the request did not finish in time")
    return events
