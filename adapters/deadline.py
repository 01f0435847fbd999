"""``fail_after`` for the per-operation backend deadlines, as a plain class.

Same contract as :func:`anyio.fail_after` (a cancel scope with a deadline ``delay``
seconds from now; :class:`TimeoutError` on leaving it if the deadline cancelled the
block), at a fraction of the cost on the hot paths (every publish, presence
transition, typing claim): anyio's version is a generator context manager wrapping
another one (``fail_after`` -> ``fail_at``) and looks the async backend up three
times per use. The cancel scope itself is anyio's own.

On asyncio the deadline is not a timer of its own either. A scope with a deadline
makes a loop timer on entry and cancels it on exit (about 2 of its 5.5 us), and
these deadlines almost never pass. Instead each loop keeps, per ``delay``, the
deadlines in the order they were set (which is the order they fall due, the loop's
clock never going back) and one timer, at the earliest deadline still running; when it
fires it cancels the scopes whose deadline has passed and sets itself for the next
one. A deadline left before its time only marks its entry (and lets go of its scope);
the entry is dropped when the timer comes by. Each scope is cancelled at its own
deadline, as anyio's would be; only the order among callbacks of the same instant can
differ from one timer per scope.

It sits beside the adapter packages, not in one of them, so that the shell and the
backend adapters (which must not know each other) can both use it.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from types import TracebackType

import anyio

__all__ = ["fail_after"]


class _Due:
    """One running deadline: its scope, and whether the deadline cancelled it."""

    __slots__ = ("at", "fired", "running", "scope")

    def __init__(self, at: float, scope: anyio.CancelScope) -> None:
        self.at = at
        self.scope: anyio.CancelScope | None = scope
        self.running = True
        self.fired = False


class _Deadlines:
    """The deadlines of one event loop, one queue (and at most one timer) per delay."""

    __slots__ = ("_loop", "_queues", "_timers")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queues: dict[float, deque[_Due]] = {}
        self._timers: dict[float, asyncio.TimerHandle] = {}

    def add(self, delay: float, scope: anyio.CancelScope) -> _Due:
        due = _Due(self._loop.time() + delay, scope)
        queue = self._queues.get(delay)
        if queue is None:
            queue = self._queues[delay] = deque()
        queue.append(due)
        if delay not in self._timers:
            self._timers[delay] = self._loop.call_at(due.at, self._fire, delay)
        return due

    def _fire(self, delay: float) -> None:
        queue = self._queues[delay]
        now = self._loop.time()
        while queue:
            due = queue[0]
            if due.running and due.at > now:
                self._timers[delay] = self._loop.call_at(due.at, self._fire, delay)
                return
            queue.popleft()
            if due.running and due.scope is not None:
                due.fired = True
                due.scope.cancel()
        del self._timers[delay]
        del self._queues[delay]


_deadlines: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Deadlines] = (
    weakref.WeakKeyDictionary()
)


def _of_running_loop() -> _Deadlines | None:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # another anyio backend: anyio's own deadline scope
        return None
    deadlines = _deadlines.get(loop)
    if deadlines is None:
        deadlines = _deadlines[loop] = _Deadlines(loop)
    return deadlines


class fail_after:  # noqa: N801 (named as the anyio function it replaces)
    __slots__ = ("_delay", "_due", "_scope")

    def __init__(self, delay: float) -> None:
        self._delay = delay

    def __enter__(self) -> anyio.CancelScope:
        deadlines = _of_running_loop()
        if deadlines is None:
            self._due = None
            scope = anyio.CancelScope(deadline=anyio.current_time() + self._delay)
        else:
            scope = anyio.CancelScope()
            self._due = deadlines.add(self._delay, scope)
        self._scope = scope
        return scope.__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:  # as contextlib's: mypy then reads a return in the block as final
        scope, due = self._scope, self._due
        if due is not None:
            due.running = False
            due.scope = None  # what the scope holds (its task) need not wait for the timer
        if not scope.__exit__(exc_type, exc, tb):
            return False
        # The scope swallowed its own cancellation: the deadline's, or an explicit cancel.
        if scope.cancelled_caught:
            if due is not None:
                if due.fired:
                    raise TimeoutError
            elif anyio.current_time() >= scope.deadline:
                raise TimeoutError
        return True
