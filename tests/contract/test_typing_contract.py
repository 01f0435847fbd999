"""The TypingGate port's contract, run against ``MemoryTypingGate`` and
``RedisTypingGate``.

Time: the memory gate runs on a ``ManualClock`` that ``advance`` moves; the Redis
gate uses real, short TTLs and ``advance`` really sleeps. Keys are unique per test.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from redis.asyncio import Redis

from adapters.memory import ManualClock, MemoryTypingGate
from adapters.redis import RedisTypingGate, create_client
from domain.keys import typing_key
from domain.ports import BackendUnavailable, TypingGate

TTL_MS = 300


@dataclass
class TypingWorld:
    name: str
    gate: TypingGate
    advance: Callable[[float], Awaitable[None]]


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def world(request: pytest.FixtureRequest) -> AsyncIterator[TypingWorld]:
    if request.param == "memory":
        clock = ManualClock()

        async def advance_clock(seconds: float) -> None:
            clock.advance(seconds)

        yield TypingWorld("memory", MemoryTypingGate(clock), advance_clock)
        return

    cluster = request.param == "redis-cluster"
    url: str = request.getfixturevalue("redis_cluster_url" if cluster else "redis_url")

    async def sleep(seconds: float) -> None:
        await asyncio.sleep(seconds)

    async with RedisTypingGate.from_url(url, cluster=cluster) as gate:
        yield TypingWorld(request.param, gate, sleep)


@pytest.fixture
async def raw_redis(redis_url: str) -> AsyncIterator[Redis]:
    client = create_client(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


def fresh_key(user: str = "u1") -> str:
    return typing_key(f"test-{uuid.uuid4().hex}", user)


async def test_claim_is_true_once_within_the_ttl(world: TypingWorld) -> None:
    key = fresh_key()
    assert await world.gate.claim(key, TTL_MS) is True
    assert await world.gate.claim(key, TTL_MS) is False
    await world.advance(TTL_MS / 1000 / 3)
    assert await world.gate.claim(key, TTL_MS) is False


async def test_claim_is_true_again_after_the_ttl(world: TypingWorld) -> None:
    key = fresh_key()
    assert await world.gate.claim(key, TTL_MS) is True
    await world.advance(TTL_MS / 1000 + 0.1)
    assert await world.gate.claim(key, TTL_MS) is True
    assert await world.gate.claim(key, TTL_MS) is False


async def test_a_refused_claim_does_not_extend_the_ttl(world: TypingWorld) -> None:
    key = fresh_key()
    assert await world.gate.claim(key, TTL_MS) is True
    await world.advance(TTL_MS / 1000 * 0.6)
    assert await world.gate.claim(key, TTL_MS) is False
    await world.advance(TTL_MS / 1000 * 0.6 + 0.05)
    assert await world.gate.claim(key, TTL_MS) is True


async def test_distinct_keys_are_independent(world: TypingWorld) -> None:
    channel = f"test-{uuid.uuid4().hex}"
    alice, bob = typing_key(channel, "alice"), typing_key(channel, "bob")
    other_channel = typing_key(f"test-{uuid.uuid4().hex}", "alice")
    assert await world.gate.claim(alice, TTL_MS) is True
    assert await world.gate.claim(bob, TTL_MS) is True
    assert await world.gate.claim(other_channel, TTL_MS) is True
    assert await world.gate.claim(alice, TTL_MS) is False
    assert await world.gate.claim(bob, TTL_MS) is False


async def test_concurrent_claims_of_one_key_have_one_winner(world: TypingWorld) -> None:
    key = fresh_key()
    results = await asyncio.gather(*(world.gate.claim(key, 10_000) for _ in range(20)))
    assert results.count(True) == 1


# -- Redis only: the key is the external contract (PROTOCOL 7, 7a) ---------------


async def test_redis_key_is_named_as_given_with_a_px_ttl(redis_url: str, raw_redis: Redis) -> None:
    async with RedisTypingGate.from_url(redis_url) as gate:
        key = fresh_key("user-42")
        assert key.startswith("typing:") and key.endswith(":user-42")
        assert await gate.claim(key, 10_000) is True
        assert await raw_redis.get(key) is not None
        pttl = await raw_redis.pttl(key)
        assert 9_000 < pttl <= 10_000
        assert await gate.claim(key, 10_000) is False
        assert await raw_redis.pttl(key) <= pttl  # a refused claim leaves the TTL alone
        await raw_redis.delete(key)


async def test_redis_gate_reports_an_unreachable_server() -> None:
    # A port nothing listens on: connection refused, surfaced as BackendUnavailable.
    async with RedisTypingGate.from_url("redis://127.0.0.1:1/15", timeout=0.5) as gate:
        with pytest.raises(BackendUnavailable):
            await gate.claim(fresh_key(), 1000)
        with pytest.raises(BackendUnavailable):
            await gate.ping()
