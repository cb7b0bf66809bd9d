"""Split a chat reply into reasoning, content and tool calls, in MiMo-V2-Flash's format, while it streams.

MiMo-V2-Flash (like Qwen3) thinks inside `<think>...</think>` at the start of its reply (the chat template
may already have opened the `<think>`), and calls tools with blocks

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

(the XML form of its template); the JSON form `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` of
Qwen-style templates is read too. A parameter value that is valid JSON (a number, an object...) is taken as
that JSON, otherwise as a string. A block that does not parse stays in the content as it was written.
"""

from __future__ import annotations

import json
import re
import uuid

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_FUNC = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|$)", re.S)
_PARAM = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.S)


def parse_tool_call(block: str) -> dict | None:
    """The text between <tool_call> and </tool_call> -> {"name": str, "arguments": JSON string} or None."""
    body = block.strip()
    if body.startswith("{"):
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            return None
        name = obj.get("name") if isinstance(obj, dict) else None
        args = obj.get("arguments", obj.get("parameters", {})) if isinstance(obj, dict) else None
        if not isinstance(name, str) or not isinstance(args, (dict, str)):
            return None
        return {"name": name, "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}
    m = _FUNC.search(body)
    if m is None:
        return None
    args = {}
    for k, v in _PARAM.findall(m.group(2)):
        try:
            args[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            args[k.strip()] = v
    return {"name": m.group(1).strip(), "arguments": json.dumps(args, ensure_ascii=False)}


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag (held back: may become the tag)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReplyParser:
    """feed(text piece) -> deltas [("reasoning", str) | ("content", str) | ("tool_call", {"id", "name",
    "arguments"})]; finish() -> the last ones. thinking: the prompt already opened <think>; tools: look for
    tool calls (only when the request offered tools)."""

    def __init__(self, thinking: bool = False, tools: bool = False) -> None:
        self.state = "reasoning" if thinking else "start"
        self.tools = tools
        self.buf = ""
        self.calls = 0

    def feed(self, piece: str) -> list:
        self.buf += piece
        out: list = []
        while self._advance(out, final=False):
            pass
        return out

    def finish(self) -> list:
        out: list = []
        while self._advance(out, final=True):
            pass
        if self.buf:  # an unclosed block: reasoning stays reasoning, a tool call stays text
            out.append(("reasoning" if self.state == "reasoning" else "content", self.buf))
            self.buf = ""
        return [d for d in out if d[0] == "tool_call" or d[1]]

    def _advance(self, out: list, final: bool) -> bool:
        """One state transition if the buffer allows it; emits what is safe. Returns whether to go on."""
        b = self.buf
        if self.state == "start":
            s = b.lstrip()
            if s.startswith(THINK_OPEN):
                self.buf, self.state = s[len(THINK_OPEN):], "reasoning"
                return True
            if not final and THINK_OPEN.startswith(s):
                return False  # could still become <think>
            self.state = "content"
            return True
        if self.state == "reasoning":
            i = b.find(THINK_CLOSE)
            if i >= 0:
                out.append(("reasoning", b[:i]))
                self.buf, self.state = b[i + len(THINK_CLOSE):].lstrip("\n"), "content"
                return True
            keep = 0 if final else _partial_suffix(b, THINK_CLOSE)
            out.append(("reasoning", b[:len(b) - keep]))
            self.buf = b[len(b) - keep:]
            return False
        if self.state == "content":
            i = b.find(CALL_OPEN) if self.tools else -1
            if i >= 0:
                out.append(("content", b[:i]))
                self.buf, self.state = b[i + len(CALL_OPEN):], "tool"
                return True
            keep = _partial_suffix(b, CALL_OPEN) if self.tools and not final else 0
            out.append(("content", b[:len(b) - keep]))
            self.buf = b[len(b) - keep:]
            return False
        i = b.find(CALL_CLOSE)  # state "tool": wait for the whole block
        if i < 0:
            if final:
                self.buf, self.state = CALL_OPEN + b, "content"
            return False
        call = parse_tool_call(b[:i])
        if call is None:
            out.append(("content", CALL_OPEN + b[:i + len(CALL_CLOSE)]))
        else:
            out.append(("tool_call", {"id": f"call_{uuid.uuid4().hex[:24]}", "index": self.calls, **call}))
            self.calls += 1
        self.buf, self.state = b[i + len(CALL_CLOSE):].lstrip("\n"), "content"
        return True


def parse_reply(text: str, thinking: bool = False, tools: bool = False) -> dict:
    """A whole reply -> {"content": str | None, "reasoning_content": str | None, "tool_calls": [...]}."""
    p = ReplyParser(thinking, tools)
    deltas = p.feed(text) + p.finish()
    reasoning = "".join(d[1] for d in deltas if d[0] == "reasoning")
    content = "".join(d[1] for d in deltas if d[0] == "content")
    calls = [d[1] for d in deltas if d[0] == "tool_call"]
    if calls:
        content = content.strip()
    return {"content": content or (None if calls else ""), "reasoning_content": reasoning or None,
            "tool_calls": calls}
