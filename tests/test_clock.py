"""The real clock: the running loop's time inside a loop, time.monotonic outside."""

from __future__ import annotations

import asyncio
import time

import anyio

from adapters.clock import SystemClock


def test_monotonic_is_the_loop_time_inside_a_loop_and_time_monotonic_outside() -> None:
    clock = SystemClock()
    before = time.monotonic()
    assert before <= clock.monotonic() <= time.monotonic()

    async def inside() -> tuple[float, float, float]:
        await anyio.sleep(0.01)
        return anyio.current_time(), clock.monotonic(), anyio.current_time()

    for first, ours, last in (
        asyncio.run(inside()),
        anyio.run(inside, backend_options={"use_uvloop": True}),
    ):
        assert first <= ours <= last, "the loop's own clock, as anyio.sleep uses it"
    assert clock.wall_ms() // 1000 in range(int(time.time()) - 1, int(time.time()) + 2)
