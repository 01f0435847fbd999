"""Redis faults under a running gateway, made with a TCP proxy (never by touching the
shared Redis server).

Instance A reaches Redis only through the proxy (GATEWAY_REDIS_URL points at it, the
production ``build_gateway`` path); instance B and "another service" (a plain
redis-py client) talk to Redis directly and keep working throughout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest

from adapters.redis import RedisBroker
from tests.multi.conftest import (
    Instance,
    LiveClient,
    RedisProbe,
    RedisTarget,
    TcpProxy,
    World,
    config_from,
    eventually,
    proxied_url,
    quiet,
    serve_instance,
)

pytestmark = pytest.mark.redis


@pytest.fixture
def redis_target(redis_url: str) -> RedisTarget:
    """Standalone only: a proxy stands in front of one Redis server (the cluster's
    faults are tests/multi/test_cluster_faults.py)."""
    return RedisTarget("standalone", redis_url)

#: A PUBLISH that timed out while Redis hung may still be applied when it resumes (the
#: proxy, like a hung server, holds the bytes): its event may then arrive late, once.
LATE = frozenset({"LOST"})


@asynccontextmanager
async def open_pair(
    redis_url: str,
    proxy: TcpProxy,
    world: World,
    tmp_path: Path,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[tuple[Instance, Instance]]:
    """A (Redis through the proxy) and B (Redis directly), same fixture and ``env``."""
    fixtures = world.write(tmp_path)
    common = {"GATEWAY_FIXTURES": fixtures, **(env or {})}
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(
            serve_instance(
                "A",
                config_from(
                    {**common, "GATEWAY_REDIS_URL": proxied_url(redis_url, proxy.port)}
                ),
            )
        )
        b = await stack.enter_async_context(
            serve_instance("B", config_from({**common, "GATEWAY_REDIS_URL": redis_url}))
        )
        await a.wait_readyz(200)
        await b.wait_readyz(200)
        yield a, b


@pytest.fixture
async def pair(
    redis_url: str, redis_proxy: TcpProxy, world: World, tmp_path: Path
) -> AsyncIterator[tuple[Instance, Instance]]:
    async with open_pair(redis_url, redis_proxy, world, tmp_path) as instances:
        yield instances


def broker_of(instance: Instance) -> RedisBroker:
    broker = instance.gateway.broker
    assert isinstance(broker, RedisBroker)
    return broker


async def measure_recovery(
    probe: RedisProbe, server_id: str, client: LiveClient, restored_at: float
) -> tuple[float, int]:
    """Another service publishes a numbered event every 10 ms from now on; return the
    time from ``restored_at`` to the first one ``client`` receives, and its number."""
    stop = asyncio.Event()

    async def publish() -> None:
        i = 0
        while not stop.is_set():
            await probe.publish_server(server_id, {"op": "TICK", "d": {"i": i}})
            i += 1
            await asyncio.sleep(0.01)

    publisher = asyncio.create_task(publish())
    try:
        while True:
            frame = await client.recv_json(within=20)
            if frame["op"] in LATE:
                continue
            assert frame["op"] == "TICK", frame
            return time.monotonic() - restored_at, int(frame["d"]["i"])
    finally:
        stop.set()
        await publisher


async def drain_ticks(client: LiveClient, first: int | None = None) -> list[int]:
    """Read TICKs until the marker event; return their numbers."""
    ticks = [] if first is None else [first]
    while True:
        frame = await client.recv_json()
        if frame["op"] == "MARKER":
            return ticks
        if frame["op"] in LATE:
            continue
        assert frame["op"] == "TICK", frame
        ticks.append(int(frame["d"]["i"]))


@pytest.mark.parametrize("outage", [0.5, 3.0], ids=["short-outage", "3s-outage"])
async def test_redis_restart_readyz_recovers_and_subscriptions_resume(
    pair: tuple[Instance, Instance],
    redis_proxy: TcpProxy,
    world: World,
    probe: RedisProbe,
    outage: float,
) -> None:
    a, b = pair
    on_a = await a.login(world.u1)
    on_b = await b.login(world.u2)
    for client in (on_a, on_b):
        await client.subscribe(world.s1)
    assert await probe.publish_server(world.s1, {"op": "BEFORE", "d": None}) == 2
    for client in (on_a, on_b):
        await client.expect_event("BEFORE", None)

    # Redis "restarts": every connection of A dropped, new ones refused.
    redis_proxy.refuse()
    refused_at = time.monotonic()
    await a.wait_readyz(503)
    assert await b.readyz() == 200

    # During the outage: A's publishes fail fast (never hang a caller), events
    # published elsewhere still reach B's clients and are lost for A's (at most
    # once), A's clients stay connected and served.
    started = time.monotonic()
    assert not await a.gateway.publish_to_server(world.s1, {"op": "LOST", "d": None})
    assert not await a.gateway.publish_to_server(world.s1, {"op": "LOST", "d": None})
    assert time.monotonic() - started < 3.0
    assert await probe.publish_server(world.s1, {"op": "DURING", "d": None}) == 1
    await on_b.expect_event("DURING", None)
    await on_a.heartbeat()
    # The outage lasts: the broker keeps retrying, backing off.
    await asyncio.sleep(max(0.0, outage - (time.monotonic() - refused_at)))
    assert await a.readyz() == 503

    redis_proxy.accept()
    restored_at = time.monotonic()
    recovery, first = await measure_recovery(probe, world.s1, on_a, restored_at)
    ready_after = await a.wait_readyz(200, within=15)
    print(
        f"\nRedis outage of {outage:.1f}s: first event delivered {recovery * 1000:.0f} ms after "
        f"the proxy was restored (readyz 200 after {ready_after + recovery:.2f}s)"
    )
    assert recovery < 10.0

    # From now on everything flows again, A's own publishes included, in order and
    # without gaps (s is checked on every frame).
    assert await a.gateway.publish_to_server(world.s1, {"op": "MARKER", "d": None})
    ticks_a = await drain_ticks(on_a, first)
    assert ticks_a == list(range(first, first + len(ticks_a)))
    ticks_b = [t for t in await drain_ticks(on_b) if t >= first]
    assert ticks_b == ticks_a
    stats = broker_of(a).stats
    assert stats.outages >= 1 and stats.reconnects >= 1, stats
    assert broker_of(b).stats.outages == 0
    await quiet(on_a, on_b)
    # Nothing of the outage leaked: once the clients are gone, presence is clean.
    for instance in pair:
        await instance.close_clients()
    await probe.assert_no_presence(world)


async def test_hung_redis_is_noticed_never_blocks_clients_and_recovers(
    pair: tuple[Instance, Instance],
    redis_proxy: TcpProxy,
    world: World,
    probe: RedisProbe,
) -> None:
    a, _ = pair
    typer = await a.login(world.u1)
    other = await a.login(world.u3)
    for client in (typer, other):
        await client.subscribe(world.s1)

    redis_proxy.hang()
    hung_at = time.monotonic()

    # A handler waiting on Redis (typing) is bounded, and never holds up the others.
    await typer.send_op("TYPING_START", {"channelId": world.c1})
    for _ in range(3):
        started = time.monotonic()
        await other.heartbeat()
        assert time.monotonic() - started < 0.5, "HEARTBEAT_ACK delayed while Redis hangs"
    started = time.monotonic()
    # PROTOCOL 15: the TYPING_START that gave up is answered (ERROR), not dropped.
    await typer.expect_error("UNAVAILABLE", "TYPING_START")
    await typer.heartbeat()
    assert time.monotonic() - started < 3.0
    # Publishing returns (False) within its bound.
    started = time.monotonic()
    assert not await asyncio.wait_for(
        a.gateway.publish_to_server(world.s1, {"op": "LOST", "d": None}), 5
    )
    assert time.monotonic() - started < 2.5

    # Noticed: /readyz 503 within a few seconds, and the subscriber connection
    # declared dead by the broker's PING watchdog (a hung socket never errors).
    noticed = await a.wait_readyz(503, within=5)
    broker = broker_of(a)
    while broker.is_healthy():
        assert time.monotonic() - hung_at < 8, "the hung subscriber connection went unnoticed"
        await asyncio.sleep(0.05)
    detected = time.monotonic() - hung_at
    print(f"\nhung Redis: /readyz 503 after {noticed:.2f}s, broker down after {detected:.2f}s")
    await other.heartbeat()

    redis_proxy.resume()
    resumed_at = time.monotonic()
    recovery, _ = await measure_recovery(probe, world.s1, other, resumed_at)
    await a.wait_readyz(200, within=15)
    print(f"hung Redis: first event delivered {recovery * 1000:.0f} ms after it resumed")
    assert await a.gateway.publish_to_server(world.s1, {"op": "MARKER", "d": None})
    await drain_ticks(other)
    await drain_ticks(typer)
    # Typing works again (a fresh key: the hung attempt never reached Redis or expired).
    await probe.client.delete(f"typing:{world.c1}:{world.u1}")
    await typer.send_op("TYPING_START", {"channelId": world.c1})
    frame = await other.expect("TYPING_START")
    assert frame["d"]["userId"] == world.u1
    await quiet(typer, other)
    await a.close_clients()
    await probe.assert_no_presence(world)


async def test_presence_of_a_tab_closed_during_the_outage_is_settled_after_it(
    redis_url: str, redis_proxy: TcpProxy, world: World, probe: RedisProbe, tmp_path: Path
) -> None:
    """A connection that closes while Redis is unreachable cannot close its presence
    session then; it is retried, so the user goes offline (once) after recovery
    instead of staying online for ever (PROTOCOL 5.5: nothing it held leaks)."""
    # A short heartbeat timeout: the presence loop (and its retries) runs every 1s.
    env = {"GATEWAY_HEARTBEAT_TIMEOUT_MS": "3000", "GATEWAY_HEARTBEAT_SWEEP_MS": "1000"}
    async with open_pair(redis_url, redis_proxy, world, tmp_path, env) as (a, b):
        watcher = await b.login(world.u3, heartbeat_every=0.5)
        await watcher.subscribe(world.s1)
        leaving = await a.login(world.u1, heartbeat_every=0.5)
        await watcher.expect_event(
            "PRESENCE_UPDATE", {"userId": world.u1, "serverId": world.s1, "status": "online"}
        )

        redis_proxy.refuse()
        await a.wait_readyz(503)
        await leaving.close()
        await asyncio.sleep(0.5)
        await quiet(watcher)
        assert await probe.presence(world.u1) == "online"  # could not be closed yet

        redis_proxy.accept()
        restored_at = time.monotonic()
        await watcher.expect_event(
            "PRESENCE_UPDATE",
            {"userId": world.u1, "serverId": world.s1, "status": "offline"},
            within=10,
        )
        print(f"\npresence of a tab closed during the outage settled "
              f"{time.monotonic() - restored_at:.2f}s after recovery")
        await probe.wait_presence(world.u1, None)
        await quiet(watcher, within=1.0)
        for instance in (a, b):
            await instance.close_clients()
        await probe.assert_no_presence(world)


async def test_an_instant_redis_restart_costs_clients_nothing(
    pair: tuple[Instance, Instance],
    redis_proxy: TcpProxy,
    world: World,
    probe: RedisProbe,
) -> None:
    """Redis restarts between two calls (every connection closed by the server, new
    ones accepted at once): once the broker is live again, the first IDENTIFY, typing
    and publish on A succeed; no pooled connection the server closed is reused."""
    a, _ = pair
    watcher = await a.login(world.u3)
    await watcher.subscribe(world.s1)
    assert await a.gateway.publish_to_server(world.s1, {"op": "BEFORE", "d": None})
    await watcher.expect_event("BEFORE", None)

    redis_proxy.drop()
    broker = broker_of(a)
    await eventually(
        lambda: broker.stats.reconnects >= 1 and broker.is_healthy(),
        within=10,
        what="the broker to reconnect",
    )

    newcomer = await a.login(world.u1)  # READY, not 4000
    await watcher.expect_event(
        "PRESENCE_UPDATE", {"userId": world.u1, "serverId": world.s1, "status": "online"}
    )
    await newcomer.send_op("TYPING_START", {"channelId": world.c1})
    frame = await watcher.expect("TYPING_START")
    assert frame["d"]["userId"] == world.u1
    assert await a.gateway.publish_to_server(world.s1, {"op": "AFTER", "d": None})
    await watcher.expect_event("AFTER", None)
    await quiet(watcher, newcomer)
    await a.close_clients()
    await probe.assert_no_presence(world)
