"""Redis adapters under a storm on a small pool (PROTOCOL 15): the wait for a pooled
connection is not the command's time, and a storm does not churn the pool.

Redis is slowed by the test proxy (every chunk waits ``LATENCY`` in each direction),
the pool holds 2 connections, and 40 presence writes start at once: they queue for
the pool far longer than one command's bound, and each command, once it has its
connection, takes a fraction of it. Every write must succeed, over the pool's 2
connections only (the proxy counts the connections it accepted: one more would be a
connection discarded and made again). With the pool wait counted in the command's
bound (one ``timeout`` for both, and a deadline scope around the call), half of the
writes failed: ``ConnectionError: No connection available``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import anyio
import pytest

from adapters.redis import RedisPresenceStore, RedisTypingGate, create_client
from domain.keys import presence_key
from domain.model import Status
from tests.support.net import TcpProxy

pytestmark = pytest.mark.redis

LATENCY = 0.025  # seconds per chunk and direction: a round trip of about 50 ms
COMMAND_TIMEOUT = 0.5  # ten round trips: a command alone never comes near it
POOL = 2
WRITES = 40  # 20 round trips per connection: the last waits about 1 s for the pool


@pytest.fixture
async def slow_redis(redis_url: str) -> AsyncIterator[TcpProxy]:
    parts = urlsplit(redis_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 6379, target_url=redis_url)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


async def _warm(store: RedisPresenceStore, users: list[str]) -> None:
    """Load the scripts and open the pool's connections before the storm."""
    async with anyio.create_task_group() as tg:
        for user_id in users:
            tg.start_soon(store.session_opened, "warm", user_id, "s0")


async def test_presence_storm_on_a_small_pool_all_succeed_without_churn(
    slow_redis: TcpProxy,
) -> None:
    client = create_client(slow_redis.url(), timeout=COMMAND_TIMEOUT, max_connections=POOL)
    store = RedisPresenceStore(client, registry_prefix=f"test-{uuid.uuid4().hex}:presence:")
    warm = [f"pool-warm-{uuid.uuid4().hex}" for _ in range(POOL)]
    users = [f"pool-{uuid.uuid4().hex}" for _ in range(WRITES)]
    try:
        await _warm(store, warm)
        accepted = slow_redis.accepted
        slow_redis.latency = LATENCY
        results: dict[str, Status] = {}
        failures: list[BaseException] = []

        async def write(user_id: str) -> None:
            try:
                change = await store.session_opened("inst", user_id, "s1")
            except Exception as exc:
                failures.append(exc)
            else:
                results[user_id] = change.after

        async with anyio.create_task_group() as tg:
            for user_id in users:
                tg.start_soon(write, user_id)
        assert failures == []
        assert results == dict.fromkeys(users, Status.ONLINE)
        assert slow_redis.accepted == accepted, "pooled connections were discarded and made again"
    finally:
        slow_redis.restore()
        await client.delete(*[presence_key(u) for u in warm + users])
        await client.aclose()


async def test_typing_storm_on_a_small_pool_all_succeed_without_churn(
    slow_redis: TcpProxy,
) -> None:
    client = create_client(slow_redis.url(), timeout=COMMAND_TIMEOUT, max_connections=POOL)
    gate = RedisTypingGate(client)
    try:

        async def ping() -> None:
            await client.ping()

        async with anyio.create_task_group() as tg:
            for _ in range(POOL):
                tg.start_soon(ping)
        accepted = slow_redis.accepted
        slow_redis.latency = LATENCY
        claimed: list[bool] = []
        failures: list[BaseException] = []
        prefix = f"typing:test-{uuid.uuid4().hex}"

        async def claim(i: int) -> None:
            try:
                claimed.append(await gate.claim(f"{prefix}:{i}", 5_000))
            except Exception as exc:
                failures.append(exc)

        async with anyio.create_task_group() as tg:
            for i in range(WRITES):
                tg.start_soon(claim, i)
        assert failures == []
        assert claimed == [True] * WRITES
        assert slow_redis.accepted == accepted, "pooled connections were discarded and made again"
    finally:
        slow_redis.restore()
        await client.aclose()
