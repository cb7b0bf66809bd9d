"""The checkpoint's tokenizer: `tokenizer.json` (tokenizers library) plus `tokenizer_config.json`.

`TextTokenizer` encodes plain text and renders chat conversations through the checkpoint's Jinja chat
template (as transformers' `apply_chat_template` does), marking which tokens belong to assistant turns
so that fine-tuning can put the loss on those alone.
"""

from __future__ import annotations

import json
import shutil
from functools import lru_cache
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@lru_cache(maxsize=8)
def _compile_template(source: str):
    """Compile a chat template the way transformers does (sandboxed, trim/lstrip blocks)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def _token_text(tok) -> str | None:
    """tokenizer_config entries are either strings or {"content": ...} dicts."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


class TextTokenizer:
    """A tokenizers.Tokenizer with the checkpoint's special tokens and chat template."""

    def __init__(self, tokenizer, config: dict | None = None, source: Path | None = None) -> None:
        self.tokenizer = tokenizer
        self.config = dict(config or {})
        self.source = source
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.pad_token = _token_text(self.config.get("pad_token"))
        self.chat_template = self.config.get("chat_template")
        self.eos_id = self.token_id(self.eos_token)
        self.bos_id = self.token_id(self.bos_token)
        pad = self.token_id(self.pad_token)
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | Path) -> "TextTokenizer":
        """path: a directory holding tokenizer.json (and optionally tokenizer_config.json), or the file."""
        from tokenizers import Tokenizer

        p = Path(path)
        root = p.parent if p.is_file() else p
        f = p if p.is_file() else p / "tokenizer.json"
        if not f.exists():
            raise FileNotFoundError(f"no tokenizer.json in {root}")
        try:
            tok = Tokenizer.from_file(str(f))
        except Exception as e:  # the tokenizers library raises a bare Exception on bad files
            raise ValueError(f"{f}: not a tokenizers tokenizer.json ({e})") from None
        config = {}
        cf = root / "tokenizer_config.json"
        if cf.exists():
            try:
                config = json.loads(cf.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{cf}: not valid JSON ({e})") from None
        jinja = root / "chat_template.jinja"
        if jinja.exists() and not config.get("chat_template"):
            config["chat_template"] = jinja.read_text()
        if isinstance(config.get("chat_template"), list):  # [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in config["chat_template"]}
            config["chat_template"] = named.get("default") or next(iter(named.values()), None)
        return cls(tok, config, root)

    def save_pretrained(self, path: str | Path) -> None:
        """Copy the tokenizer files next to a checkpoint (or write them if this one was built in memory)."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        if self.source is not None and (self.source / "tokenizer.json").exists():
            for name in TOKENIZER_FILES:
                if (self.source / name).exists() and (self.source / name).resolve() != (out / name).resolve():
                    shutil.copyfile(self.source / name, out / name)
            return
        self.tokenizer.save(str(out / "tokenizer.json"))
        (out / "tokenizer_config.json").write_text(json.dumps(self.config, indent=2) + "\n")

    # ----------------------------------------------------------------- encoding
    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Text -> token ids (no special tokens added by a post-processor)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The chat template applied to `messages` (a list of {"role", "content"} dicts)."""
        if not self.chat_template:
            where = f" in {self.source}" if self.source else ""
            raise ValueError(f"the tokenizer{where} has no chat_template (tokenizer_config.json), "
                             "so chat data cannot be rendered")
        return _compile_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def encode_chat(self, messages: list[dict]) -> tuple[list[int], list[bool]]:
        """Render and tokenize a conversation -> (ids [n], assistant mask [n]).

        A token is in the mask when it belongs to an assistant turn: the text that rendering the
        conversation up to that turn adds after the prompt `render(messages[:i], add_generation_prompt=True)`
        (the reply and its end-of-turn marker). This needs a template whose renders of shorter
        conversations are prefixes of the full render, as usual for chat templates.
        """
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ValueError("'messages' must be a list of {\"role\": ..., \"content\": ...} objects")
        text = self.render_chat(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = self.render_chat(messages[:i], add_generation_prompt=True)
            end = self.render_chat(messages[: i + 1])
            if not (text.startswith(start) and text.startswith(end) and end.startswith(start)):
                raise ValueError("the chat template does not render a conversation's turns as prefixes of the "
                                 "whole; cannot tell which tokens are the assistant's")
            spans.append((len(start), len(end)))
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        # a token belongs to the turn where its first character is
        mask = [any(s <= a < e for s, e in spans) for a, _ in enc.offsets]
        return enc.ids, mask
