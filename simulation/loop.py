"""Virtual time: an asyncio event loop whose clock jumps to the next timer when nothing
is ready.

It replaces ``looptime`` (``noop_cycles=1``) with the same time semantics, so that a
seed gives the same run on either: the clock is an integer count of microseconds,
a jump moves it by ``round(timeout * 1e6)`` (plus one tick for a timeout under a
microsecond) after two idle cycles, and callbacks run in asyncio's order (the ready
queue in FIFO order, then the timers due, one batch per iteration). What it leaves
out is what virtual time never needs: no I/O is polled (the simulation has no
sockets; a thread or a socket would make the loop wait for real time), the idle
cycles are skipped when they would run nothing (no timer due within the clock's
resolution: nearly always), and executors are refused. Timers are kept in a heap of
``(when, handle)`` pairs, compared in C (the same order as asyncio's heap of handles,
whose ``<`` compares ``when`` only: on equal times both say "not less").

A loop where nothing is ready and no timer is set can never run again: it raises
:class:`Deadlock` instead of waiting forever.
"""

from __future__ import annotations

import asyncio
import heapq
from asyncio import events
from collections.abc import Callable
from concurrent.futures import Executor
from contextvars import Context, copy_context
from typing import TypeVar, TypeVarTuple, Unpack

#: asyncio's own constants (base_events): cleanup of cancelled timers, longest wait.
_MIN_SCHEDULED_TIMER_HANDLES = 100
_MIN_CANCELLED_TIMER_HANDLES_FRACTION = 0.5
_MAXIMUM_SELECT_TIMEOUT = 24 * 3600
#: Ticks per second of the virtual clock (looptime's default resolution, 1 µs).
TICKS = 1_000_000


_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")


class Deadlock(RuntimeError):
    """Nothing is ready and no timer is set: no task can ever run again."""


class _Handle(events.Handle):
    """``asyncio.Handle`` made without the debug-mode check of its ``__init__`` (the
    loop is never in debug mode when it makes one: see ``call_soon``)."""

    __slots__ = ()

    def __init__(
        self,
        callback: Callable[..., object],
        args: tuple[object, ...],
        loop: object,
        context: Context,
    ) -> None:
        self._context = context
        self._loop = loop
        self._callback = callback
        self._args = args
        self._cancelled = False
        self._repr = None
        self._source_traceback = None


