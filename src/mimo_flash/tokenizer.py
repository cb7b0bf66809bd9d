"""A checkpoint's tokenizer and chat template, with the `tokenizers` library only (no transformers).

Reads tokenizer.json (required), tokenizer_config.json (special tokens, chat_template, possibly in the
list form [{"name": ..., "template": ...}]), chat_template.jinja (where newer transformers put the
template; it takes priority over the config's, as in transformers) and generation_config.json
(eos_token_id / pad_token_id, which win over the config's tokens for generation).

The chat template is rendered with jinja2 in a sandbox, with the helpers transformers gives templates
(raise_exception, tojson, strftime_now); jinja2 comes with torch. Compiled templates are cached.
`apply_chat_template` falls back to ChatML when there is no template and the vocabulary has
<|im_start|> / <|im_end|> (MiMo's format), else to "role: content" lines. `encode_chat` renders a
conversation with the checkpoint's template and marks the tokens of assistant turns, so that
fine-tuning can put the loss on those alone; `save_pretrained` copies the tokenizer files next to a
checkpoint.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from .config import read_json_object

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@lru_cache(maxsize=1)
def jinja_environment():
    """The sandboxed jinja2 environment chat templates are rendered in, as transformers sets it up."""
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
    return env


@lru_cache(maxsize=8)
def compile_template(source: str):
    """A chat template's source -> the compiled jinja2 template (cached by source)."""
    return jinja_environment().from_string(source)


def _token_str(t, where: str) -> str | None:
    """tokenizer_config entries are either strings or {"content": ...} dicts (or null)."""
    if isinstance(t, dict):
        t = t.get("content")
    if t is not None and not isinstance(t, str):
        raise ValueError(f"{where}: expected a token string (or {{'content': ...}}), got {t!r}")
    return t




class Tokenizer:
    """A tokenizers.Tokenizer with the checkpoint's special tokens, EOS / pad ids and chat template.

    path: a directory holding tokenizer.json (and optionally tokenizer_config.json, chat_template.jinja,
    generation_config.json), or the tokenizer.json file itself.
    """

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _Tok

        p = Path(path)
        if p.is_file():
            root, f = p.parent, p
        elif p.is_dir():
            root, f = p, p / "tokenizer.json"
            if not f.exists():
                raise FileNotFoundError(f"{root} has no tokenizer.json; copy the checkpoint's tokenizer files "
                                        "(tokenizer.json, tokenizer_config.json) into it")
        else:
            raise FileNotFoundError(f"{p}: no such directory (expected one with tokenizer.json)")
        try:
            self.tokenizer = _Tok.from_file(str(f))
        except Exception as e:  # the tokenizers library raises its own (bare) exception types
            raise ValueError(f"{f}: cannot be read as a tokenizers tokenizer.json ({e})") from None
        self.source, self.file = root, f
        self.config = read_json_object(root / "tokenizer_config.json")
        gen = read_json_object(root / "generation_config.json")

        template = self.config.get("chat_template")
        jinja_file = root / "chat_template.jinja"
        if jinja_file.exists():
            template = jinja_file.read_text()
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        self.chat_template: str | None = template

        self.bos_token = _token_str(self.config.get("bos_token"), f"{root / 'tokenizer_config.json'}: bos_token")
        self.eos_token = _token_str(self.config.get("eos_token"), f"{root / 'tokenizer_config.json'}: eos_token")
        self.pad_token = _token_str(self.config.get("pad_token"), f"{root / 'tokenizer_config.json'}: pad_token")
        self.bos_id = self.token_to_id(self.bos_token)
        # generation stops at any of generation_config's EOS ids, else at the config's eos_token
        for key in ("eos_token_id", "pad_token_id"):
            v = gen.get(key)
            ids = v if isinstance(v, list) and key == "eos_token_id" else [v]
            if v is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ValueError(f"{root / 'generation_config.json'}: {key} must be a token id (integer >= 0)"
                                 f"{' or a list of them' * (key == 'eos_token_id')}, got {v!r}")
        eos = gen.get("eos_token_id")
        if eos is None:
            eos = self.token_to_id(self.eos_token)
        self.eos_token_ids: list[int] = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        # the one EOS appended to training documents: the config's eos_token, else the first generation EOS
        self.eos_id = self.token_to_id(self.eos_token)
        if self.eos_id is None and self.eos_token_ids:
            self.eos_id = self.eos_token_ids[0]
        self.pad_token_id: int | None = gen.get("pad_token_id")
        if self.pad_token_id is None:
            self.pad_token_id = self.token_to_id(self.pad_token)
        # padding for packed training rows: never None
        self.pad_id: int = self.pad_token_id if self.pad_token_id is not None else (
            self.eos_id if self.eos_id is not None else 0)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Tokenizer":
        """The same as Tokenizer(path), named as in transformers."""
        return cls(path)

    def save_pretrained(self, path: str | Path) -> None:
        """Copy the tokenizer files next to a checkpoint (or write them where the source files are gone)."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        if self.file.exists():
            for src, name in [(self.file, "tokenizer.json")] + [(self.source / n, n) for n in TOKENIZER_FILES[1:]]:
                if src.exists() and src.resolve() != (out / name).resolve():
                    shutil.copyfile(src, out / name)
            return
        self.tokenizer.save(str(out / "tokenizer.json"))
        (out / "tokenizer_config.json").write_text(json.dumps(self.config, indent=2) + "\n")

    # ------------------------------------------------------------------ encoding
    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Text -> token ids (by default no special tokens added by a post-processor)."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------------- chat
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False, tools: list | None = None,
                    **template_kwargs) -> str:
        """The checkpoint's chat template applied to `messages` (and `tools`, OpenAI function specs, for
        templates that render them; template_kwargs such as enable_thinking go to the template too);
        an error when there is none."""
        if not self.chat_template:
            raise ValueError(f"the tokenizer in {self.source} has no chat_template (tokenizer_config.json or "
                             "chat_template.jinja), so chat data cannot be rendered")
        jinja_environment()  # a clear error where jinja2 is missing
        from jinja2 import TemplateError

        try:
            return compile_template(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
                eos_token=self.eos_token or "", pad_token=self.pad_token or "", tools=tools, **template_kwargs)
        except TemplateError as e:
            raise ValueError(f"chat template: {e}") from None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list | None = None, **template_kwargs) -> str:
        """messages: [{"role": ..., "content": ...}] -> the prompt text (to encode without special tokens),
        with the checkpoint's template, else ChatML or "role: content" lines."""
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"message {i} must be a dict with 'role' and 'content'")
        if self.chat_template:
            return self.render_chat(messages, add_generation_prompt, tools, **template_kwargs)
        if self.token_to_id("<|im_start|>") is not None and self.token_to_id("<|im_end|>") is not None:
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant: " if add_generation_prompt else "")

    def encode_chat(self, messages: list[dict]) -> tuple[list[int], list[bool]]:
        """Render (with the checkpoint's template) and tokenize a conversation -> (ids [n], assistant mask [n]).

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
