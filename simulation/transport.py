"""An in-memory client connection implementing :class:`domain.ports.Transport`.

No sockets: a socket would make the loop wait for real I/O and break virtual time.
The server side is the Transport the gateway serves; the client side is a few plain
methods the virtual client calls. Frames for the client are handed to its
:class:`Peer` synchronously inside :meth:`MemoryTransport.send` (a client that reads
at once), or buffered and then blocked on when the client stops reading (a slow
consumer: the gateway's sender stalls and its outbound queue grows).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Protocol

from domain.ports import TransportClosed

#: Close code a peer sees when the other side vanished without a close frame.
ABNORMAL = 1006
NORMAL = 1000


class Peer(Protocol):
    def on_frame(self, text: str) -> None:
        """One frame from the server, read by the client."""
        ...

    def on_server_close(self, code: int) -> None:
        """The server closed the connection with ``code``."""
        ...


class MemoryTransport:
    __slots__ = (
        "_blocked",
        "_client_gone",
        "_gone_code",
        "_inbox",
        "_loop",
        "_peer",
        "_server_closed",
        "_waiter",
        "capacity",
        "reading",
        "unread",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, peer: Peer, capacity: int = 16) -> None:
        self._loop = loop
        self._peer = peer
        self._inbox: deque[str] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._blocked: asyncio.Future[None] | None = None
        self._client_gone = False
        self._server_closed = False
        self._gone_code = ABNORMAL
        #: While False the client does not read: frames pile up in ``unread`` and then
        #: ``send`` blocks (TCP backpressure).
        self.reading = True
        self.unread: deque[str] = deque()
        self.capacity = capacity

    @property
    def open(self) -> bool:
        return not (self._client_gone or self._server_closed)

    # --- server side (domain.ports.Transport) ------------------------------------

    async def receive(self) -> str | bytes:
        while True:
            if self._inbox:
                return self._inbox.popleft()
            if self._client_gone or self._server_closed:
                raise TransportClosed(self._gone_code)
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    async def send(self, text: str) -> None:
        if self._client_gone or self._server_closed:
            raise TransportClosed(self._gone_code)
        if self.reading:
            self._peer.on_frame(text)
            return
        if len(self.unread) < self.capacity:
            self.unread.append(text)
            return
        blocked = self._blocked = self._loop.create_future()
        try:
            await blocked  # until the client goes away (or forever)
        finally:
            self._blocked = None
        raise TransportClosed(self._gone_code)

    async def send_many(self, texts: Sequence[str]) -> None:
        # Frame by frame, as send: a non-reader blocks mid-batch, as TCP does (a reading
        # client takes the frames without a coroutine per frame).
        on_frame = self._peer.on_frame
        for i, text in enumerate(texts):
            if self.reading and not (self._client_gone or self._server_closed):
                on_frame(text)
                continue
            for rest in texts[i:]:
                await self.send(rest)
            return

    def try_send_many(self, texts: Sequence[str]) -> bool:
        """All at once when the client reads, or when its unread buffer has room for
        the whole batch; else nothing (``send_many`` then blocks, as TCP does)."""
        if self._client_gone or self._server_closed:
            raise TransportClosed(self._gone_code)
        if self.reading:
            on_frame = self._peer.on_frame
            for text in texts:
                if self._client_gone or self._server_closed:  # went away mid-batch
                    raise TransportClosed(self._gone_code)
                on_frame(text)
            return True
        if len(self.unread) + len(texts) <= self.capacity:
            self.unread.extend(texts)
            return True
        return False

    async def close(self, code: int, reason: str = "") -> None:
        if self._client_gone or self._server_closed:
            return
        self._server_closed = True
        self._gone_code = code
        self._wake()
        self._peer.on_server_close(code)

    def abort(self) -> None:
        """The server drops the connection without a close frame (a close deadline
        passed): the client sees 1006."""
        if self._client_gone or self._server_closed:
            return
        self._server_closed = True
        self._gone_code = ABNORMAL
        self._wake()
        self._peer.on_server_close(ABNORMAL)

    # --- client side ----------------------------------------------------------

    def client_send(self, text: str) -> None:
        if self._client_gone or self._server_closed:
            return
        self._inbox.append(text)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def client_close(self, code: int = NORMAL) -> None:
        """The client goes away: a close (1000) or a drop without one (1006). Frames
        it sent before are still read by the server, then ``receive`` raises."""
        if self._client_gone or self._server_closed:
            return
        self._client_gone = True
        self._gone_code = code
        self.unread.clear()
        self._wake()

    def sever(self) -> None:
        """The server process died: both directions are gone, nobody is told."""
        self._client_gone = self._server_closed = True
        self._inbox.clear()
        self.unread.clear()
        self._wake()

    def _wake(self) -> None:
        for fut in (self._waiter, self._blocked):
            if fut is not None and not fut.done():
                fut.set_result(None)
