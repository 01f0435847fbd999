"""A minimal WebSocket client connection: wsproto (sans-IO) over an anyio byte stream.

wsproto comes with Hypercorn, so the client needs no extra dependency, and anyio
keeps it free of any one event loop. Only what the gateway protocol needs is here:
text and binary messages (assembled, with a size cap), ping answered with pong, and
a close handshake that always ends within its deadline.
"""

from __future__ import annotations

import contextlib
import ssl
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

import anyio
import anyio.abc
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Message,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

#: Close code recorded when the TCP connection ended without a close frame.
ABNORMAL_CLOSURE = 1006


class HandshakeError(OSError):
    """The WebSocket upgrade failed (HTTP status other than 101, or a broken reply)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class WebSocketClosed(Exception):
    """The connection is closed: ``code`` is the peer's close code (1006: no close frame)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"WebSocket closed (code={code}, reason={reason!r})")
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    target: str
    tls: bool
    netloc: str

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss"):
            raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
        if not parts.hostname:
            raise ValueError(f"no host in URL: {url!r}")
        tls = parts.scheme == "wss"
        port = parts.port or (443 if tls else 80)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(parts.hostname, port, target, tls, parts.netloc)


class WebSocketConnection:
    """One open client WebSocket. ``receive`` is for one reader task; ``send`` may be
    called from any task (sends are serialised)."""

    def __init__(
        self, stream: anyio.abc.ByteStream, ws: WSConnection, max_message_bytes: int
    ) -> None:
        self._stream = stream
        self._ws = ws
        self._max = max_message_bytes
        self._send_lock = anyio.Lock()
        self._pending: deque[Event] = deque()
        self._closed: WebSocketClosed | None = None

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        timeout: float = 10.0,
        max_message_bytes: int = 16 << 20,
        ssl_context: ssl.SSLContext | None = None,
    ) -> WebSocketConnection:
        """Connect and complete the upgrade within ``timeout`` seconds."""
        endpoint = Endpoint.parse(url)
        stream: anyio.abc.ByteStream | None = None
        try:
            with anyio.fail_after(timeout):
                if endpoint.tls:
                    stream = await anyio.connect_tcp(
                        endpoint.host,
                        endpoint.port,
                        ssl_context=ssl_context or ssl.create_default_context(),
                        tls_hostname=endpoint.host,
                    )
                else:
                    stream = await anyio.connect_tcp(endpoint.host, endpoint.port)
                ws = WSConnection(ConnectionType.CLIENT)
                await stream.send(ws.send(Request(host=endpoint.netloc, target=endpoint.target)))
                conn = cls(stream, ws, max_message_bytes)
                await conn._handshake()
                return conn
        except BaseException:
            if stream is not None:
                await anyio.aclose_forcefully(stream)
            raise

    async def _handshake(self) -> None:
        while True:
            for event in self._ws.events():
                if isinstance(event, AcceptConnection):
                    return
                if isinstance(event, RejectConnection):
                    raise HandshakeError(
                        f"WebSocket upgrade refused: HTTP {event.status_code}", event.status_code
                    )
                if isinstance(event, RejectData):
                    continue
                self._pending.append(event)  # frames right after the 101 (HELLO)
            data = await self._read()
            if data is None:
                raise HandshakeError("connection closed during the WebSocket upgrade")
            self._ws.receive_data(data)

    async def _read(self) -> bytes | None:
        try:
            return await self._stream.receive(65536)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return None

    async def receive(self) -> str | bytes:
        """The next whole message; raises :class:`WebSocketClosed` once closed.
        Only one task may receive at a time."""
        parts: list[str | bytes] = []
        size = 0
        while True:
            if self._closed is not None:
                raise self._closed
            if not self._pending:
                self._pending.extend(self._ws.events())
            if not self._pending:
                data = await self._read()
                if data is None:
                    self._closed = WebSocketClosed(ABNORMAL_CLOSURE, "connection lost")
                    await anyio.aclose_forcefully(self._stream)
                    raise self._closed
                self._ws.receive_data(data)
                continue
            event = self._pending.popleft()
            if isinstance(event, Message):
                parts.append(event.data)
                size += len(event.data)
                if size > self._max:
                    self._closed = WebSocketClosed(1009, "message too big")
                    await self._send_bytes(self._ws.send(CloseConnection(1009, "too big")))
                    await anyio.aclose_forcefully(self._stream)
                    raise self._closed
                if event.message_finished:
                    if isinstance(event, TextMessage):
                        return "".join(p for p in parts if isinstance(p, str))
                    return b"".join(p for p in parts if isinstance(p, bytes))
            elif isinstance(event, Ping):
                await self._send_bytes(self._ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                if self._ws.state is ConnectionState.REMOTE_CLOSING:
                    await self._send_bytes(self._ws.send(event.response()))
                self._closed = WebSocketClosed(event.code, event.reason or "")
                await anyio.aclose_forcefully(self._stream)
                raise self._closed

    async def send(self, text: str) -> None:
        """Send one text message; raises :class:`WebSocketClosed` once closed."""
        if self._closed is not None or self._ws.state is not ConnectionState.OPEN:
            raise self._closed or WebSocketClosed(ABNORMAL_CLOSURE, "connection closing")
        async with self._send_lock:
            data = self._ws.send(TextMessage(data=text))
            try:
                await self._stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                self._closed = self._closed or WebSocketClosed(ABNORMAL_CLOSURE, "connection lost")
                raise self._closed from None

    async def _send_bytes(self, data: bytes) -> None:
        async with self._send_lock:
            # A lost connection is reported by the read side.
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                await self._stream.send(data)

    async def close(self, code: int = 1000, reason: str = "", timeout: float = 2.0) -> None:
        """Start the close handshake and wait (at most ``timeout``) for the peer's
        answer; the socket is closed when this returns, whatever the peer does."""
        with anyio.move_on_after(timeout, shield=True):
            if self._ws.state is ConnectionState.OPEN:
                await self._send_bytes(self._ws.send(CloseConnection(code=code, reason=reason)))
                if self._closed is None:
                    self._closed = WebSocketClosed(code, reason)
                while True:  # drain until the peer's close frame or EOF
                    data = await self._read()
                    if data is None:
                        break
                    self._ws.receive_data(data)
                    if any(isinstance(e, CloseConnection) for e in self._ws.events()):
                        break
        self._closed = self._closed or WebSocketClosed(code, reason)
        await anyio.aclose_forcefully(self._stream)

    async def abort(self) -> None:
        """Drop the TCP connection without a close frame."""
        self._closed = self._closed or WebSocketClosed(ABNORMAL_CLOSURE, "aborted")
        await anyio.aclose_forcefully(self._stream)
