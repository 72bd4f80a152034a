"""Stop strings, matched on detokenized text across chunk boundaries.

A stop string may arrive split over several deltas ("</" then "end>"), so text that could
still become the start of a stop string is held back until it either completes one (and
is dropped together with everything after it) or cannot anymore (and is released).
"""

from __future__ import annotations


class StopStringMatcher:
    """Filters one sample's text deltas; ``stopped`` turns true at the first stop string, and
    ``matched`` says which one it was."""

    __slots__ = ("_held", "_stops", "matched", "stopped")

    def __init__(self, stops: list[str]) -> None:
        self._stops = [stop for stop in stops if stop]
        self._held = ""
        self.stopped = False
        self.matched: str | None = None

    def feed(self, delta: str) -> str:
        """Returns the part of ``held + delta`` that is safe to emit now."""
        if self.stopped:
            return ""
        if not self._stops:
            return delta
        text = self._held + delta
        found = [(text.find(stop), stop) for stop in self._stops]
        cut, matched = min(((i, stop) for i, stop in found if i >= 0), default=(-1, None))
        if cut >= 0:
            self.stopped = True
            self.matched = matched
            self._held = ""
            return text[:cut]
        keep = self._longest_partial_stop(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """Releases held text at the end of the sample (it never completed a stop string)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _longest_partial_stop(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
