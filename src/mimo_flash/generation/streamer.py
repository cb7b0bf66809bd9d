"""Streaming text out of generate(), with stop strings."""

from __future__ import annotations

import sys
from typing import Callable


class TextStreamer:
    """Receives row 0's new token ids (generate's `streamer`), writes the text as soon as it is stable.

    Text is held back while it ends in an incomplete UTF-8 sequence or in what could be the start of a
    stop string. When a stop string appears, the text before it is written and `stopped` becomes True;
    passed as generate's `stopping` too, the streamer ends generation there.
    """

    def __init__(self, tokenizer, write: Callable[[str], None] | None = None, stop_strings=(),
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        self.stop_strings = [s for s in stop_strings if s]
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already written
        self.stopped = False
        self.text = ""  # the final text (up to a stop string)

    def put(self, ids: list[int]) -> None:
        if self.stopped:
            return
        self.ids.extend(int(i) for i in ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)
        cut = self._stop_at(text)
        if cut is not None:
            self.stopped = True
            self._emit(text[:cut])
            return
        stable = len(text)
        while stable > self.emitted and text[stable - 1] == "\ufffd":  # incomplete multi-byte character
            stable -= 1
        t = text[:stable]
        for s in self.stop_strings:  # hold back a suffix that may grow into a stop string
            for n in range(min(len(s) - 1, len(t)), 0, -1):
                if t.endswith(s[:n]):
                    stable = min(stable, len(t) - n)
                    break
        self._emit(text[:stable])

    def _stop_at(self, text: str) -> int | None:
        hits = [text.find(s) for s in self.stop_strings]
        hits = [h for h in hits if h >= 0]
        return min(hits) if hits else None

    def _emit(self, upto: str) -> None:
        if len(upto) > self.emitted:
            self.write(upto[self.emitted:])
            self.emitted = len(upto)
        self.text = upto

    def end(self) -> None:
        if not self.stopped:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)
            cut = self._stop_at(text)
            self._emit(text if cut is None else text[:cut])

    def __call__(self, rows: list[list[int]]) -> list[bool]:
        """generate's `stopping` hook (batch of one)."""
        return [self.stopped] * len(rows)


class StopStrings:
    """generate's `stopping` hook for a batch: row b stops once its decoded text contains a stop string."""

    def __init__(self, tokenizer, stop_strings) -> None:
        self.tokenizer, self.stop_strings = tokenizer, [s for s in stop_strings if s]

    def __call__(self, rows: list[list[int]]) -> list[bool]:
        out = []
        for ids in rows:
            text = self.tokenizer.decode(ids)
            out.append(any(s in text for s in self.stop_strings))
        return out

    def trim(self, text: str) -> str:
        hits = [text.find(s) for s in self.stop_strings if s in text]
        return text[: min(hits)] if hits else text
