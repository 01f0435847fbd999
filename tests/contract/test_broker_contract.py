"""The Broker port's contract, run against ``MemoryBroker``, ``RedisBroker`` and
``RedisClusterBroker`` (on a 3-master cluster: channels of one test fall on
different masters).

Every test gets a ``world``: a way to start broker instances on one shared network
(one ``MemoryBrokerNetwork``, or one real Redis), each with ``run`` going and a
handler recording what it received. Channel names are unique per test, so tests
may share the Redis server with other suites.

"Exactly once" is checked with a fence: after the message under test, a fence
message is published on the same channel by the same publisher; since one
publisher's messages arrive in order, once the fence arrived a duplicate of the
earlier message would have arrived too.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import anyio
import pytest

from adapters.memory import MemoryBroker, MemoryBrokerNetwork
from adapters.redis import RedisBroker, RedisClusterBroker
from adapters.redis.cluster_shard import channel_slot
from domain.ports import Broker

WAIT = 5.0  # seconds: generous bound for anything that should happen "now"


@dataclass(eq=False)
class Node:
    """One instance's broker with ``run`` going, and what its handler received."""

    broker: Broker
    received: list[tuple[str, bytes]] = field(default_factory=list)
    _arrival: anyio.Event = field(default_factory=anyio.Event)

    async def handler(self, channel: str, payload: bytes) -> None:
        self.received.append((channel, payload))
        self._arrival.set()
        self._arrival = anyio.Event()

    def payloads(self, channel: str) -> list[bytes]:
        return [p for c, p in self.received if c == channel]

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        with anyio.fail_after(WAIT):
            while not predicate():
                await self._arrival.wait()

    async def wait_for(self, channel: str, payload: bytes) -> None:
        await self.wait_until(lambda: payload in self.payloads(channel))

    async def wait_count(self, channel: str, count: int) -> None:
        await self.wait_until(lambda: len(self.payloads(channel)) >= count)


async def eventually(predicate: Callable[[], bool]) -> None:
    """Poll state that has no event to wait on (a broker's health)."""
    with anyio.fail_after(WAIT):
        while not predicate():  # noqa: ASYNC110 - nothing to wait on but time
            await anyio.sleep(0.005)


@dataclass
class BrokerWorld:
    name: str
    factory: Callable[[], Broker]
    nodes: list[Node] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def node(self) -> Node:
        node = Node(self.factory())
        self.nodes.append(node)
        self.tasks.append(asyncio.create_task(node.broker.run(node.handler)))
        await eventually(node.broker.is_healthy)
        return node

    async def close(self) -> None:
        for node in self.nodes:
            broker = node.broker
            if isinstance(broker, RedisBroker | RedisClusterBroker):
                await broker.close()
            elif isinstance(broker, MemoryBroker):
                broker.close()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def world(request: pytest.FixtureRequest) -> AsyncIterator[BrokerWorld]:
    factory: Callable[[], Broker]
    if request.param == "memory":
        factory = MemoryBrokerNetwork().client
    elif request.param == "redis-cluster":
        cluster_url: str = request.getfixturevalue("redis_cluster_url")

        def factory() -> Broker:
            return RedisClusterBroker(cluster_url, ping_interval=0.2, ping_timeout=1.0)

    else:
        url: str = request.getfixturevalue("redis_url")

        def factory() -> Broker:
            return RedisBroker(url, ping_interval=0.2, ping_timeout=1.0)

    w = BrokerWorld(request.param, factory)
    try:
        yield w
    finally:
        await w.close()


def channel_name(kind: str = "server") -> str:
    return f"ws:{kind}:test-{uuid.uuid4().hex}"


async def test_subscribe_then_publish_delivers_exactly_once(world: BrokerWorld) -> None:
    node = await world.node()
    channel = channel_name()
    await node.broker.subscribe(channel)
    await node.broker.publish(channel, b"hello")
    await node.broker.publish(channel, b"fence")
    await node.wait_for(channel, b"fence")
    assert node.payloads(channel) == [b"hello", b"fence"]
    assert node.broker.is_healthy()


async def test_two_instances_each_get_it_once(world: BrokerWorld) -> None:
    a, b, publisher = await world.node(), await world.node(), await world.node()
    channel = channel_name()
    await a.broker.subscribe(channel)
    await b.broker.subscribe(channel)
    await publisher.broker.publish(channel, b"event")
    await publisher.broker.publish(channel, b"fence")
    for node in (a, b):
        await node.wait_for(channel, b"fence")
        assert node.payloads(channel) == [b"event", b"fence"]
    assert publisher.received == []


