"""Admission: the bounded per-instance queue IDENTIFY (and RESUME) go through.

PROTOCOL 15: a reconnect storm (thousands of IDENTIFY at once) must not turn into
thousands of backend calls at once, each timing out in a pool and closing its
connection 4000. Instead at most ``concurrency`` handshakes do their backend work at a
time; the rest wait in FIFO order, in their own connection's task and with no timer
running (the identify deadline stopped at the IDENTIFY frame; the backend deadline
starts once admitted). A connection that ends while queued leaves the queue: its task
is cancelled and the limiter forgets it.

:meth:`Admission.slot` is the one entry point: every handshake that needs the
backends (IDENTIFY today, RESUME when it exists) does its work inside it.
"""

from __future__ import annotations

from types import TracebackType

import anyio


class Admission:
    def __init__(self, concurrency: int) -> None:
        self._limiter = anyio.CapacityLimiter(max(1, concurrency))
        #: Handshakes waiting for a slot / being admitted (metrics and leak checks).
        self.waiting = 0
        self.admitted = 0
        self._slot = _Slot(self)

    @property
    def concurrency(self) -> int:
        return int(self._limiter.total_tokens)

    def slot(self) -> _Slot:
        """``async with admission.slot():`` waits for a slot (FIFO), then holds it for
        the block. (A plain context manager, not a generator: a handshake takes
        several slots, and each generator-based one cost an allocation and a frame.)"""
        return self._slot

    async def _acquire(self) -> None:
        limiter = self._limiter
        try:
            # A free slot with nobody waiting is taken without a trip through the event
            # loop (a handshake makes several of these; the queue stays FIFO: a slot is
            # never taken past a waiter).
            limiter.acquire_nowait()
        except anyio.WouldBlock:
            self.waiting += 1
            try:
                await limiter.acquire()
            finally:
                self.waiting -= 1
        self.admitted += 1

    def _release(self) -> None:
        self.admitted -= 1
        self._limiter.release()


class _Slot:
    """The context manager of :meth:`Admission.slot`: stateless (the limiter knows
    which task holds a slot), so one instance serves every caller."""

    __slots__ = ("_admission",)

    def __init__(self, admission: Admission) -> None:
        self._admission = admission

    async def __aenter__(self) -> None:
        await self._admission._acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._admission._release()
