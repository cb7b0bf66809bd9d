"""OpenAI request bodies -> validated generation settings. Every problem is a RequestError naming the field.

Supported (anything else is refused with a 400 naming it, never ignored):
  both endpoints: model, max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, n, stop, seed,
    stream, stream_options.include_usage, logprobs, user, ignore_eos, frequency_penalty / presence_penalty
    (0 only)
  /v1/completions: prompt (string, list of strings, token ids, list of token-id lists), echo
  /v1/chat/completions: messages, max_completion_tokens, top_logprobs, tools, tool_choice ("auto", "none"),
    parallel_tool_calls, response_format ({"type": "text"} only), chat_template_kwargs
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from ..generation.sampling import SamplingParams

COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "n", "stop",
          "seed", "stream", "stream_options", "logprobs", "user", "ignore_eos", "frequency_penalty",
          "presence_penalty"}
COMPLETION_FIELDS = COMMON | {"prompt", "echo"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                        "parallel_tool_calls", "response_format", "chat_template_kwargs"}
MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP = 16  # OpenAI allows 4; evaluation harnesses send more


class RequestError(ValueError):
    """A bad request: a 400 (or `status`) with OpenAI's error object."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes):
    """Body bytes -> a JSON object (dict); NaN / Infinity and non-UTF-8 bodies are errors."""
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise RequestError("the request body is not UTF-8") from None
    except ValueError as e:
        raise RequestError(f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


def number(body: dict, name: str, default, kind=float, lo=None, hi=None, lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return default
    what = "an integer" if kind is int else "a number"
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise RequestError(f"'{name}' must be {what}, got {json.dumps(v)[:50]}", name)
    if not math.isfinite(v):
        raise RequestError(f"'{name}' must be finite", name)
    v = kind(v)
    if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and v > hi):
        raise RequestError(f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", name)
    return v


def flag(body: dict, name: str) -> bool:
    v = body.get(name)
    if v is not None and not isinstance(v, bool):
        raise RequestError(f"'{name}' must be a boolean", name)
    return bool(v)


@dataclass
class Settings:
    """What both endpoints share, validated."""

    max_tokens: int | None  # None: the endpoint's default
    params: SamplingParams
    n: int
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool
    logprobs: int | None  # None: off; k: the token's logprob and k alternatives
    ignore_eos: bool
    extra: dict = field(default_factory=dict)


def check_fields(body: dict, allowed: set[str]) -> None:
    for k in body:
        if k not in allowed:
            raise RequestError(f"'{k}' is not supported by this server", k)


def common(body: dict, served: str, chat: bool, limit: int) -> Settings:
    model = body.get("model")
    if model is not None and model != served:
        raise RequestError(f"model {model!r} is not served here; this server serves {served!r}", "model",
                           status=404, kind="not_found_error")
    for p in ("frequency_penalty", "presence_penalty"):
        if number(body, p, 0.0, float, -2.0, 2.0) != 0.0:
            raise RequestError(f"'{p}' is not supported (only 0); use 'repetition_penalty'", p)
    max_tokens = number(body, "max_tokens", None, int, 0 if not chat else 1, limit)
    if chat:
        mct = number(body, "max_completion_tokens", None, int, 1, limit)
        max_tokens = mct if mct is not None else max_tokens
    temperature = number(body, "temperature", 1.0, float, 0.0, 2.0)
    top_p = number(body, "top_p", None, float, 0.0, 1.0, lo_open=True)
    top_k = number(body, "top_k", None, int, -1)
    top_k = None if top_k in (-1, 0) else top_k
    params = SamplingParams(do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0,
                            top_k=top_k, top_p=top_p, min_p=number(body, "min_p", None, float, 0.0, 1.0),
                            repetition_penalty=number(body, "repetition_penalty", None, float, 0.0, lo_open=True))
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict) or set(opts) - {"include_usage", "continuous_usage_stats"}:
            raise RequestError("'stream_options' takes only 'include_usage'", "stream_options")
        if not body.get("stream"):
            raise RequestError("'stream_options' needs 'stream': true", "stream_options")
    if chat:
        lp = body.get("logprobs")
        if lp is not None and not isinstance(lp, bool):
            raise RequestError("'logprobs' must be a boolean", "logprobs")
        top = number(body, "top_logprobs", None, int, 0, MAX_LOGPROBS)
        if top is not None and not lp:
            raise RequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        logprobs = (top or 0) if lp else None
    else:
        logprobs = number(body, "logprobs", None, int, 0, MAX_LOGPROBS)
    return Settings(max_tokens=max_tokens, params=params, n=number(body, "n", 1, int, 1, MAX_N), stop=tuple(stop),
                    seed=number(body, "seed", None, int, -(2 ** 63), 2 ** 63 - 1), stream=flag(body, "stream"),
                    include_usage=bool(opts and flag(opts, "include_usage")), logprobs=logprobs,
                    ignore_eos=flag(body, "ignore_eos"))


def prompts(body: dict, tokenizer, vocab: int) -> list[list[int]]:
    """The completions `prompt` -> token ids per prompt."""
    p = body.get("prompt")
    err = RequestError("'prompt' must be a non-empty string, a list of strings, a list of token ids or a list "
                       "of token-id lists", "prompt")
    if isinstance(p, str):
        p = [p]
    if not isinstance(p, list) or not p:
        raise err
    if all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        p = [p]
    out = []
    for item in p:
        if isinstance(item, str):
            ids = tokenizer.encode(item)
        elif isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            ids = item
            if any(not 0 <= t < vocab for t in ids):
                raise RequestError(f"'prompt' holds token ids outside [0, {vocab})", "prompt")
        else:
            raise err
        if not ids:
            raise RequestError("a prompt encodes to no tokens", "prompt")
        out.append(ids)
    return out


def messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer", "tool"):
            raise RequestError(f"messages[{i}] needs a 'role' of system, developer, user, assistant or tool",
                               "messages")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RequestError(f"messages[{i}]: only text content parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        elif content is None and m["role"] == "assistant" and m.get("tool_calls"):
            content = ""
        elif not isinstance(content, str):
            raise RequestError(f"messages[{i}] needs a string 'content'", "messages")
        m = {**m, "content": content}
        if m["role"] == "developer":
            m["role"] = "system"
        calls = m.get("tool_calls")
        if calls is not None:  # templates read arguments as a mapping
            if not isinstance(calls, list):
                raise RequestError(f"messages[{i}].tool_calls must be a list", "messages")
            fixed = []
            for c in calls:
                f = c.get("function") if isinstance(c, dict) else None
                if not isinstance(f, dict) or not isinstance(f.get("name"), str):
                    raise RequestError(f"messages[{i}].tool_calls: each needs a function with a name", "messages")
                args = f.get("arguments", {})
                if isinstance(args, str):
                    try:
                        args = json.loads(args)
                    except ValueError:
                        raise RequestError(f"messages[{i}].tool_calls: arguments are not JSON", "messages") from None
                fixed.append({**c, "function": {**f, "arguments": args}})
            m["tool_calls"] = fixed
        out.append(m)
    return out


def tools(body: dict) -> list | None:
    t = body.get("tools")
    choice = body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise RequestError("'tool_choice' supports 'auto' and 'none' only", "tool_choice")
    rf = body.get("response_format")
    if rf is not None and rf != {"type": "text"}:
        raise RequestError("'response_format' supports {\"type\": \"text\"} only", "response_format")
    if t is None or choice == "none":
        return None
    if not isinstance(t, list) or not all(isinstance(x, dict) and x.get("type") == "function"
                                          and isinstance(x.get("function"), dict)
                                          and isinstance(x["function"].get("name"), str) for x in t):
        raise RequestError("'tools' must be a list of {\"type\": \"function\", \"function\": {\"name\": ...}}",
                           "tools")
    return t or None
