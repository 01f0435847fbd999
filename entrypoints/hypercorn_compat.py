"""The one place where we adjust Hypercorn's behaviour.

Hypercorn accepts permessage-deflate whenever a client offers it and has no setting
to turn it off (pgjones/hypercorn#307); headers given in ``websocket.accept`` only
append. PROTOCOL section 1 forbids negotiating it, and a compressed message would be
inflated in memory before any size check. We therefore make Hypercorn's handshake
ignore the client's ``Sec-WebSocket-Extensions`` offer, so the response carries no
extension header and wsproto runs without extensions (a compressed frame is then a
protocol error). The patch is narrow: one method, guarded, idempotent, and covered by
``tests/blackbox/test_transport.py`` with a client that offers the extension.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hypercorn.protocol import ws_stream

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
