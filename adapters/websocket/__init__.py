"""The WebSocket transport over Starlette/ASGI."""

from adapters.websocket.transport import StarletteTransport

__all__ = ["StarletteTransport"]
