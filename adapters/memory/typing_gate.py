"""``SET key NX PX ttl`` in memory, on the injected clock."""

from __future__ import annotations

import heapq

from domain.ports import Clock


class MemoryTypingGate:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    async def claim(self, key: str, ttl_ms: int) -> bool:
        now = self._clock.monotonic()
        self._purge(now)
        if key in self._expiry:
            return False
        expires = now + ttl_ms / 1000.0
        self._expiry[key] = expires
        heapq.heappush(self._heap, (expires, key))
        return True

    def _purge(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            expires, key = heapq.heappop(heap)
            if self._expiry.get(key) == expires:
                del self._expiry[key]

    def live_keys(self) -> set[str]:
        """Keys not yet expired (for tests and the simulation's leak checks)."""
        self._purge(self._clock.monotonic())
        return set(self._expiry)