async def test_publisher_subscribed_itself_gets_its_own_message(world: BrokerWorld) -> None:
    a, b = await world.node(), await world.node()
    channel = channel_name()
    await a.broker.subscribe(channel)
    await b.broker.subscribe(channel)
    await a.broker.publish(channel, b"mine")
    await a.broker.publish(channel, b"fence")
    for node in (a, b):
        await node.wait_for(channel, b"fence")
        assert node.payloads(channel) == [b"mine", b"fence"]


async def test_only_subscribed_channels_are_delivered(world: BrokerWorld) -> None:
    node = await world.node()
    mine, other = channel_name(), channel_name()
    await node.broker.subscribe(mine)
    await node.broker.publish(other, b"not for me")
    await node.broker.publish(mine, b"fence")
    await node.wait_for(mine, b"fence")
    assert node.payloads(other) == []


async def test_unsubscribe_stops_delivery(world: BrokerWorld) -> None:
    node, publisher = await world.node(), await world.node()
    channel, fence = channel_name(), channel_name()
    await node.broker.subscribe(channel)
    await node.broker.subscribe(fence)
    await publisher.broker.publish(channel, b"before")
    await node.wait_for(channel, b"before")

    await node.broker.unsubscribe(channel)
    await publisher.broker.publish(channel, b"after")
    # Same publisher, later message: once the fence is in, "after" would be too.
    await publisher.broker.publish(fence, b"fence")
    await node.wait_for(fence, b"fence")
    assert node.payloads(channel) == [b"before"]


async def test_unsubscribe_of_unknown_channel_is_harmless(world: BrokerWorld) -> None:
    node = await world.node()
    await node.broker.unsubscribe(channel_name())
    channel = channel_name()
    await node.broker.subscribe(channel)
    await node.broker.publish(channel, b"still fine")
    await node.wait_for(channel, b"still fine")


async def test_subscribe_unsubscribe_subscribe_ends_subscribed(world: BrokerWorld) -> None:
    node, publisher = await world.node(), await world.node()
    for _ in range(20):
        channel = channel_name()
        await node.broker.subscribe(channel)
        await node.broker.unsubscribe(channel)
        await node.broker.subscribe(channel)
        await publisher.broker.publish(channel, b"once")
        await publisher.broker.publish(channel, b"fence")
        await node.wait_for(channel, b"fence")
        assert node.payloads(channel) == [b"once", b"fence"]


async def test_repeated_subscribe_is_idempotent(world: BrokerWorld) -> None:
    node, publisher = await world.node(), await world.node()
    channel = channel_name()
    await node.broker.subscribe(channel)
    await node.broker.subscribe(channel)
    await publisher.broker.publish(channel, b"once")
    await publisher.broker.publish(channel, b"fence")
    await node.wait_for(channel, b"fence")
    assert node.payloads(channel) == [b"once", b"fence"]
    # A single unsubscribe ends it (the caller counts references, not the broker).
    await node.broker.unsubscribe(channel)
    await publisher.broker.publish(channel, b"after")
    await node.broker.subscribe(fence := channel_name())
    await publisher.broker.publish(fence, b"fence")
    await node.wait_for(fence, b"fence")
    assert node.payloads(channel) == [b"once", b"fence"]


async def test_order_is_preserved_for_one_publisher(world: BrokerWorld) -> None:
    node, publisher = await world.node(), await world.node()
    channel = channel_name()
    await node.broker.subscribe(channel)
    sent = [f"m{i}".encode() for i in range(1000)]
    for payload in sent:
        await publisher.broker.publish(channel, payload)
    await node.wait_count(channel, len(sent))
    assert node.payloads(channel) == sent


def same_shard_channels(broker: Broker) -> list[str]:
    """A server and a user channel: on a Redis Cluster, two that one master serves."""
    first = channel_name()
    if not isinstance(broker, RedisClusterBroker):
        return [first, channel_name("user")]
    slot_map = broker.slot_map
    assert slot_map is not None
    owner = slot_map.owner(channel_slot(first))
    while True:
        second = channel_name("user")
        if slot_map.owner(channel_slot(second)) == owner:
            return [first, second]


async def test_order_across_channels_of_one_publisher(world: BrokerWorld) -> None:
    """PROTOCOL 7's "in order per publisher", across channels. On a Redis Cluster it
    holds for the channels of one master (one connection); PROTOCOL 16 reading:
    across masters only each channel's own order holds (next test)."""
    node, publisher = await world.node(), await world.node()
    channels = same_shard_channels(node.broker)
    for channel in channels:
        await node.broker.subscribe(channel)
    sent = [(channels[i % 2], f"m{i}".encode()) for i in range(200)]
    for channel, payload in sent:
        await publisher.broker.publish(channel, payload)
    await node.wait_until(lambda: len(node.received) >= len(sent))
    assert node.received == sent


