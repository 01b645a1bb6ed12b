"""Incremental detokenization: a request's text, grown as its tokens arrive.

Each call decodes only a short window of the newest ids (vLLM's prefix/read offsets): the text
of ids[prefix:] minus the text of ids[prefix:read] is what the new ids add, with the window's
head giving tokenizers that merge or strip spaces their left context. While the window's text
ends in U+FFFD (a multi-byte character split across byte-level tokens) nothing is released,
so streamed text never carries a broken character. At the end the full decode is used, so
the concatenation of the pieces equals `tokenizer.decode(all ids)`.

Stop strings are matched here (the engine works in tokens): the text is cut before the first
match, and while a request runs the last len(longest stop) - 1 characters are held back, since
they may be the start of a stop string.
"""
from __future__ import annotations

from typing import Iterable, Optional


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: Iterable[str] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0                  # window start: ids before it are already text
        self.read = 0                    # ids before it are in self.text
        self.text = ""
        self.emitted = 0                 # characters of self.text handed out by delta()
        self.stop = tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.stopped: Optional[str] = None   # the stop string that ended the text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def add(self, ids: Iterable[int]) -> bool:
        """Append token ids; True once a stop string has matched (the text ends before it)."""
        if self.stopped is not None:
            return True
        self.ids.extend(int(t) for t in ids)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return False
        self.prefix, self.read = self.read, len(self.ids)
        return self._extend(after[len(before):])

    def _extend(self, piece: str) -> bool:
        start = max(0, len(self.text) - self.hold)
        self.text += piece
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            i, s = min(hits)
            self.text = self.text[:i]
            self.stopped = s
            return True
        return False

    def finish(self) -> None:
        """The request ended without a stop string: take the full decode (a trailing broken
        character included, as `tokenizer.decode` gives it)."""
        if self.stopped is not None:
            return
        full = self._decode(self.ids)
        if full.startswith(self.text):          # else the tokenizer's decode is not prefix-stable:
            self._extend(full[len(self.text):])  # keep what was streamed

    def delta(self, final: bool = False) -> str:
        """Text not handed out yet (held back: a possible stop-string start, unless final)."""
        end = len(self.text) if (final or self.stopped is not None) else len(self.text) - self.hold
        if end <= self.emitted:
            return ""
        out = self.text[self.emitted:end]
        self.emitted = end
        return out
