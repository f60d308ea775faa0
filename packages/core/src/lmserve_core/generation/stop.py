"""Stop strings: cut the text at the first match, and hold back what might start one."""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._buffer = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add generated text; return what is safe to send now."""
        if self.stopped or (not text and not self._buffer):
            return ""
        self._buffer += text
        if not self.stops:
            out, self._buffer = self._buffer, ""
            return out
        first = min((i for i in (self._buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if first >= 0:
            self.stopped = True
            out, self._buffer = self._buffer[:first], ""
            return out
        # Hold back only a tail that is a prefix of some stop string.
        keep = 0
        for n in range(min(self._hold, len(self._buffer)), 0, -1):
            tail = self._buffer[-n:]
            if any(s.startswith(tail) for s in self.stops):
                keep = n
                break
        out = self._buffer[: len(self._buffer) - keep]
        self._buffer = self._buffer[len(self._buffer) - keep :]
        return out

    def flush(self) -> str:
        out, self._buffer = ("" if self.stopped else self._buffer), ""
        return out
