"""Incremental detokenization with stop strings: text is released as tokens come, except a
tail that could still grow into a stop string (or is half a UTF-8 character)."""
from __future__ import annotations

from typing import Callable, Sequence

REPLACEMENT = "\ufffd"  # what a byte-level decoder shows for a character still arriving


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()):
        self.decode, self.stops = decode, tuple(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0  # characters released

    def push(self, token: int) -> tuple[str, bool]:
        """(new text to release, whether a stop string ended the text)."""
        self.ids.append(token)
        text = self.decode(self.ids)
        if self.stops:
            # released text never holds a whole stop string, so one can start at sent - hold at the earliest
            start = max(0, self.sent - self.hold)
            hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                cut = max(min(hits), self.sent)
                out, self.sent = text[self.sent:cut], cut
                return out, True
        safe = len(text) - self.hold
        if text.endswith(REPLACEMENT):
            safe = min(safe, len(text) - 1)
        if safe <= self.sent:
            return "", False
        out, self.sent = text[self.sent:safe], safe
        return out, False

    def flush(self) -> str:
        """What was held back, at the end of a sequence that did not end on a stop string."""
        text = self.decode(self.ids)
        out, self.sent = text[self.sent:], len(text)
        return out


__all__ = ["TextStream"]
