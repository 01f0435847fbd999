"""A :class:`domain.ports.Transport` over a raw ASGI WebSocket.

The server (Hypercorn) assembles fragmented messages and enforces its own limit in
characters; here the assembled message is checked in UTF-8 bytes against
``GATEWAY_MAX_PAYLOAD_BYTES`` (PROTOCOL section 1), binary frames included.

The gateway's endpoint hands the ASGI ``receive`` and ``send`` straight to
:class:`AsgiTransport`: no Starlette ``WebSocket`` wrapper (its state checks and
coroutine frames) on the path of every frame. The transport keeps the one piece of
state it needs: whether the socket is still open for sending.

Three ASGI scope extensions of our Hypercorn adjustment (``entrypoints.hypercorn_compat``)
are used when present: ``"gateway.abort"`` (drop the TCP connection), ``"gateway.send_texts"``
(a batch in one write) and ``"gateway.write_texts"`` (the same batch written at once,
without awaiting anything, or refused when that could block). Under a server without
them, abort does nothing, batches go frame by frame, and nothing is written without
awaiting.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from starlette.websockets import WebSocket

from domain.ports import MessageTooBig, TransportClosed

#: The scope extensions under which the server offers an abort callable, a batched
#: send (``async (texts) -> None``) and a batched write now (``(texts) -> bool``).
ABORT_EXTENSION = "gateway.abort"
SEND_TEXTS_EXTENSION = "gateway.send_texts"
WRITE_TEXTS_EXTENSION = "gateway.write_texts"

Message = MutableMapping[str, Any]

_OPEN, _CLOSED, _GONE = 0, 1, 2  # sending allowed / we sent the close / peer gone


class AsgiTransport:
    __slots__ = ("_abort", "_max", "_receive", "_send", "_send_texts", "_state", "_write_texts")

    def __init__(
        self,
        scope: Message,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
        max_payload_bytes: int,
    ) -> None:
        self._receive = receive
        self._send = send
        self._max = max_payload_bytes
        self._state = _OPEN
        extensions = scope.get("extensions") or {}
        self._abort: Callable[[], None] | None = extensions.get(ABORT_EXTENSION)
        self._send_texts: Callable[[Sequence[str]], Awaitable[None]] | None = extensions.get(
            SEND_TEXTS_EXTENSION
        )
        self._write_texts: Callable[[Sequence[str]], bool] | None = extensions.get(
            WRITE_TEXTS_EXTENSION
        )

    async def receive(self) -> str | bytes:
        if self._state == _GONE:
            raise TransportClosed(None)
        message = await self._receive()
        kind = message["type"]
        if kind == "websocket.receive":
            text = message.get("text")
            if text is not None:
                # len(text) <= bytes <= 4 * len(text): encode only when it matters.
                if len(text) > self._max or (
                    len(text) * 4 > self._max
                    and len(text.encode("utf-8", "surrogatepass")) > self._max
                ):
                    raise MessageTooBig()
                return str(text)
            data = message.get("bytes") or b""
            if len(data) > self._max:
                raise MessageTooBig()
            return bytes(data)
        self._state = _GONE
        if kind == "websocket.disconnect":
            raise TransportClosed(message.get("code"))
        raise TransportClosed(None)

    async def send(self, text: str) -> None:
        if self._state != _OPEN:
            raise TransportClosed(None)
        try:
            await self._send({"type": "websocket.send", "text": text})
        except (RuntimeError, OSError) as exc:
            raise TransportClosed(None) from exc

    async def send_many(self, texts: Sequence[str]) -> None:
        """One write for the whole batch through the server's ``gateway.send_texts``
        extension (``entrypoints.hypercorn_compat``); frame by frame without it."""
        if self._send_texts is None:
            for text in texts:
                await self.send(text)
            return
        if self._state != _OPEN:
            raise TransportClosed(None)
        try:
            await self._send_texts(texts)
        except (RuntimeError, OSError) as exc:
            raise TransportClosed(None) from exc

    def try_send_many(self, texts: Sequence[str]) -> bool:
        """Write the batch now if that cannot block (``gateway.write_texts``); False,
        with nothing written, when it could (or the server cannot say)."""
        write = self._write_texts
        if write is None:
            return False
        if self._state != _OPEN:
            raise TransportClosed(None)
        try:
            return write(texts)
        except (RuntimeError, OSError) as exc:
            raise TransportClosed(None) from exc

    async def close(self, code: int, reason: str = "") -> None:
        if self._state != _OPEN:
            return
        self._state = _CLOSED
        try:
            await self._send({"type": "websocket.close", "code": code, "reason": reason})
        except (RuntimeError, OSError) as exc:
            raise TransportClosed(None) from exc

    def abort(self) -> None:
        if self._abort is not None:
            self._abort()


class StarletteTransport(AsgiTransport):
    """The same over an accepted Starlette ``WebSocket`` (its ASGI ``receive`` and
    ``send`` pass messages through)."""

    __slots__ = ()

    def __init__(self, websocket: WebSocket, max_payload_bytes: int) -> None:
        super().__init__(websocket.scope, websocket.receive, websocket.send, max_payload_bytes)
