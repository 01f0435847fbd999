"""Virtual time for the simulation: both clocks of :class:`domain.ports.Clock` follow the
event loop's clock, which :mod:`simulation.loop` moves forward only when every task is waiting."""

from __future__ import annotations

import asyncio

#: The virtual epoch: 2023-11-14T22:13:20Z, the wall time at loop time 0.
EPOCH_MS = 1_700_000_000_000


class VirtualClock:
    """``monotonic`` is the loop time; ``wall_ms`` is a fixed epoch plus the loop time."""

    def __init__(self, epoch_ms: int = EPOCH_MS) -> None:
        self.epoch_ms = epoch_ms
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.monotonic = loop.time  # type: ignore[method-assign]  # one call less, same time

    def monotonic(self) -> float:
        loop = self._loop
        if loop is None:
            return 0.0
        return loop.time()

    def wall_ms(self) -> int:
        return self.epoch_ms + round(self.monotonic() * 1000)
