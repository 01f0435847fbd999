"""The ceiling: the least a Redis-to-WebSocket broadcast on this stack can do.

A bare Starlette app on Hypercorn (served like the gateway, ``bench.baselines.serving``):
every WebSocket on ``/ws`` is accepted (no protocol, no auth) and gets a bounded
per-connection queue drained by its own sender task, like the gateway's connections.
One ``redis.asyncio`` subscriber reads the channel and appends each message, decoded
once, to every connection's queue. Nothing is parsed, stamped or checked.

    python -m bench.baselines.ceiling_app --port 8101 --redis-url redis://127.0.0.1:6379/14 \
        --channel ws:server:bench
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator

from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from bench.baselines import serving

#: Same bound as the gateway's default GATEWAY_OUTBOUND_MAX_FRAMES.
MAX_QUEUED = 2048


class Conn:
    __slots__ = ("dead", "queue", "wake", "ws")

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self.queue: deque[str] = deque()
        self.wake = asyncio.Event()
        self.dead = False

    def push(self, text: str) -> None:
        if self.dead:
            return
        if len(self.queue) >= MAX_QUEUED:  # slow consumer: drop it, like the gateway
            self.dead = True
            self.queue.clear()
        else:
            self.queue.append(text)
        self.wake.set()

    async def sender(self) -> None:
        queue = self.queue
        send = self.ws.send_text
        while not self.dead:
            while queue:
                await send(queue.popleft())
            self.wake.clear()
            await self.wake.wait()
        await self.ws.close(code=4010)


def create_app(redis_url: str, channel: str) -> Starlette:
    conns: set[Conn] = set()

    async def subscriber() -> None:
        async with Redis.from_url(redis_url) as redis, redis.pubsub() as pubsub:
            await pubsub.subscribe(channel)
            async for message in pubsub.listen():
                if message.get("type") != "message":
                    continue
                text = message["data"].decode()
                for conn in conns:
                    conn.push(text)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(subscriber())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def ws_endpoint(websocket: WebSocket) -> None:
        conn = Conn(websocket)
        conns.add(conn)  # before the upgrade completes: routed once the client sees it
        try:
            await websocket.accept()
            sender = asyncio.create_task(conn.sender())
            try:
                while True:
                    message = await websocket.receive()
                    if message["type"] == "websocket.disconnect":
                        break
            finally:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect,
                                         RuntimeError, OSError):
                    await sender
        finally:
            conns.discard(conn)

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    return Starlette(
        routes=[WebSocketRoute("/ws", ws_endpoint), Route("/healthz", healthz)],
        lifespan=lifespan,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--channel", required=True)
    args = parser.parse_args()
    serving.run(create_app(args.redis_url, args.channel), args.host, args.port)


if __name__ == "__main__":
    main()
