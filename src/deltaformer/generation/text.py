"""Token ids to streamed text: incremental decoding and stop strings.

Decoding token by token is wrong for byte-level BPE (one character can span tokens, and a tokenizer may
merge spaces differently at a boundary), so :class:`IncrementalText` decodes everything generated so far
and hands out only the new, stable part: it holds back a trailing partial UTF-8 character (U+FFFD) and any
tail that could still become a stop string. The same object says when a stop string has appeared, and cuts
the text there, so streamed pieces never show a stop string or anything after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalText:
    """``push(token) -> piece``: the text to show now for a growing list of generated ids."""

    def __init__(self, tokenizer: Any, stop_strings: Sequence[str] | None = None,
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings or ())
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.shown = 0  # characters of the decoded text already handed out
        self.stopped = False
        self._text = ""

    @property
    def text(self) -> str:
        """The decoded text so far, cut before a stop string once one appeared."""
        return self._text

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token: int) -> str:
        """Add ``token``; the new text that is safe to show (may be empty)."""
        if self.stopped:
            return ""
        self.ids.append(int(token))
        text = self._decode()
        cut = self._stop_at(text)
        if cut is not None:
            self.stopped = True
            self._text = text[:cut]
            return self._take(self._text)
        self._text = text
        stable = len(text)
        if text.endswith(REPLACEMENT):  # a character still missing its last bytes
            stable = len(text.rstrip(REPLACEMENT))
        stable = min(stable, self._hold_back(text))
        return self._take(text[:stable])

    def flush(self) -> str:
        """Whatever is still held back (generation ended)."""
        return self._take(self._text)

    def _take(self, upto: str) -> str:
        piece = upto[self.shown:]
        self.shown = max(self.shown, len(upto))
        return piece

    def _stop_at(self, text: str) -> int | None:
        """Index of the first stop string in ``text`` (searching only what was not yet checked), or None."""
        found = [i for i in (text.find(s, max(0, self.shown - len(s))) for s in self.stop_strings) if i >= 0]
        return min(found) if found else None

    def _hold_back(self, text: str) -> int:
        """Length of ``text`` that cannot be the beginning of a stop string still being written."""
        keep = len(text)
        for stop in self.stop_strings:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if stop.startswith(text[-n:]):
                    keep = min(keep, len(text) - n)
                    break
        return keep
