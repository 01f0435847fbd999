"""The one place where we adjust Hypercorn's behaviour (pinned: Hypercorn 0.18.x).

Every adjustment below replaces or wraps a *private* method of Hypercorn's asyncio
HTTP/1.1 WebSocket path (``TCPServer.run``, ``WSStream.handle``, ``app_send`` and
``_handle_events``). Private APIs change between releases (0.17 and 0.18 already
differ), so :func:`apply` refuses any Hypercorn outside :data:`SUPPORTED`, and
``pyproject.toml`` pins the same range. Each one is guarded, idempotent, and covered
by ``tests/blackbox/test_transport.py`` and ``tests/process/test_close_hygiene.py``.

1. **No permessage-deflate.** Hypercorn accepts the extension whenever a client
   offers it and has no setting to turn it off (pgjones/hypercorn#307); headers given
   in ``websocket.accept`` only append. PROTOCOL section 1 forbids negotiating it, and
   a compressed message would be inflated in memory before any size check. The
   handshake ignores the client's offer, so wsproto runs without extensions.

2. **The close after an oversized message completes.** ``WSStream._handle_events``
   sends close 1009 and *breaks* out of wsproto's events, dropping those that arrived
   in the same read, among them the client's answering close frame. Our loop keeps
   iterating and discards the rest of the oversized message.

3. **The client's close code reaches the app.** Hypercorn reports every client
   close as 1006 (and a server-started one as 1000). We record the code of the
   client's close frame (1005 when it had none) and hand that to the app in
   ``websocket.disconnect``; 1006 only when the TCP connection ended without one.

4. **Every close really closes** (PROTOCOL section 6). Hypercorn has no write
   deadline: a peer that stops reading keeps a writer blocked in ``drain()`` and,
   after ``close()``, the socket open until its buffer flushes, which is never.
   And an app that stops receiving after its close makes Hypercorn's reader block on
   the full app queue, so it never sees the client's close. Therefore:

   - once the app has sent ``websocket.close`` (or returned), the peer's further
     messages are read and discarded instead of queued for the app, and messages
     already queued for it are dropped, so the reader never blocks on the app again;
   - the app gets an abort path, the ASGI scope extension ``"gateway.abort"`` (a
     no-argument callable): it drops the TCP connection at once (``transport.abort``),
     whatever is buffered. Our transport calls it when its own close deadline passes;
   - as a backstop for an app that never calls it, the TCP connection is aborted
     :data:`close_timeout` seconds after the app's close, or after the app returned,
     if it is still open by then.

5. **One write per batch.** Hypercorn writes every ``websocket.send`` on its own:
   one wsproto frame, one ``write``, one ``drain`` and one lock per frame, which is
   most of the fan-out cost. The scope extension ``"gateway.send_texts"`` (an ``async
   (texts) -> None``) frames a whole batch (byte for byte as the stream's wsproto
   connection would: see ``_frames``, which falls back to wsproto itself otherwise) and
   hands it to Hypercorn as one ``Data`` event: one write, one drain, one lock, the
   same bytes on the wire. It raises ``ConnectionError`` once the stream is closing.

6. **A batch written without awaiting.** The scope extension ``"gateway.write_texts"``
   (a ``(texts) -> bool``) frames the batch the same way and writes it to the TCP
   transport at once, as ``TCPServer.protocol_send`` would, but only when that write
   could not have waited: nobody holds the server's send lock, and the transport's
   buffer is below its high-water mark (so ``drain()`` would return at once). Else it
   writes nothing and returns False: the caller then awaits ``gateway.send_texts``.
   One task can so write the batches of many connections without being held by a
   peer that stops reading. Over HTTP/2 (no TCP connection of its own) it is False.
"""

from __future__ import annotations

import asyncio
import contextvars
import struct
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from importlib import metadata
from typing import Any

from hypercorn.asyncio import tcp_server
from hypercorn.protocol import ws_stream
from hypercorn.protocol.events import Data, Request, StreamClosed
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Message, Ping, TextMessage
from wsproto.frame_protocol import CloseReason

#: Hypercorn releases whose private API the adjustments below were written against.
SUPPORTED = ("0.18.",)
#: Scope extension under which the app finds the abort callable.
ABORT_EXTENSION = "gateway.abort"
#: Scope extension under which the app finds the batched send.
SEND_TEXTS_EXTENSION = "gateway.send_texts"
#: Scope extension under which the app finds the batched write that never waits.
WRITE_TEXTS_EXTENSION = "gateway.write_texts"
#: Backstop: seconds after the app's close (or return) before the TCP connection is
#: aborted if still open. The serving code sets it from ``GATEWAY_CLOSE_TIMEOUT_MS``.
close_timeout = 2.0

