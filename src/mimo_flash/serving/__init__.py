"""OpenAI-compatible serving: a continuous-batching scheduler with prefix caching, and the HTTP API."""

from .api import OpenAIServer, make_app, make_uvicorn, start_in_thread
from .protocol import RequestError
from .requests import Event, QueueFull, Request, run_blocking
from .scheduler import Scheduler

__all__ = ["Event", "OpenAIServer", "QueueFull", "Request", "RequestError", "Scheduler", "make_app", "make_uvicorn",
           "run_blocking", "start_in_thread"]
