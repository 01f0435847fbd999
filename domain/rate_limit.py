"""The sliding-window rate limit of PROTOCOL 7a."""

from __future__ import annotations

from collections import deque


class SlidingWindow:
    """At most ``count`` events within any span of ``window`` seconds (7a): the
    timestamps of the last ``count`` accepted events, oldest first."""

    __slots__ = ("_stamps", "count", "window")

    def __init__(self, count: int, window: float) -> None:
        self.count = count
        self.window = window
        self._stamps: deque[float] = deque(maxlen=count)

    @property
    def stamps(self) -> tuple[float, ...]:
        return tuple(self._stamps)

    def merge(self, stamps: tuple[float, ...]) -> None:
        """Add another window's accepted stamps (a resumed session keeps its window)."""
        merged = sorted((*self._stamps, *stamps))
        self._stamps.clear()
        self._stamps.extend(merged)

    def admit(self, now: float) -> bool:
        stamps = self._stamps
        if len(stamps) == self.count and now - stamps[0] < self.window:
            return False
        stamps.append(now)
        return True
