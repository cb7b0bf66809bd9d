"""Incremental detokenization for streams: stable text only, stop strings, no U+FFFD at token boundaries."""

from __future__ import annotations


class Detokenizer:
    """Turns one sequence's new token ids into text pieces as they become stable.

    Text is held back while it ends in an incomplete UTF-8 sequence (the byte-level decoder shows it as
    U+FFFD) or in what could be the start of a stop string. Each add() decodes only a short window of
    recent ids (from `prefix` on) so a step costs the same at any length.
    """

    def __init__(self, tokenizer, stop_strings=(), skip_special_tokens: bool = True) -> None:
        self.tok = tokenizer
        self.stop = [s for s in stop_strings if s]
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] decode to text already accounted for in `text`
        self.read = 0
        self.text = ""  # all stable text so far (may include a held-back stop-string prefix)
        self.emitted = 0  # characters of `text` handed out
        self._before: str | None = None  # decode of ids[prefix:read] (changes only when they move)
        self.stopped = False

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def add(self, ids: list[int]) -> str:
        """New token ids -> the text that became safe to show (may be ""). Sets `stopped` at a stop string."""
        if self.stopped:
            return ""
        self.ids.extend(ids)
        if self._before is None:
            self._before = self._decode(self.ids[self.prefix:self.read])
        before = self._before
        now = self._decode(self.ids[self.prefix:])
        if not now.endswith("\ufffd") and len(now) > len(before):
            self.text += now[len(before):]
            # the last piece's ids stay as context: decoders join tokens differently at a sequence's start
            self.prefix, self.read = self.read, len(self.ids)
            self._before = None
        return self._release(final=False)

    def _release(self, final: bool) -> str:
        text = self.text
        cut = len(text)
        for s in self.stop:  # search from where a new stop string could start
            i = text.find(s, max(0, self.emitted - len(s) + 1))
            if i >= 0 and i < cut:
                cut, self.stopped = i, True
        if self.stopped:
            self.text = text[:cut]
        elif not final:
            for s in self.stop:  # hold back a suffix that may grow into a stop string
                for n in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:n]):
                        cut = min(cut, len(text) - n)
                        break
        cut = max(cut, self.emitted)
        piece = self.text[self.emitted:cut]
        self.emitted = cut
        return piece

    def finish(self) -> str:
        """At the end of generation: whatever is left (a dangling incomplete character is dropped)."""
        if not self.stopped:
            rest = self._decode(self.ids[self.prefix:])
            before = self._decode(self.ids[self.prefix:self.read])
            tail = rest[len(before):] if rest.startswith(before) else ""
            self.text += tail.rstrip("\ufffd")
        return self._release(final=True)
