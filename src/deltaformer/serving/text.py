"""Token ids to the text a client receives, one token at a time, with OpenAI's stop-string rule.

OpenAI's answers never contain the stop string that ended them, and a stream cannot take text back once
sent, so text that might be the start of a stop string is held until the next token shows it is not. A token
that ends in the middle of a UTF-8 character decodes to U+FFFD; such text is held too, until the character is
complete, so a stream never carries a replacement character that the whole answer would not.
"""

from __future__ import annotations

from typing import Any


class TextStream:
    """Accumulates one sequence's new tokens and hands out the text that is safe to send."""

    def __init__(self, tokenizer: Any, stops: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in (stops or []) if s]
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the text that can go out now ("" while held). After a stop string is seen,
        :attr:`stopped` is true and nothing more is returned."""
        if self.stopped:
            return ""
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        self.text = text
        cut = self._first_stop()
        if cut is not None:
            self.stopped = True
            self.text = text[:cut]
            return self._take(cut)
        return self._take(len(text) - self._held())

    def finish(self) -> str:
        """The rest once the sequence has ended (held text was not a stop string after all)."""
        if self.stopped:
            return self._take(len(self.text))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = self._first_stop(text)
        self.text = text if cut is None else text[:cut]
        self.stopped = cut is not None
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self.sent:
            return ""
        piece = self.text[self.sent:end]
        self.sent = end
        return piece

    def _first_stop(self, text: str | None = None) -> int | None:
        text = self.text if text is None else text
        start = max(0, self.sent - max((len(s) for s in self.stops), default=0))
        found = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _held(self) -> int:
        """Length of the longest end of the text that begins some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.text)), best, -1):
                if self.text.endswith(stop[:n]):
                    best = n
                    break
        return best
