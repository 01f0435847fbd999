"""In-process fakes for shell tests: a transport, a token verifier and a gateway on
the memory backends, all on the simulation's virtual-time loop (simulation.loop): a test
that waits 60 s of heartbeat timeout takes no real time, and nothing sleeps to let
something else happen."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from adapters.memory import (
    MemoryBrokerNetwork,
    MemoryDirectory,
    MemoryPresenceStore,
    MemoryTypingGate,
)
from adapters.shell import Backends, Gateway, GatewaySettings, make_gateway
from domain.model import UserId
from domain.ports import InvalidToken, TransportClosed
from entrypoints.config import demo_data
from simulation.clock import VirtualClock
from simulation.world import new_virtual_loop

#: What a client waits for, at most, in virtual seconds.
WAIT = 30.0


class FakeTokens:
    """``token:<user id>`` is valid; anything else is refused."""

    def verify(self, token: str, now: float) -> UserId:
        if not token.startswith("token:"):
            raise InvalidToken("not a test token")
        return token.removeprefix("token:")


class FakeTransport:
    """Both ends of one connection. The server side implements ``Transport``; the
    test drives the client side (``send``, ``recv``, ``drop``, ``stall``)."""

    def __init__(self) -> None:
        self._in_send, self._in_recv = anyio.create_memory_object_stream[str | bytes | None](64)
        self._out_send: MemoryObjectSendStream[dict[str, Any]]
        self._out_recv: MemoryObjectReceiveStream[dict[str, Any]]
        self._out_send, self._out_recv = anyio.create_memory_object_stream[dict[str, Any]](10_000)
        self.close_code: int | None = None
        self.client_code: int | None = None
        self.closed = anyio.Event()
        self._reading = anyio.Event()
        self._reading.set()

    # --- the server's side ------------------------------------------------------

    async def receive(self) -> str | bytes:
        item = await self._in_recv.receive()
        if item is None:
            # The TCP connection just went away, or the client's close with its code.
            raise TransportClosed(self.client_code)
        return item

    async def send(self, text: str) -> None:
        await self._reading.wait()  # a client that stopped reading blocks the sender
        self._out_send.send_nowait(json.loads(text))

    async def send_many(self, texts: Sequence[str]) -> None:
        for text in texts:
            await self.send(text)

    def try_send_many(self, texts: Sequence[str]) -> bool:
        if not self._reading.is_set():
            return False  # a client that stopped reading: the write would block
        for text in texts:
            self._out_send.send_nowait(json.loads(text))
        return True

    async def close(self, code: int, reason: str = "") -> None:
        self.close_code = code
        self.closed.set()
        self._in_send.send_nowait(None)  # the client answers the close at once

    def abort(self) -> None:
        self.closed.set()

    # --- the client's side ------------------------------------------------------

    async def send_op(self, op: str, d: Any = None) -> None:
        await self._in_send.send(json.dumps({"op": op, "d": d}))

    async def recv(self) -> dict[str, Any]:
        with anyio.fail_after(WAIT):
            return await self._out_recv.receive()

    async def expect(self, op: str) -> dict[str, Any]:
        frame = await self.recv()
        assert frame["op"] == op, frame
        return frame

    async def event(self) -> dict[str, Any]:
        """The next frame that is not a PRESENCE_UPDATE (others coming and going)."""
        while True:
            frame = await self.recv()
            if frame["op"] != "PRESENCE_UPDATE":
                return frame

    def pending(self) -> list[dict[str, Any]]:
        frames = []
        while True:
            try:
                frames.append(self._out_recv.receive_nowait())
            except anyio.WouldBlock:
                return frames

    def drop(self, code: int | None = None) -> None:
        """TCP loss (no code), or the client's close frame with ``code``."""
        self.client_code = code
        self._in_send.send_nowait(None)

    def stall(self) -> None:
        self._reading = anyio.Event()

    def resume(self) -> None:
        """Read again after :meth:`stall` (a blocked send goes on)."""
        self._reading.set()


class World:
    """One gateway on memory backends, and its clients."""

    def __init__(self, gateway: Gateway, directory: MemoryDirectory) -> None:
        self.gateway = gateway
        self.directory = directory
        self._group: anyio.abc.TaskGroup | None = None

    async def connect(self) -> FakeTransport:
        transport = FakeTransport()
        assert self._group is not None
        self._group.start_soon(self.gateway.serve, transport)
        await transport.expect("HELLO")
        return transport

    async def login(self, user_id: str, *servers: str) -> FakeTransport:
        client = await self.connect()
        await client.send_op("IDENTIFY", {"token": f"token:{user_id}"})
        await client.expect("READY")
        for server_id in servers:
            await client.send_op("SUBSCRIBE_SERVER", {"serverId": server_id})
            while (await client.recv())["op"] != "SUBSCRIBED":
                pass
        return client

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        """Wait in virtual time for a condition of the gateway's snapshot."""
        with anyio.fail_after(WAIT):
            # Polling costs no real time here: the loop's clock jumps to the next timer.
            while not condition():  # noqa: ASYNC110
                await anyio.sleep(0.01)


@asynccontextmanager
async def running_world(
    clock: VirtualClock,
    settings: GatewaySettings | None = None,
    directory: MemoryDirectory | None = None,
) -> AsyncIterator[World]:
    directory = directory if directory is not None else MemoryDirectory(demo_data())
    backends = Backends(
        broker=MemoryBrokerNetwork().client(),
        typing_gate=MemoryTypingGate(clock),
        presence=MemoryPresenceStore(clock),
        directory=directory,
        tokens=FakeTokens(),
        clock=clock,
    )
    world = World(make_gateway(backends, settings), directory)
    async with anyio.create_task_group() as group:
        world._group = group
        await group.start(world.gateway.run)
        yield world
        group.cancel_scope.cancel()


def run_virtual(
    test: Callable[[World], Awaitable[None]],
    settings: GatewaySettings | None = None,
    directory: MemoryDirectory | None = None,
) -> None:
    """Run ``test`` against a running world on a fresh virtual-time loop (the demo
    data, unless ``directory`` is given)."""
    loop = new_virtual_loop()
    clock = VirtualClock()
    clock.bind(loop)

    async def main() -> None:
        async with running_world(clock, settings, directory) as world:
            await test(world)

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