_PATCHED = "_gateway_patched"
_ABNORMAL = CloseReason.ABNORMAL_CLOSURE.value  # 1006: the TCP connection just ended


class UnsupportedHypercorn(RuntimeError):
    """The installed Hypercorn is not one these adjustments were written for."""


class _TcpConnection:
    """The TCP connection under one ``TCPServer``: its writer and the backstop timer."""

    __slots__ = ("lock", "timer", "writer")

    def __init__(self, writer: asyncio.StreamWriter, lock: asyncio.Lock) -> None:
        self.writer = writer
        #: ``TCPServer.send_lock``: held by a write of Hypercorn's awaiting its drain.
        self.lock = lock
        self.timer: asyncio.TimerHandle | None = None

    def abort(self) -> None:
        """Drop the connection now, discarding unsent data (idempotent)."""
        self.writer.transport.abort()
        self.cancel_backstop()

    def arm_backstop(self, delay: float) -> None:
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(delay, self.abort)

    def cancel_backstop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


#: Set by ``TCPServer.run`` for its task; streams created there (and the app task,
#: which copies the context) find their TCP connection here.
_current: contextvars.ContextVar[_TcpConnection | None] = contextvars.ContextVar(
    "gateway_tcp_connection", default=None
)


def check_version() -> None:
    version = metadata.version("hypercorn")
    if not version.startswith(SUPPORTED):
        raise UnsupportedHypercorn(
            f"entrypoints.hypercorn_compat was written for Hypercorn {SUPPORTED}, "
            f"found {version}: check its private-API adjustments before widening the pin"
        )


def disable_websocket_extensions() -> None:
    handshake_cls: Any = ws_stream.Handshake
    if getattr(handshake_cls, _PATCHED, False):
        return
    original_accept = handshake_cls.accept

    def accept(
        self: Any, subprotocol: str | None, additional_headers: Iterable[tuple[bytes, bytes]]
    ) -> Any:
        self.extensions = None  # as if the client offered none
        return original_accept(self, subprotocol, additional_headers)

    handshake_cls.accept = accept
    setattr(handshake_cls, _PATCHED, True)


def track_tcp_connections() -> None:
    server_cls: Any = tcp_server.TCPServer
    if getattr(server_cls, _PATCHED, False):
        return
    original_run = server_cls.run

    async def run(self: Any) -> None:
        connection = _TcpConnection(self.writer, self.send_lock)
        _current.set(connection)
        try:
            await original_run(self)
        finally:
            connection.cancel_backstop()

    server_cls.run = run
    setattr(server_cls, _PATCHED, True)


def _stop_input(stream: Any) -> None:
    """The app has closed or returned: never queue anything for it again, and drop
    what is queued, which wakes a reader blocked on the full queue."""
    stream._gateway_closing = True
    queue = getattr(stream.app_put, "__self__", None)
    if isinstance(queue, asyncio.Queue):
        kept = []
        while not queue.empty():
            message = queue.get_nowait()
            if message.get("type") != "websocket.receive":
                kept.append(message)  # a disconnect already queued stays
        for message in kept:
            queue.put_nowait(message)


def _check_open(stream: Any) -> None:
    if (
        stream.closed
        or stream._gateway_closing
        or stream.state is not ws_stream.ASGIWebsocketState.CONNECTED
        or stream.connection.state is not ConnectionState.OPEN
    ):
        raise ConnectionError("the WebSocket is closing")


_TWO_BYTE = struct.Struct("!BBH").pack
_EIGHT_BYTE = struct.Struct("!BBQ").pack


def _frames(stream: Any, texts: Sequence[str]) -> bytes:
    """The wire bytes of ``texts`` as whole text messages, exactly as wsproto frames
    them (``FrameProtocol.send_data``): a server's frames are unmasked, and with no
    extension (adjustment 1) and no fragmented message under way they carry FIN,
    opcode 1 and the length, nothing else. Built here, not through wsproto's state
    checks and bytearrays per frame, which were a fifth of the fan-out's CPU."""
    proto = stream.connection._proto
    if proto.extensions or proto.client or proto._outbound_opcode is not None:
        send = stream.connection.send
        return b"".join([send(TextMessage(data=text)) for text in texts])
    parts: list[bytes] = []
    append = parts.append
    for text in texts:
        data = text.encode("utf-8")
        n = len(data)
        if n <= 125:
            append(bytes((0x81, n)))
        elif n <= 0xFFFF:
            append(_TWO_BYTE(0x81, 126, n))
        else:
            append(_EIGHT_BYTE(0x81, 127, n))
        append(data)
    return b"".join(parts)


