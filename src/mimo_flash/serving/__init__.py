"""OpenAI-compatible HTTP serving over the generation engine."""

from .server import Engine, RequestError, make_server

__all__ = ["Engine", "RequestError", "make_server"]
