"""Stop strings that may span chunk and token boundaries."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["StopMatcher"]


class StopMatcher:
    """Feed text, get back what is safe to emit.

    Text that could be the start of a stop string is held back until the next feed proves it
    is not; at the first full match everything from the match on is dropped. "First" is by
    where a match starts, as in the whole text: a complete match is acted on only once no
    longer stop string can still complete at an earlier position.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self._stops:
            return text
        buffer = self._held + text
        hit = self._first_match(buffer)
        pending = len(buffer) - self._longest_partial_suffix(buffer)  # may still become one
        if hit is not None and hit <= pending:
            self.stopped = True
            self._held = ""
            return buffer[:hit]
        self._held = buffer[pending:]
        return buffer[:pending]

    def _first_match(self, buffer: str) -> int | None:
        hits = [i for i in (buffer.find(s) for s in self._stops) if i >= 0]
        return min(hits) if hits else None

    def _longest_partial_suffix(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:size]):
                    best = size
                    break
        return best

    @property
    def held(self) -> str:
        """Text withheld so far (shown as part of a draft preview, never as committed)."""
        return self._held

    def flush(self) -> str:
        """The text held back, at the end of the text (cut at a match it holds)."""
        held, self._held = self._held, ""
        if self.stopped:
            return ""
        hit = self._first_match(held)
        if hit is not None:
            self.stopped = True
            return held[:hit]
        return held
