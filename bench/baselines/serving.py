"""Serve a baseline ASGI app exactly like ``gateway serve`` serves the gateway:
Hypercorn with the gateway's own Hypercorn configuration, on uvloop, stopped by
SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from hypercorn.asyncio import serve as hypercorn_serve

from entrypoints.config import Config
from entrypoints.hypercorn_compat import disable_websocket_extensions
from entrypoints.serve import hypercorn_config


async def _serve(app: Any, host: str, port: int) -> None:
    disable_websocket_extensions()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    config = hypercorn_config(Config(host=host, port=port))
    await hypercorn_serve(app, config, shutdown_trigger=stop.wait)


def run(app: Any, host: str, port: int) -> None:
    """Blocking: serve ``app`` until SIGTERM/SIGINT (uvloop when available)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(_serve(app, host, port))
    else:
        uvloop.run(_serve(app, host, port))
