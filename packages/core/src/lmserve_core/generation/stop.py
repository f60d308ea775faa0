"""Stop strings: cut the text at the first match, and hold back what might start one."""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """``include`` keeps the matched stop string in the text (vLLM's
    ``include_stop_str_in_output``); ``matched`` is the stop string that ended the text."""

    def __init__(self, stops: Sequence[str], *, include: bool = False) -> None:
        self.stops = [s for s in stops if s]
        self.include = include
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._buffer = ""
        self.matched: str | None = None

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def feed(self, text: str, *, check: bool = True) -> str:
        """Add generated text; return what is safe to send now. ``check=False`` passes the
        text through unmatched (vLLM looks for stop strings only after ``min_tokens``)."""
        if self.stopped or (not text and not self._buffer):
            return ""
        self._buffer += text
        if not self.stops or not check:
            out, self._buffer = self._buffer, ""
            return out
        found = [(i, s) for s in self.stops if (i := self._buffer.find(s)) >= 0]
        if found:
            first, stop = min(found, key=lambda hit: hit[0])
            self.matched = stop
            end = first + len(stop) if self.include else first
            out, self._buffer = self._buffer[:end], ""
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
