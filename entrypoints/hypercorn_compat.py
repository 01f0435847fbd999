"""The one place where we adjust Hypercorn's behaviour.

Hypercorn accepts permessage-deflate whenever a client offers it and has no setting
to turn it off (pgjones/hypercorn#307); headers given in ``websocket.accept`` only
append. PROTOCOL section 1 forbids negotiating it, and a compressed message would be
inflated in memory before any size check. We therefore make Hypercorn's handshake
ignore the client's ``Sec-WebSocket-Extensions`` offer, so the response carries no
extension header and wsproto runs without extensions (a compressed frame is then a
protocol error). The patch is narrow: one method, guarded, idempotent, and covered by
``tests/blackbox/test_transport.py`` with a client that offers the extension.

Second, Hypercorn's ``WSStream._handle_events`` stops iterating wsproto's events once
a message exceeds ``websocket_max_message_size``: it sends close 1009 and *breaks*,
dropping the events that arrived in the same read, among them the client's answering
close frame. The closing handshake then never completes, the app is never told, and
the client waits for its close timeout. Our version keeps iterating, discards the
rest of the oversized message, and handles pings and the close as usual.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hypercorn.protocol import ws_stream
from hypercorn.protocol.events import StreamClosed
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Message, Ping
from wsproto.frame_protocol import CloseReason

_PATCHED = "_gateway_no_extensions"


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


def complete_close_after_oversized_message() -> None:
    stream_cls: Any = ws_stream.WSStream
    if getattr(stream_cls, _PATCHED, False):
        return

    async def _handle_events(self: Any) -> None:
        for event in self.connection.events():
            if isinstance(event, Message):
                if getattr(self, "_gateway_too_big", False):
                    continue  # the rest of a message we already refused
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
                if self.connection.state == ConnectionState.REMOTE_CLOSING:
                    await self._send_wsproto_event(event.response())
                await self.send(StreamClosed(stream_id=self.stream_id))

    stream_cls._handle_events = _handle_events
    setattr(stream_cls, _PATCHED, True)


def apply() -> None:
    """Every adjustment above (idempotent)."""
    disable_websocket_extensions()
    complete_close_after_oversized_message()
