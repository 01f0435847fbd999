"""Serving with Hypercorn, with our own shutdown trigger.

Hypercorn never tells the app that it is shutting down, and its graceful wait ends
by cancelling handlers (clients would see 1011). So the signal handler is ours: on
SIGTERM/SIGINT the gateway drains first (RECONNECT, close 1001, bounded wait), and
only then is Hypercorn told to stop.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
from collections.abc import Callable

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig
from starlette.applications import Starlette

from adapters.shell import Gateway
from entrypoints import hypercorn_compat
from entrypoints.app import create_app
from entrypoints.config import Config

log = logging.getLogger("gateway.serve")


def hypercorn_config(config: Config, *, bind: str | None = None) -> HypercornConfig:
    hc = HypercornConfig()
    hc.bind = [bind or f"{config.host}:{config.port}"]
    hc.backlog = config.listen_backlog  # Hypercorn's default, 100, drops a storm's SYNs
    # Characters, not bytes: the byte limit is enforced by the transport; this bounds
    # memory at 4x the limit and gives the client its 1009 from the server itself.
    hc.websocket_max_message_size = config.gateway.max_payload_bytes
    hc.graceful_timeout = 5.0
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.websocket_ping_interval = None
    return hc


def bind_socket(
    host: str, port: int, *, backlog: int = 2048, reuse_port: bool = False
) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    sock.set_inheritable(True)
    return sock


async def serve_app(
    app: Starlette,
    config: Config,
    *,
    bind: str | None = None,
    stop: asyncio.Event | None = None,
    install_signal_handlers: bool = True,
    on_started: Callable[[], None] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set), draining the gateway first."""
    hypercorn_compat.apply(close_timeout_s=config.gateway.close_timeout_ms / 1000)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    if install_signal_handlers:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

    async def shutdown_trigger() -> None:
        if on_started is not None:
            on_started()
        await stop.wait()
        gateway: Gateway | None = getattr(app.state, "gateway", None)
        if gateway is not None:
            log.info("draining %d connections", len(gateway.snapshot().connections))
            await gateway.drain()

    try:
        await hypercorn_serve(
            app,  # type: ignore[arg-type]  # Starlette is an ASGI app; the types differ
            hypercorn_config(config, bind=bind),
            shutdown_trigger=shutdown_trigger,
        )
    finally:
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)


#: Python's cyclic collector, for a process that holds thousands of connections. With
#: the default (700, 10, 10) a full collection, which walks every live object, ran
#: every few hundred handshakes while a storm grew the heap, and took about a third of
#: the process's CPU (bench/profile_handshake.py, measured with gc.callbacks: 5.2 s of
#: GC in 17.8 s of CPU for 3,900 handshakes; 2.1 s in 11.4 s with these). Only the
#: youngest generation's threshold is raised: cycles still go within 50,000
#: allocations, and a full collection still needs the heap to have grown by a quarter.
#: (10,000, 10, 10) before: a handshake's objects still in flight at a young collection
#: were promoted and walked again by the middle one, whose collections took ~30 ms each
#: at 4,000 connections; with (50,000, 20, 10) a handshake costs 0.91x the CPU
#: (profile_handshake.py --baseline, 2026-12-03).
GC_THRESHOLD = (50_000, 20, 10)


def tune_gc() -> None:
    """Collect what startup left, freeze the survivors (modules, the app: never walked
    again) and set :data:`GC_THRESHOLD`. Called once by :func:`run`, before serving."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def run(config: Config, *, bind: str | None = None) -> None:
    """Blocking entry of ``gateway serve`` for one instance (uvloop when available)."""
    app = create_app(config)
    tune_gc()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        asyncio.run(serve_app(app, config, bind=bind))
    else:
        uvloop.run(serve_app(app, config, bind=bind))
