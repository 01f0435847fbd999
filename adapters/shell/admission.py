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

import contextlib
from collections.abc import AsyncIterator

import anyio


class Admission:
    def __init__(self, concurrency: int) -> None:
        self._limiter = anyio.CapacityLimiter(max(1, concurrency))
        #: Handshakes waiting for a slot / being admitted (metrics and leak checks).
        self.waiting = 0
        self.admitted = 0

    @property
    def concurrency(self) -> int:
        return int(self._limiter.total_tokens)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait for a slot (FIFO), then hold it for the block."""
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
        try:
            yield
        finally:
            self.admitted -= 1
            self._limiter.release()
