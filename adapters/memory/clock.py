"""A clock that moves only when told to (tests of TTLs and deadlines)."""

from __future__ import annotations


class ManualClock:
    def __init__(self, start: float = 1_000.0, wall_epoch_ms: int = 1_700_000_000_000) -> None:
        self._now = start
        self._wall_epoch_ms = wall_epoch_ms

    def monotonic(self) -> float:
        return self._now

    def wall_ms(self) -> int:
        return self._wall_epoch_ms + int(self._now * 1000)

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time does not go back")
        self._now += seconds
