"""The sliding-window rate limit of PROTOCOL 7a."""

from __future__ import annotations


class SlidingWindow:
    """At most ``count`` events within any span of ``window`` seconds (7a): the
    timestamps of the accepted events that may still decide, oldest first.

    A stamp at least ``window`` old can never refuse an event again (time only moves
    on), so it is dropped at the next event: an idle session keeps one or two stamps,
    not ``count`` (a list, which is small when it holds few)."""

    __slots__ = ("_stamps", "count", "window")

    def __init__(self, count: int, window: float) -> None:
        self.count = count
        self.window = window
        self._stamps: list[float] = []

    @property
    def stamps(self) -> tuple[float, ...]:
        return tuple(self._stamps)

    def merge(self, stamps: tuple[float, ...]) -> None:
        """Add another window's accepted stamps (a resumed session keeps its window)."""
        merged = sorted((*self._stamps, *stamps))
        self._stamps = merged[-self.count :] if len(merged) > self.count else merged

    def admit(self, now: float) -> bool:
        stamps = self._stamps
        window = self.window
        if stamps and now - stamps[0] >= window:
            gone = 1
            while gone < len(stamps) and now - stamps[gone] >= window:
                gone += 1
            del stamps[:gone]
        if len(stamps) >= self.count:
            return False  # ``count`` accepted within the window already
        stamps.append(now)
        return True
