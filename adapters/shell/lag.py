"""How long the instance was too busy to read its sockets: the heartbeat sweep's excuse.

The sweep closes a connection whose last HEARTBEAT is older than the timeout. When
the event loop is saturated (a reconnect storm, a burst of fan-out on two shared
cores), a client's HEARTBEATs sit unread in its socket while the clock runs, and the
sweep would close well-behaved clients with 4009 because the *gateway* was busy:
PROTOCOL 15 says it never does. So the sweep measures how late its own timer fired
(the loop's stall, as seen by one task that asked to run at a known time) and does
not count that time against clients: deadlines move by the stall time observed
within the last heartbeat timeout. A client that really went silent is still closed,
one stall later at most.
"""

from __future__ import annotations

from collections import deque

#: Lateness below this is scheduling noise, not a stall (and keeps virtual-time runs
#: exactly as they were: a timer there fires on time).
NOISE_S = 0.05


class LoopLag:
    def __init__(self, window: float) -> None:
        self._window = window
        self._stalls: deque[tuple[float, float]] = deque()  # (observed at, seconds)
        self.total = 0.0  #: stall seconds observed since start (metrics)

    def observe(self, now: float, late: float) -> None:
        """The sweep's timer, due ``late`` seconds before ``now``, fired now."""
        if late > NOISE_S:
            self._stalls.append((now, late))
            self.total += late
        self._forget(now)

    def recent(self, now: float) -> float:
        """Stall seconds observed within the window before ``now``."""
        self._forget(now)
        return sum(late for _, late in self._stalls)

    def _forget(self, now: float) -> None:
        while self._stalls and self._stalls[0][0] < now - self._window:
            self._stalls.popleft()