class _TimerHandle(events.TimerHandle):
    """``asyncio.TimerHandle``, made as :class:`_Handle` is (same ordering, equality,
    cancellation: only ``__init__`` differs)."""

    __slots__ = ()

    def __init__(
        self,
        when: float,
        callback: Callable[..., object],
        args: tuple[object, ...],
        loop: object,
        context: Context,
    ) -> None:
        _Handle.__init__(self, callback, args, loop, context)  # type: ignore[arg-type]
        self._when = when
        self._scheduled = False


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time, starting at ``start`` seconds."""

    def __init__(self, start: float = 0.0) -> None:
        super().__init__()
        #: The clock in whole microseconds; ``time()`` is ``ticks / TICKS``.
        self.ticks = round(start * TICKS)
        self._now = self.ticks / TICKS
        self._timers: list[tuple[float, asyncio.TimerHandle]] = []
        #: looptime's idle-cycle count while nothing is ready (None: not idling)
        self._idle: int | None = None
        #: Counters of the run (what a jump of the clock saves is visible in them).
        self.iterations = 0
        self.callbacks = 0
        self.jumps = 0

    def time(self) -> float:
        return self._now

    def run_in_executor(
        self,
        executor: Executor | None,
        func: Callable[[Unpack[_Ts]], _T],
        *args: *_Ts,
    ) -> asyncio.Future[_T]:
        raise RuntimeError("virtual time refuses executors: a thread would wait for real time")

    def call_soon(
        self,
        callback: Callable[[Unpack[_Ts]], object],
        *args: *_Ts,
        context: Context | None = None,
    ) -> asyncio.Handle:
        """``BaseEventLoop.call_soon`` (every task step and future callback comes here)
        in one call: the same handle at the end of the ready queue."""
        if self._debug:  # type: ignore[attr-defined]
            return super().call_soon(callback, *args, context=context)
        if self._closed:  # type: ignore[attr-defined]
            raise RuntimeError("Event loop is closed")
        handle = _Handle(callback, args, self, copy_context() if context is None else context)
        self._ready.append(handle)  # type: ignore[attr-defined]
        return handle

    def call_at(
        self,
        when: float,
        callback: Callable[[Unpack[_Ts]], object],
        *args: *_Ts,
        context: Context | None = None,
    ) -> asyncio.TimerHandle:
        if when is None:
            raise TypeError("when cannot be None")
        self._check_closed()  # type: ignore[attr-defined]
        if self._debug:  # type: ignore[attr-defined]
            timer = events.TimerHandle(when, callback, args, self, context)
        else:
            timer = _TimerHandle(
                when, callback, args, self, copy_context() if context is None else context
            )
        heapq.heappush(self._timers, (when, timer))
        timer._scheduled = True  # type: ignore[attr-defined]
        return timer

    def close(self) -> None:
        super().close()
        self._timers.clear()

    def _jump(self, when: float) -> None:
        """looptime's step: to the timer, in whole ticks (one more under a tick)."""
        timeout = min(when - self._now, _MAXIMUM_SELECT_TIMEOUT)
        step = round(timeout * TICKS)
        if timeout < 1 / TICKS:
            step += 1
        self.ticks += step
        self._now = self.ticks / TICKS
        self.jumps += 1

    def _run_once(self) -> None:
        """One iteration, in the order of ``asyncio.BaseEventLoop._run_once``, with
        the clock moved forward instead of polling for I/O."""
        self.iterations += 1
        timers = self._timers
        count = len(timers)
        if (
            count > _MIN_SCHEDULED_TIMER_HANDLES
            and self._timer_cancelled_count / count  # type: ignore[has-type]
            > _MIN_CANCELLED_TIMER_HANDLES_FRACTION
        ):
            kept = []
            for entry in timers:
                if entry[1]._cancelled:
                    entry[1]._scheduled = False  # type: ignore[attr-defined]
                else:
                    kept.append(entry)
            heapq.heapify(kept)
            self._timers = timers = kept
            self._timer_cancelled_count = 0
        else:
            while timers and timers[0][1]._cancelled:
                self._timer_cancelled_count -= 1
                heapq.heappop(timers)[1]._scheduled = False  # type: ignore[attr-defined]

        ready = self._ready  # type: ignore[attr-defined]
        resolution = self._clock_resolution  # type: ignore[attr-defined]
        if ready or self._stopping:  # type: ignore[attr-defined]
            if self._idle is not None:
                self._idle = 0
        elif not timers:
            raise Deadlock("nothing is ready and no timer is set: no task can run again")
        elif timers[0][0] > self._now:
            # Nothing to run before the first timer. looptime spends two idle cycles
            # first, then jumps; an idle cycle runs only timers due within the clock's
            # resolution, so when there are none the cycles are skipped.
            if timers[0][0] >= self._now + resolution or self._idle == 1:
                self._idle = None
                self._jump(timers[0][0])
                while timers[0][0] >= self._now + resolution:  # a rounding stopped short
                    self._jump(timers[0][0])
            else:
                self._idle = 0 if self._idle is None else 1
        elif self._idle is not None:
            self._idle = 0

        end = self._now + resolution
        while timers and timers[0][0] < end:
            timer = heapq.heappop(timers)[1]
            timer._scheduled = False  # type: ignore[attr-defined]
            ready.append(timer)

        todo = len(ready)
        self.callbacks += todo
        popleft = ready.popleft
        for _ in range(todo):
            handle = popleft()
            if handle._cancelled:
                continue
            try:  # Handle._run, inlined
                handle._context.run(handle._callback, *handle._args)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self.call_exception_handler(
                    {
                        "message": f"Exception in callback {handle._callback!r}",
                        "exception": exc,
                        "handle": handle,
                    }
                )
