"""Real time: the event loop's clock for timers, the system clock for timestamps.

``monotonic`` reads the running event loop's time (``anyio.current_time``) so that
deadlines agree with ``anyio.sleep``; outside a loop it falls back to
``time.monotonic``, which is what asyncio's loop uses.
"""

from __future__ import annotations

import time

import anyio


class SystemClock:
    def monotonic(self) -> float:
        try:
            return anyio.current_time()
        except RuntimeError:
            return time.monotonic()

    def wall_ms(self) -> int:
        return time.time_ns() // 1_000_000