async def test_order_per_channel_across_masters(world: BrokerWorld) -> None:
    """Channels that live on different masters (of a Redis Cluster: elsewhere just
    different channels): each keeps one publisher's order."""
    node, publisher = await world.node(), await world.node()
    channels = [channel_name() for _ in range(6)]
    if isinstance(node.broker, RedisClusterBroker):  # two on each master
        slot_map = node.broker.slot_map
        assert slot_map is not None
        by_master: dict[str | None, list[str]] = {m: [] for m in slot_map.masters()}
        while any(len(cs) < 2 for cs in by_master.values()):
            channel = channel_name()
            by_master[slot_map.owner(channel_slot(channel))].append(channel)
        channels = [c for cs in by_master.values() for c in cs[:2]]
    for channel in channels:
        await node.broker.subscribe(channel)
    sent = [(channels[i % len(channels)], f"m{i}".encode()) for i in range(300)]
    for channel, payload in sent:
        await publisher.broker.publish(channel, payload)
    await node.wait_until(lambda: len(node.received) >= len(sent))
    for channel in channels:
        assert node.payloads(channel) == [p for c, p in sent if c == channel]


async def test_publish_with_no_subscribers_is_fine(world: BrokerWorld) -> None:
    node = await world.node()
    await node.broker.publish(channel_name(), b"into the void")
    assert node.broker.is_healthy()


async def test_subscribe_returns_only_when_live(world: BrokerWorld) -> None:
    """A publish right after subscribe returns, from another instance, arrives."""
    node, publisher = await world.node(), await world.node()
    for i in range(50):
        channel = channel_name()
        await node.broker.subscribe(channel)
        await publisher.broker.publish(channel, f"right away {i}".encode())
        await node.wait_for(channel, f"right away {i}".encode())


async def test_concurrent_subscribes_are_all_live(world: BrokerWorld) -> None:
    node, publisher = await world.node(), await world.node()
    channels = [channel_name() for _ in range(100)]
    await asyncio.gather(*(node.broker.subscribe(c) for c in channels))
    for channel in channels:
        await publisher.broker.publish(channel, b"hi")
    await node.wait_until(lambda: len(node.received) >= len(channels))
    assert sorted(c for c, _ in node.received) == sorted(channels)


async def test_payload_bytes_are_delivered_unchanged(world: BrokerWorld) -> None:
    node = await world.node()
    channel = channel_name()
    payload = bytes(range(256)) + '{"op":"X","d":"é"}'.encode()
    await node.broker.subscribe(channel)
    await node.broker.publish(channel, payload)
    await node.wait_for(channel, payload)
    assert node.payloads(channel) == [payload]


async def test_a_handler_error_ends_run_with_that_error(world: BrokerWorld) -> None:
    publisher = await world.node()
    channel = channel_name()
    broker = world.factory()
    world.nodes.append(Node(broker))

    class Boom(Exception):
        pass

    async def handler(_channel: str, payload: bytes) -> None:
        raise Boom(payload)

    task = asyncio.create_task(broker.run(handler))
    world.tasks.append(task)
    await eventually(broker.is_healthy)
    await broker.subscribe(channel)
    await publisher.broker.publish(channel, b"bad")
    with anyio.fail_after(WAIT), pytest.raises(Boom):
        await asyncio.shield(task)
    world.tasks.remove(task)  # done, its error seen


async def test_random_subscribe_unsubscribe_sequences_end_in_the_last_state(
    world: BrokerWorld,
) -> None:
    """Per channel, a random run of subscribe/unsubscribe calls, the channels
    interleaved concurrently: delivery afterwards follows each channel's last call."""
    node, publisher = await world.node(), await world.node()
    rng = random.Random(1234)
    plans = {
        channel_name(): [rng.random() < 0.5 for _ in range(rng.randint(1, 8))] for _ in range(40)
    }

    async def play(channel: str, plan: list[bool]) -> None:
        for subscribe in plan:
            if subscribe:
                await node.broker.subscribe(channel)
            else:
                await node.broker.unsubscribe(channel)
            await asyncio.sleep(0)

    await asyncio.gather(*(play(c, plan) for c, plan in plans.items()))
    for channel in plans:
        await publisher.broker.publish(channel, b"x")
    fence = channel_name()
    await node.broker.subscribe(fence)
    await publisher.broker.publish(fence, b"fence")
    await node.wait_for(fence, b"fence")
    for channel, plan in plans.items():
        assert node.payloads(channel) == ([b"x"] if plan[-1] else []), (channel, plan)
