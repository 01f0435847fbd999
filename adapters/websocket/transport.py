"""A :class:`domain.ports.Transport` over a Starlette WebSocket (raw ASGI messages).

The server (Hypercorn) assembles fragmented messages and enforces its own limit in
characters; here the assembled message is checked in UTF-8 bytes against
``GATEWAY_MAX_PAYLOAD_BYTES`` (PROTOCOL section 1), binary frames included.

:meth:`StarletteTransport.abort` uses the ASGI scope extension ``"gateway.abort"``
that our Hypercorn adjustment provides (``entrypoints.hypercorn_compat``); under a
server without it, abort does nothing and the server's own timeouts apply.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.websockets import WebSocket, WebSocketState

from domain.ports import MessageTooBig, TransportClosed

#: The scope extension under which the server offers an abort callable.
ABORT_EXTENSION = "gateway.abort"


class StarletteTransport:
    __slots__ = ("_max", "_ws")

    def __init__(self, websocket: WebSocket, max_payload_bytes: int) -> None:
        self._ws = websocket
        self._max = max_payload_bytes

    async def receive(self) -> str | bytes:
        try:
            message = await self._ws.receive()
        except RuntimeError as exc:  # receive after disconnect
            raise TransportClosed(None) from exc
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
        if kind == "websocket.disconnect":
            raise TransportClosed(message.get("code"))
        raise TransportClosed(None)

    async def send(self, text: str) -> None:
        if self._ws.application_state is not WebSocketState.CONNECTED:
            raise TransportClosed(None)
        try:
            await self._ws.send({"type": "websocket.send", "text": text})
        except (RuntimeError, OSError) as exc:
            raise TransportClosed(None) from exc

    async def close(self, code: int, reason: str = "") -> None:
        if self._ws.application_state is WebSocketState.DISCONNECTED:
            return
        try:
            await self._ws.send({"type": "websocket.close", "code": code, "reason": reason})
        except (RuntimeError, OSError) as exc:
            raise TransportClosed(None) from exc

    def abort(self) -> None:
        extensions = self._ws.scope.get("extensions") or {}
        abort: Callable[[], None] | None = extensions.get(ABORT_EXTENSION)
        if abort is not None:
            abort()
