"""Real time: the event loop's clock for timers, the system clock for timestamps.

``monotonic`` reads the running event loop's time so that deadlines agree with
``anyio.sleep``: on asyncio (the gateway's loop, uvloop included) straight from the
loop, which is what ``anyio.current_time`` returns there after looking the async
library up (several calls, and the shell reads the clock a few times per frame); on
another anyio backend through ``anyio.current_time``; outside a loop
``time.monotonic``, which is what asyncio's loop uses.
"""

from __future__ import annotations

import asyncio
import time

import anyio


class SystemClock:
    def monotonic(self) -> float:
        try:
            return asyncio.get_running_loop().time()
        except RuntimeError:  # not on asyncio
            pass
        try:
            return anyio.current_time()
        except RuntimeError:  # not in an event loop at all
            return time.monotonic()

    def wall_ms(self) -> int:
        return time.time_ns() // 1_000_000
