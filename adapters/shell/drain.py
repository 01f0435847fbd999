"""Admission and drain: which connections an instance lets in, and how it lets them
go when it shuts down.

A new connection beyond ``max_connections`` gets HELLO, then 4013. A drain refuses
new connections (RECONNECT, then 1001), tells every open one to RECONNECT and closes
it with 1001, shortens this instance's presence liveness to the grace (so that users
reconnecting elsewhere never flap offline), and waits, bounded, for all to go.
While draining, presence is neither kept alive nor closed per session.
"""

from __future__ import annotations

import anyio

from adapters.shell.connection import Connection
from adapters.shell.presence import PresenceKeeper
from domain.codec import RECONNECT_FRAME, CloseCode


class Drain:
    def __init__(self, presence: PresenceKeeper, max_connections: int) -> None:
        self._presence = presence
        self._cap = max_connections
        self.connections: set[Connection] = set()
        self.draining = False
        self._idle = anyio.Event()
        self._idle.set()
        #: Set once the (single) drain of this instance has finished.
        self._drained: anyio.Event | None = None

    def admit(self, conn: Connection) -> None:
        """Register a new connection, or queue its refusal (it still gets HELLO)."""
        if self.draining:
            conn.enqueue(RECONNECT_FRAME)
            conn.request_close(CloseCode.GOING_AWAY, "server shutting down")
        elif self._cap and len(self.connections) >= self._cap:
            conn.request_close(CloseCode.TOO_MANY_CONNECTIONS, "too many connections")
        self.connections.add(conn)
        if self._idle.is_set():
            self._idle = anyio.Event()

    def left(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if not self.connections:
            self._idle.set()

    async def drain(self, timeout: float) -> None:
        """Runs once per instance (serve.py and the lifespan both ask): a second call
        waits for the first to finish."""
        if self._drained is not None:
            await self._drained.wait()
            return
        self._drained = anyio.Event()
        try:
            await self._drain(timeout)
        finally:
            self._drained.set()

    async def _drain(self, timeout: float) -> None:
        self.draining = True
        await self._presence.expire_soon()
        for conn in list(self.connections):
            conn.enqueue(RECONNECT_FRAME)
            conn.request_close(CloseCode.GOING_AWAY, "server shutting down")
        with anyio.move_on_after(timeout):
            await self._idle.wait()
