"""PROTOCOL 15 in process (virtual time): IDENTIFY goes through a bounded admission
queue. A storm of handshakes against a directory whose pool is small all get READY
(no 4000: the backend deadline runs from admission, not while queued); a client that
leaves while queued leaves the queue; frames sent while queued are answered in order."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace

import anyio

from adapters.memory import MemoryDirectory
from adapters.shell import GatewaySettings
from domain.model import Server, User, UserId
from entrypoints.config import demo_data
from tests.shell.fakes import FakeTransport, World, run_virtual


class PooledDirectory(MemoryDirectory):
    """The memory directory behind a pool of ``size`` connections, ``latency`` each
    call: concurrency beyond the pool waits, as asyncpg's pool does."""

    def __init__(self, size: int, latency: float) -> None:
        super().__init__(demo_data())
        self._pool = anyio.CapacityLimiter(size)
        self.latency = latency
        self.in_flight = 0
        self.most_in_flight = 0

    async def _slow(self) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            async with self._pool:
                await anyio.sleep(self.latency)
        finally:
            self.in_flight -= 1

    async def get_user(self, user_id: UserId) -> User | None:
        await self._slow()
        return await super().get_user(user_id)

    async def get_user_servers(self, user_id: UserId) -> list[Server]:
        await self._slow()
        return await super().get_user_servers(user_id)


def run(directory: MemoryDirectory, settings: GatewaySettings,
        test: Callable[[World], Awaitable[None]]) -> None:
    run_virtual(test, settings, directory)


SETTINGS = GatewaySettings(backend_timeout_ms=1_000, identify_concurrency=4)


async def identify(world: World, user_id: str) -> FakeTransport:
    client = await world.connect()
    await client.send_op("IDENTIFY", {"token": f"token:{user_id}"})
    return client


def test_an_identify_storm_on_a_small_pool_gets_ready_everywhere() -> None:
    """200 IDENTIFYs at once, a pool of 2 at 50 ms a call: 10 s of directory work.
    Unqueued, nearly every handshake would wait past its 1 s deadline in the pool and
    close 4000; admitted 4 at a time, each is within its deadline and all get READY."""
    directory = PooledDirectory(size=2, latency=0.05)

    async def storm(world: World) -> None:
        clients = [await identify(world, f"u{1 + i % 4}") for i in range(200)]
        for client in clients:
            frame = await client.recv()
            while frame["op"] == "PRESENCE_UPDATE":
                frame = await client.recv()
            assert frame["op"] == "READY", frame
        assert directory.most_in_flight <= SETTINGS.identify_concurrency
        assert world.gateway.queue.waiting == 0 and world.gateway.queue.admitted == 0
        assert world.gateway.metrics.backend_failures.labels("identify")._value.get() == 0
        assert all(c.close_code is None for c in clients)

    run(directory, SETTINGS, storm)


def test_a_client_that_leaves_while_queued_leaves_the_queue() -> None:
    directory = PooledDirectory(size=1, latency=0.3)
    settings = replace(SETTINGS, identify_concurrency=1)

    async def scenario(world: World) -> None:
        queue = world.gateway.queue
        first = await identify(world, "u1")
        await world.until(lambda: queue.admitted == 1, "the first admitted")
        queued = await identify(world, "u2")
        await world.until(lambda: queue.waiting == 1, "the second queued")
        # Frames sent while queued are read (a leaving client is noticed) and held;
        # a HEARTBEAT is answered at once (PROTOCOL 15), the rest waits for READY.
        await queued.send_op("HEARTBEAT")
        await queued.send_op("IDENTIFY", {"token": "token:u2"})
        await anyio.sleep(0.1)
        assert [frame["op"] for frame in queued.pending()] == ["HEARTBEAT_ACK"]
        queued.drop()
        await world.until(lambda: queue.waiting == 0, "the queue left")
        await world.until(lambda: len(world.gateway.snapshot().connections) == 1, "gone")
        assert (await first.event())["op"] == "READY"
        # Nothing leaked: the slot is free for the next one; u2 was never routed.
        later = await identify(world, "u3")
        assert (await later.event())["op"] == "READY"
        assert "u2" not in world.gateway.snapshot().users
        assert queue.waiting == 0 and queue.admitted == 0

    run(directory, settings, scenario)


def test_frames_sent_while_queued_are_answered_after_ready_in_order() -> None:
    directory = PooledDirectory(size=1, latency=0.3)
    settings = replace(SETTINGS, identify_concurrency=1)

    async def scenario(world: World) -> None:
        first = await identify(world, "u1")
        await world.until(lambda: world.gateway.queue.admitted == 1, "the first admitted")
        queued = await identify(world, "u2")
        await queued.send_op("SUBSCRIBE_SERVER", {"serverId": "nowhere"})
        await queued.send_op("HEARTBEAT")
        await queued.send_op("IDENTIFY", {"token": "token:u2"})
        await queued.send_op("HEARTBEAT")
        await queued.send_op("SUBSCRIBE_SERVER", {"serverId": "s1"})
        # The HEARTBEATs are ACKed while still queued (the first handshake holds the
        # only slot), even behind an earlier held frame; the rest waits, in order.
        assert [(await queued.event())["op"] for _ in range(2)] == ["HEARTBEAT_ACK"] * 2
        assert world.gateway.queue.waiting == 1
        assert (await first.event())["op"] == "READY"
        ops = [(await queued.event())["op"] for _ in range(4)]
        assert ops == ["READY", "ERROR", "ERROR", "SUBSCRIBED"]

    run(directory, settings, scenario)


def test_a_long_queue_is_not_a_heartbeat_timeout() -> None:
    """Queued behind a handshake that takes 50 s, a client that keeps heartbeating is
    READY after ~100 s, past the 60 s heartbeat timeout: it is not closed 4009, and
    each HEARTBEAT is ACKed while it queues (PROTOCOL 15), not after READY."""
    directory = PooledDirectory(size=1, latency=25.0)
    settings = replace(SETTINGS, identify_concurrency=1, backend_timeout_ms=120_000)

    async def scenario(world: World) -> None:
        first = await identify(world, "u1")
        await world.until(lambda: world.gateway.queue.admitted == 1, "the first admitted")
        queued = await identify(world, "u2")
        for _ in range(4):  # at 20, 40, 60, 80 s: READY comes at ~100 s
            await anyio.sleep(20.0)
            await queued.send_op("HEARTBEAT")
            assert (await queued.event())["op"] == "HEARTBEAT_ACK"
        assert (await first.event())["op"] == "READY"
        assert (await queued.event())["op"] == "READY"
        assert queued.close_code is None

    run(directory, settings, scenario)