async def _send_texts(stream: Any, texts: Sequence[str]) -> None:
    """Frame ``texts`` and hand them to Hypercorn as one write."""
    _check_open(stream)
    await stream.send(Data(stream_id=stream.stream_id, data=_frames(stream, texts)))


def _write_texts(stream: Any, texts: Sequence[str]) -> bool:
    """Frame ``texts`` and write them now if the write cannot wait; else False."""
    _check_open(stream)
    connection: _TcpConnection | None = stream._gateway_tcp
    if connection is None or connection.lock.locked():
        return False
    transport = connection.writer.transport
    if transport.is_closing():
        raise ConnectionError("the TCP connection is closing")
    if transport.get_write_buffer_size() >= transport.get_write_buffer_limits()[1]:
        return False  # over the high-water mark: drain() would wait
    transport.write(_frames(stream, texts))
    return True


def _arm_backstop(stream: Any) -> None:
    connection: _TcpConnection | None = stream._gateway_tcp
    if connection is not None:
        connection.arm_backstop(close_timeout)


def close_hygiene() -> None:
    stream_cls: Any = ws_stream.WSStream
    if getattr(stream_cls, _PATCHED, False):
        return
    original_handle = stream_cls.handle
    original_app_send = stream_cls.app_send

    async def handle(self: Any, event: Any) -> None:
        if isinstance(event, Request):
            self._gateway_closing = False
            self._gateway_app_done = False
            self._gateway_too_big = False
            self._gateway_close_code = None
            # One TCP connection per stream only over HTTP/1.x; never abort an h2
            # connection that other streams share.
            http1 = event.http_version in ("1.0", "1.1")
            self._gateway_tcp = _current.get() if http1 else None
            await original_handle(self, event)
            abort: Callable[[], None] | None = (
                self._gateway_tcp.abort if self._gateway_tcp is not None else None
            )
            if abort is not None:
                self.scope["extensions"][ABORT_EXTENSION] = abort
            self.scope["extensions"][SEND_TEXTS_EXTENSION] = partial(_send_texts, self)
            self.scope["extensions"][WRITE_TEXTS_EXTENSION] = partial(_write_texts, self)
        elif isinstance(event, StreamClosed):
            if self.closed:
                return
            self.closed = True
            if self.app_put is not None and not self._gateway_app_done:
                code = self._gateway_close_code
                if code is None:
                    code = (
                        CloseReason.NORMAL_CLOSURE.value
                        if self.state is ws_stream.ASGIWebsocketState.HTTPCLOSED
                        else _ABNORMAL
                    )
                await self.app_put({"type": "websocket.disconnect", "code": code})
        else:
            await original_handle(self, event)

    async def app_send(self: Any, message: Any) -> None:
        if message is None:
            self._gateway_app_done = True
            _stop_input(self)
            _arm_backstop(self)
        elif message.get("type") == "websocket.close" and (
            self.state is ws_stream.ASGIWebsocketState.CONNECTED
        ):
            _stop_input(self)
            _arm_backstop(self)
        await original_app_send(self, message)

    async def _handle_events(self: Any) -> None:
        for event in self.connection.events():
            if isinstance(event, Message):
                if self._gateway_closing or self._gateway_too_big:
                    continue  # after the app's close, or the rest of a refused message
                try:
                    self.buffer.extend(event)
                except ws_stream.FrameTooLargeError:
                    self._gateway_too_big = True
                    self.buffer.clear()
                    await self._send_wsproto_event(
                        CloseConnection(code=CloseReason.MESSAGE_TOO_BIG)
                    )
                    continue
                if event.message_finished:
                    await self.app_put(self.buffer.to_message())
                    self.buffer.clear()
            elif isinstance(event, Ping):
                await self._send_wsproto_event(event.response())
            elif isinstance(event, CloseConnection):
                if self._gateway_close_code is None:
                    self._gateway_close_code = int(event.code)
                if self.connection.state == ConnectionState.REMOTE_CLOSING:
                    await self._send_wsproto_event(event.response())
                await self.send(StreamClosed(stream_id=self.stream_id))

    stream_cls.handle = handle
    stream_cls.app_send = app_send
    stream_cls._handle_events = _handle_events
    setattr(stream_cls, _PATCHED, True)


def apply(*, close_timeout_s: float | None = None) -> None:
    """Every adjustment above (idempotent); ``close_timeout_s`` sets the backstop."""
    global close_timeout  # noqa: PLW0603 - one process-wide setting of Hypercorn's
    check_version()
    if close_timeout_s is not None:
        close_timeout = close_timeout_s
    disable_websocket_extensions()
    track_tcp_connections()
    close_hygiene()
