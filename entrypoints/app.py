"""The ASGI application: ``/ws/gateway``, ``/healthz``, ``/readyz``, ``/metrics``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import anyio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from adapters.shell import Gateway
from adapters.websocket import AsgiTransport
from entrypoints.bootstrap import build_gateway
from entrypoints.config import Config
from entrypoints.http_api import publish_route

GatewayFactory = Callable[[], AbstractAsyncContextManager[Gateway]]

WS_PATH = "/ws/gateway"


class GatewayApp(Starlette):
    """Starlette, with the gateway's WebSocket handed straight to its endpoint.

    Every other request goes through Starlette's middleware and router as usual. The
    WebSocket skips them: for a WebSocket they add nothing (the error middleware
    re-raises, no route raises WebSocketException) but half a dozen coroutine frames
    that every wake-up of the connection's reader resumes through, and their setup per
    connection (a measurable share of a handshake, docs/BENCHMARKS.md issue 13)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and _route_path(scope) == WS_PATH:
            await _serve_gateway(_gateway(self), scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def _route_path(scope: Scope) -> str:
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _gateway(app: Starlette) -> Gateway:
    gateway: Gateway = app.state.gateway
    return gateway


async def _serve_gateway(gateway: Gateway, scope: Scope, receive: Receive, send: Send) -> None:
    """The gateway's WebSocket on raw ASGI: no Starlette ``WebSocket`` per connection."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return  # gone before the handshake
    # Accept with no extensions (see entrypoints.hypercorn_compat) and no subprotocol.
    await send({"type": "websocket.accept"})
    await gateway.serve(AsgiTransport(scope, receive, send, gateway.settings.max_payload_bytes))


async def websocket_endpoint(websocket: WebSocket) -> None:
    """The route's endpoint (GatewayApp serves the path before routing; kept so that
    the route table lists it)."""
    gateway = _gateway(websocket.app)
    await _serve_gateway(gateway, websocket.scope, websocket.receive, websocket.send)


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


async def readyz(request: Request) -> Response:
    gateway = _gateway(request.app)
    snapshot = gateway.snapshot()
    checks: dict[str, bool] = {
        "running": snapshot.running and not snapshot.draining,
        "broker": snapshot.broker_healthy,
    }
    for name, ping in (("directory", gateway.directory.ping), ("presence", gateway.presence.ping)):
        ok = False
        with anyio.move_on_after(1.0):
            try:
                await ping()
                ok = True
            except Exception:
                ok = False
        checks[name] = ok
    status = 200 if all(checks.values()) else 503
    return JSONResponse({"ready": status == 200, "checks": checks}, status_code=status)


async def metrics(request: Request) -> Response:
    gateway = _gateway(request.app)
    snapshot = gateway.snapshot()
    for state, n in snapshot.states.items():
        gateway.metrics.connections.labels(state.value).set(n)
    gateway.metrics.outbound_queued.set(snapshot.outbound_queued)
    gateway.metrics.broker_up.set(1 if snapshot.broker_healthy else 0)
    stats = getattr(gateway.broker, "stats", None)
    outages = getattr(stats, "outages", None)
    if isinstance(outages, int):
        gateway.metrics.broker_outages.set(outages)
    return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def create_app(
    config: Config | None = None, gateway_factory: GatewayFactory | None = None
) -> Starlette:
    """The ASGI app. The gateway is built, run and closed by the app's lifespan."""
    cfg = config or Config.from_env()
    factory: GatewayFactory = gateway_factory or (lambda: build_gateway(cfg))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with factory() as gateway, anyio.create_task_group() as group:
            app.state.gateway = gateway
            await group.start(gateway.run)
            try:
                yield
            finally:
                with anyio.CancelScope(shield=True):
                    await gateway.drain()
                group.cancel_scope.cancel()

    return GatewayApp(
        routes=[
            WebSocketRoute(WS_PATH, websocket_endpoint),  # GatewayApp serves it directly
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
            publish_route(cfg),
        ],
        lifespan=lifespan,
    )
