"""Presence transitions batched into one round trip (adapters.redis.batch).

Redis sits behind the test proxy, which counts the connections it accepted: a
transition sent on its own takes a pooled connection of its own when others are in
flight, so 40 at once open 40 connections; batched, they go in two pipelines (the
first call alone, the 39 made meanwhile together) over one connection.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

import anyio
import pytest

from adapters.redis import RedisPresenceStore, create_client
from adapters.redis.batch import CommandBatcher
from domain.model import PresenceChange, Status
from tests.support.net import TcpProxy

pytestmark = pytest.mark.redis

ON, OFF = Status.ONLINE, Status.OFFLINE
WAIT = 5.0  # seconds: bound for anything expected to happen soon


@pytest.fixture
async def proxy(redis_url: str) -> AsyncIterator[TcpProxy]:
    parts = urlsplit(redis_url)
    p = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 6379, target_url=redis_url)
    await p.start()
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
async def store(proxy: TcpProxy) -> AsyncIterator[RedisPresenceStore]:
    # A command bound long enough to outlast a hung proxy while the test looks.
    client = create_client(proxy.url(), timeout=WAIT)
    s = RedisPresenceStore(client, registry_prefix=f"test-{uuid.uuid4().hex}:presence:")
    try:
        yield s
    finally:
        proxy.restore()
        await client.aclose()


async def _until(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(WAIT):
        while not condition():  # noqa: ASYNC110 - nothing to wait on but time
            await anyio.sleep(0.005)


def _users(n: int) -> list[str]:
    return [f"batch-{uuid.uuid4().hex}" for _ in range(n)]


async def test_transitions_made_together_share_one_round_trip(
    proxy: TcpProxy, store: RedisPresenceStore
) -> None:
    users = _users(40)
    changes: dict[str, PresenceChange] = {}

    async def opened(user_id: str) -> None:
        changes[user_id] = await store.session_opened("inst", user_id, "s1")

    async with anyio.create_task_group() as tg:
        for user_id in users:
            tg.start_soon(opened, user_id)
    assert changes == {u: PresenceChange(u, OFF, ON) for u in users}
    assert proxy.accepted == 1, "one pooled connection for all of them"
    assert (store.transitions.batches, store.transitions.calls) == (2, 40)

    closed: dict[str, PresenceChange] = {}

    async def close(user_id: str) -> None:
        closed[user_id] = await store.session_closed("inst", user_id, "s1")

    async with anyio.create_task_group() as tg:
        for user_id in users:
            tg.start_soon(close, user_id)
    assert closed == {u: PresenceChange(u, ON, OFF) for u in users}
    assert proxy.accepted == 1
    assert store.transitions.batches == 4


async def test_a_batch_after_a_script_flush_loads_the_scripts(
    proxy: TcpProxy, store: RedisPresenceStore
) -> None:
    raw = create_client(proxy.url())
    try:
        await raw.script_flush()
    finally:
        await raw.aclose()
    users = _users(10)
    async with anyio.create_task_group() as tg:
        for user_id in users:
            tg.start_soon(store.session_opened, "inst", user_id, "s1")
    for user_id in users:
        assert await store.get_status(user_id) is ON


async def test_a_call_cancelled_while_queued_never_runs(
    proxy: TcpProxy, store: RedisPresenceStore
) -> None:
    leader, dropped, warm = _users(3)
    batcher = store.transitions
    await store.session_opened("inst", warm, "s0")  # a connection in the pool
    proxy.hang()
    async with anyio.create_task_group() as tg:
        tg.start_soon(store.session_opened, "inst", leader, "s1")
        await _until(lambda: batcher.batches == 2)  # the leader's batch is on the wire
        with anyio.CancelScope() as scope:
            tg.start_soon(_cancel_when_queued, scope, batcher)
            await store.session_opened("inst", dropped, "s1")
        assert scope.cancelled_caught
        assert batcher.waiting == 0
        proxy.resume()
    assert batcher.batches == 2, "the cancelled call was never sent"
    assert await store.get_status(leader) is ON
    assert await store.get_status(dropped) is OFF


async def _cancel_when_queued(scope: anyio.CancelScope, batcher: CommandBatcher) -> None:
    await _until(lambda: batcher.waiting == 1)
    scope.cancel()


async def test_a_cancelled_leader_still_carries_its_batch(
    proxy: TcpProxy, store: RedisPresenceStore
) -> None:
    leader, waiter = _users(2)
    batcher = store.transitions
    got: list[PresenceChange] = []
    leader_scope = anyio.CancelScope()

    async def lead() -> None:
        with leader_scope:
            await store.session_opened("inst", leader, "s1")

    async def wait() -> None:
        got.append(await store.session_opened("inst", waiter, "s1"))

    proxy.hang()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lead)
        await _until(lambda: batcher.batches == 1)  # the leader's batch is on the wire
        tg.start_soon(wait)
        await _until(lambda: batcher.waiting == 1)
        leader_scope.cancel()  # its caller gave up: the batch goes on, shielded
        proxy.resume()
    assert got == [PresenceChange(waiter, OFF, ON)]
    assert await store.get_status(leader) is ON
    assert batcher.batches == 2
    assert proxy.accepted == 1, "no connection discarded by the cancellation"
