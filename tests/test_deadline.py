"""adapters.deadline.fail_after: anyio.fail_after's contract, with the deadlines of
one loop kept per delay behind one timer (adapters/deadline.py)."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from adapters import deadline
from adapters.deadline import fail_after


def _run(main: object) -> None:
    asyncio.run(main)  # type: ignore[arg-type]


def test_a_passed_deadline_raises_timeout_at_its_own_time() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError), fail_after(0.05):
            await anyio.sleep(10)
        assert 0.05 <= loop.time() - started < 0.5

    _run(main())


def test_a_block_that_finishes_in_time_leaves_nothing_behind() -> None:
    async def main() -> None:
        for _ in range(100):
            with fail_after(0.05):
                await anyio.lowlevel.checkpoint()
        loop = asyncio.get_running_loop()
        await anyio.sleep(0.1)  # the one timer comes by, drops the entries and stops
        wheel = deadline._deadlines[loop]
        assert wheel._queues == {} and wheel._timers == {}

    _run(main())


def test_each_scope_is_cancelled_at_its_deadline_in_order() -> None:
    """Deadlines set one after the other fall due one after the other; a deadline left
    early cancels nothing later, and the timer goes on to the next one."""

    async def main() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        ended: list[tuple[str, float]] = []

        async def op(name: str, delay: float, work: float) -> None:
            try:
                with fail_after(delay):
                    await anyio.sleep(work)
                ended.append((name, loop.time() - t0))
            except TimeoutError:
                ended.append((name + " timed out", loop.time() - t0))

        async with anyio.create_task_group() as group:
            group.start_soon(op, "a", 0.1, 0.01)  # done early: its deadline passes idle
            await anyio.sleep(0.02)
            group.start_soon(op, "b", 0.1, 1.0)  # times out at about 0.12
            await anyio.sleep(0.02)
            group.start_soon(op, "c", 0.1, 0.05)  # done at about 0.09, in time
            group.start_soon(op, "d", 0.3, 1.0)  # another delay: its own queue
        return ended

    ended = asyncio.run(main())
    names = [name for name, _ in ended]
    assert names == ["a", "c", "b timed out", "d timed out"]
    at = dict(ended)
    assert 0.11 <= at["b timed out"] < 0.3
    assert 0.33 <= at["d timed out"] < 0.6


def test_an_explicit_cancel_is_not_a_timeout_and_nesting_keeps_the_inner_deadline() -> None:
    async def main() -> None:
        with fail_after(5) as scope:
            scope.cancel()
            await anyio.sleep(1)
        assert scope.cancelled_caught  # swallowed, and no TimeoutError
        with pytest.raises(TimeoutError), fail_after(5), fail_after(0.02):
            await anyio.sleep(1)
        outer_timed_out = False
        try:
            with fail_after(0.05):
                with anyio.CancelScope(shield=True):
                    await anyio.sleep(0.1)  # shielded: the deadline waits for it
                await anyio.lowlevel.checkpoint()
        except TimeoutError:
            outer_timed_out = True
        assert outer_timed_out

    _run(main())


def test_every_new_loop_gets_deadlines_of_its_own() -> None:
    async def main() -> None:
        with pytest.raises(TimeoutError), fail_after(0.01):
            await anyio.sleep(1)

    for _ in range(2):  # a fresh loop each time: its own deadlines
        anyio.run(main)
    anyio.run(main, backend_options={"use_uvloop": True})
