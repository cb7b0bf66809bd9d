"""Tokenizer and chat template from a checkpoint directory, with the `tokenizers` library only.

Reads tokenizer.json (required), tokenizer_config.json (special tokens, chat_template), chat_template.jinja
(where newer transformers put the template) and generation_config.json (eos_token_id). The chat template
is rendered with jinja2 in a sandbox, with the helpers transformers gives templates (raise_exception,
tojson, strftime_now); jinja2 comes with torch. Without a template, ChatML is used when the vocabulary has
<|im_start|> / <|im_end|> (MiMo's format), else "role: content" lines.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path


def _token_str(t) -> str | None:
    if isinstance(t, dict):
        return t.get("content")
    return t


class Tokenizer:
    def __init__(self, path) -> None:
        from tokenizers import Tokenizer as _Tok

        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: not a directory")
        f = root / "tokenizer.json"
        if not f.exists():
            raise FileNotFoundError(f"{root} has no tokenizer.json; copy the checkpoint's tokenizer files "
                                    "(tokenizer.json, tokenizer_config.json) into it")
        try:
            self.tok = _Tok.from_file(str(f))
        except Exception as e:  # tokenizers raises its own exception types
            raise ValueError(f"{f}: cannot be read as a tokenizers file ({e})") from None
        self.config = self._json(root / "tokenizer_config.json")
        gen = self._json(root / "generation_config.json")
        template = self.config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = root / "chat_template.jinja"
        if jinja_file.exists():
            template = jinja_file.read_text()
        self.chat_template: str | None = template
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.eos_token = _token_str(self.config.get("eos_token"))
        self.pad_token = _token_str(self.config.get("pad_token"))
        eos = gen.get("eos_token_id")
        if eos is None and self.eos_token is not None:
            eos = self.tok.token_to_id(self.eos_token)
        self.eos_token_ids: list[int] = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        self.pad_token_id = gen.get("pad_token_id")
        if self.pad_token_id is None and self.pad_token is not None:
            self.pad_token_id = self.tok.token_to_id(self.pad_token)

    @staticmethod
    def _json(f: Path) -> dict:
        if not f.exists():
            return {}
        try:
            d = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{f}: expected a JSON object")
        return d

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    # ---------------------------------------------------------------- chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """messages: [{"role": ..., "content": ...}] -> the prompt text (to encode without special tokens)."""
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"message {i} must be a dict with 'role' and 'content'")
        if self.chat_template:
            return self._render(messages, add_generation_prompt)
        if self.token_to_id("<|im_start|>") is not None and self.token_to_id("<|im_end|>") is not None:
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant: " if add_generation_prompt else "")

    def _render(self, messages, add_generation_prompt) -> str:
        try:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise ValueError("this checkpoint's chat template needs jinja2: pip install jinja2") from None

        def raise_exception(msg):
            raise TemplateError(msg)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
                eos_token=self.eos_token or "", pad_token=self.pad_token or "", tools=None)
        except TemplateError as e:
            raise ValueError(f"chat template: {e}") from None
