"""A scripted fake gateway for client tests: a real WebSocket server (``websockets``)
whose connections are handed to the test, which then plays the server's side frame by
frame (:class:`Peer`). Used for what today's gateway cannot do (RESUMED,
INVALID_SESSION) and for what a broken one does (garbage, gaps, no ACKs, drops)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from entrypoints.client import ClientEvent, GatewayClient

WAIT = 5.0
Frame = dict[str, Any]
E = TypeVar("E")


class Peer:
    """The server side of one client connection."""

    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws
        #: Answer HEARTBEAT with HEARTBEAT_ACK (and skip it) while reading.
        self.auto_ack = True
        self.heartbeats = 0

    async def send(self, op: str, d: Any = None, s: int | None = None) -> None:
        frame: Frame = {"op": op, "d": d}
        if s is not None:
            frame["s"] = s
        await self.ws.send(json.dumps(frame))

    async def send_raw(self, raw: str | bytes) -> None:
        await self.ws.send(raw)

    async def hello(self, interval_ms: float = 60_000, session_id: str = "hello-session") -> None:
        await self.send("HELLO", {"heartbeatInterval": interval_ms, "sessionId": session_id})

    async def ready(self, session_id: str, user_id: str = "u1", status: str = "online") -> None:
        user = {
            "id": user_id,
            "username": "alice",
            "displayName": "Alice",
            "avatarUrl": None,
            "status": status,
        }
        await self.send("READY", {"sessionId": session_id, "user": user, "servers": []}, s=1)

    async def recv(self) -> Frame:
        """The next client frame (heartbeats answered and skipped when ``auto_ack``)."""
        while True:
            raw = await asyncio.wait_for(self.ws.recv(), WAIT)
            frame = json.loads(raw)
            assert isinstance(frame, dict), raw
            if frame.get("op") == "HEARTBEAT":
                self.heartbeats += 1
                if self.auto_ack:
                    await self.send("HEARTBEAT_ACK")
                    continue
            return frame

    async def ack_heartbeats(self, count: int) -> None:
        """Read and ACK until ``count`` heartbeats in all have come (nothing else may)."""
        while self.heartbeats < count:
            frame = json.loads(await asyncio.wait_for(self.ws.recv(), WAIT))
            assert frame["op"] == "HEARTBEAT", frame
            self.heartbeats += 1
            await self.send("HEARTBEAT_ACK")

    async def expect(self, op: str) -> Any:
        frame = await self.recv()
        assert frame["op"] == op, f"expected {op}, got {frame}"
        return frame.get("d")

    async def until_closed(self) -> tuple[int | None, list[Frame]]:
        """Read until the client closes: its close code (None: no close frame) and the
        frames it sent meanwhile (heartbeats not included)."""
        frames: list[Frame] = []
        try:
            while True:
                frames.append(await self.recv())
        except ConnectionClosed as exc:
            return (exc.rcvd.code if exc.rcvd is not None else None), frames

    async def close(self, code: int, reason: str = "") -> None:
        await self.ws.close(code, reason)

    def abort(self) -> None:
        """Drop the TCP connection without a close frame."""
        self.ws.transport.abort()


class FakeGateway:
    def __init__(self) -> None:
        self.peers: asyncio.Queue[Peer] = asyncio.Queue()
        self.connections = 0
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/gateway"

    async def handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        await self.peers.put(Peer(ws))
        await ws.wait_closed()

    async def accept(self) -> Peer:
        return await asyncio.wait_for(self.peers.get(), WAIT)


@pytest.fixture
async def fake() -> AsyncIterator[FakeGateway]:
    gateway = FakeGateway()
    async with serve(gateway.handler, "127.0.0.1", 0, ping_interval=None) as server:
        gateway.port = next(iter(server.sockets)).getsockname()[1]
        yield gateway


@pytest.fixture
async def fake2() -> AsyncIterator[FakeGateway]:
    gateway = FakeGateway()
    async with serve(gateway.handler, "127.0.0.1", 0, ping_interval=None) as server:
        gateway.port = next(iter(server.sockets)).getsockname()[1]
        yield gateway


async def next_event(client: GatewayClient) -> ClientEvent:
    return await asyncio.wait_for(client.__anext__(), WAIT)


async def next_of(client: GatewayClient, kind: type[E]) -> E:
    """The next event of this type (earlier events of other types are skipped)."""
    while True:
        event = await next_event(client)
        if isinstance(event, kind):
            return event
