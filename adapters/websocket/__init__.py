"""The WebSocket transport over raw ASGI (and over a Starlette WebSocket)."""

from adapters.websocket.transport import AsgiTransport, StarletteTransport

__all__ = ["AsgiTransport", "StarletteTransport"]
