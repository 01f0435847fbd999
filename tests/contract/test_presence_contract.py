"""The PresenceStore port's contract, run against ``MemoryPresenceStore`` and
``RedisPresenceStore``: the table of :mod:`domain.presence`, row by row, then
multi-instance behaviour (two tabs on two instances, concurrent closes, reaping).

Each world has two handles on the same shared state (``store`` and ``other``, as two
instances would): for Redis two clients with their own connections, for memory the
same object. Time: ``advance`` moves a ``ManualClock`` for memory and really sleeps
for Redis (whose liveness TTLs are real and short). User ids and the registry prefix
are unique per test, so tests may share the Redis database with other suites.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from redis.asyncio import Redis, RedisCluster

from adapters.memory import ManualClock, MemoryPresenceStore
from adapters.redis import (
    RedisClusterPresenceStore,
    RedisPresenceStore,
    create_client,
    create_cluster_client,
)
from domain.keys import presence_key
from domain.model import PresenceChange, Status
from domain.ports import BackendUnavailable, PresenceStore

ON, IDLE, DND, INV, OFF = Status.ONLINE, Status.IDLE, Status.DND, Status.INVISIBLE, Status.OFFLINE

SHORT_MS = 250  # liveness of an instance that is about to die
LONG_MS = 30_000  # liveness of an instance that stays up


@dataclass
class PresenceWorld:
    name: str
    store: PresenceStore
    other: PresenceStore
    advance: Callable[[float], Awaitable[None]]
    #: The raw value of ``presence:{userId}`` (None when there is no such key).
    raw_status: Callable[[str], Awaitable[str | None]]
    users: list[str] = field(default_factory=list)

    def user(self) -> str:
        """A fresh user id (its status key is deleted after the test)."""
        user_id = new_user()
        self.users.append(user_id)
        return user_id


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def world(request: pytest.FixtureRequest) -> AsyncIterator[PresenceWorld]:
    if request.param == "memory":
        clock = ManualClock()
        memory = MemoryPresenceStore(clock)

        async def advance_clock(seconds: float) -> None:
            clock.advance(seconds)

        async def memory_raw(user_id: str) -> str | None:
            status = memory.stored_statuses().get(user_id)
            return None if status is None else status.value

        yield PresenceWorld("memory", memory, memory, advance_clock, memory_raw)
        return

    cluster = request.param == "redis-cluster"
    url: str = request.getfixturevalue("redis_cluster_url" if cluster else "redis_url")
    prefix = f"test-{uuid.uuid4().hex}:presence:"
    raw: Redis | RedisCluster = (create_cluster_client if cluster else create_client)(url)
    kind = RedisClusterPresenceStore if cluster else RedisPresenceStore
    store: PresenceStore = kind.from_url(url, registry_prefix=prefix)
    other: PresenceStore = kind.from_url(url, registry_prefix=prefix)

    async def sleep(seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def redis_raw(user_id: str) -> str | None:
        value = await raw.get(presence_key(user_id))
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else value

    w = PresenceWorld(request.param, store, other, sleep, redis_raw)
    try:
        yield w
    finally:
        # Cluster: internal keys start with a hash tag, and the prefix follows it.
        keys = [k async for k in raw.scan_iter(match=f"*{prefix}*")]
        keys += [presence_key(user) for user in w.users]
        for key in keys:
            await raw.delete(key)
        assert isinstance(store, RedisPresenceStore | RedisClusterPresenceStore)
        assert isinstance(other, RedisPresenceStore | RedisClusterPresenceStore)
        await store.close()
        await other.close()
        await raw.aclose()


def new_user() -> str:
    return f"test-{uuid.uuid4().hex}"


def change(user: str, before: Status, after: Status) -> PresenceChange:
    return PresenceChange(user, before, after)


# -- the table of domain.presence, row by row -----------------------------------


async def test_first_session_opened_goes_online(world: PresenceWorld) -> None:
    user = world.user()
    assert await world.store.get_status(user) is OFF
    assert await world.raw_status(user) is None
    result = await world.store.session_opened("i1", user, "s1")
    assert result == change(user, OFF, ON)
    assert result.visible_changed
    assert await world.store.get_status(user) is ON
    assert await world.raw_status(user) == "online"


async def test_second_session_opened_changes_nothing(world: PresenceWorld) -> None:
    user = world.user()
    await world.store.session_opened("i1", user, "s1")
    assert await world.store.session_opened("i1", user, "s2") == change(user, ON, ON)
    await world.store.set_status(user, DND)
    result = await world.store.session_opened("i1", user, "s3")
    assert result == change(user, DND, DND)  # a new tab of a dnd user stays dnd
    assert not result.visible_changed
    assert await world.raw_status(user) == "dnd"


async def test_closing_the_only_session_goes_offline_and_deletes_the_key(
    world: PresenceWorld,
) -> None:
    user = world.user()
    await world.store.session_opened("i1", user, "s1")
    await world.store.set_status(user, IDLE)
    result = await world.store.session_closed("i1", user, "s1")
    assert result == change(user, IDLE, OFF)
    assert result.visible_changed
    assert await world.store.get_status(user) is OFF
    assert await world.raw_status(user) is None


async def test_closing_one_of_two_sessions_changes_nothing(world: PresenceWorld) -> None:
    user = world.user()
    await world.store.session_opened("i1", user, "s1")
    await world.store.session_opened("i1", user, "s2")
    assert await world.store.session_closed("i1", user, "s1") == change(user, ON, ON)
    assert await world.raw_status(user) == "online"
    assert await world.store.session_closed("i1", user, "s2") == change(user, ON, OFF)


async def test_set_status_with_a_live_session(world: PresenceWorld) -> None:
    user = world.user()
    await world.store.session_opened("i1", user, "s1")
    assert await world.store.set_status(user, IDLE) == change(user, ON, IDLE)
    assert await world.raw_status(user) == "idle"
    assert await world.store.set_status(user, DND) == change(user, IDLE, DND)
    assert await world.store.get_status(user) is DND
    repeat = await world.store.set_status(user, DND)
    assert repeat == change(user, DND, DND)
    assert not repeat.visible_changed
    assert await world.store.set_status(user, ON) == change(user, DND, ON)


async def test_set_status_without_a_live_session_is_ignored(world: PresenceWorld) -> None:
    user = world.user()
    assert await world.store.set_status(user, DND) == change(user, OFF, OFF)
    assert await world.store.get_status(user) is OFF
    assert await world.raw_status(user) is None
    await world.store.session_opened("i1", user, "s1")
    await world.store.session_closed("i1", user, "s1")
    assert await world.store.set_status(user, IDLE) == change(user, OFF, OFF)
    assert await world.raw_status(user) is None


async def test_set_status_offline_is_refused(world: PresenceWorld) -> None:
    user = world.user()
    await world.store.session_opened("i1", user, "s1")
    with pytest.raises(ValueError):
        await world.store.set_status(user, OFF)
    assert await world.store.get_status(user) is ON


async def test_closing_an_unknown_session_changes_nothing(world: PresenceWorld) -> None:
    user = world.user()
    assert await world.store.session_closed("i1", user, "nope") == change(user, OFF, OFF)
    await world.store.session_opened("i1", user, "s1")
    await world.store.set_status(user, IDLE)
    assert await world.store.session_closed("i1", user, "nope") == change(user, IDLE, IDLE)
    assert await world.store.session_closed("i1", user, "s1") == change(user, IDLE, OFF)
    # Closing it twice: the second time it is unknown.
    assert await world.store.session_closed("i1", user, "s1") == change(user, OFF, OFF)


async def test_invisible(world: PresenceWorld) -> None:
    user = world.user()
    await world.store.session_opened("i1", user, "s1")
    to_invisible = await world.store.set_status(user, INV)
    assert to_invisible == change(user, ON, INV)
    assert to_invisible.visible_changed  # others see online -> offline
    assert await world.raw_status(user) == "invisible"
    assert await world.store.get_status(user) is INV
    # A new tab of an invisible user stays invisible.
    assert await world.store.session_opened("i2", user, "s2") == change(user, INV, INV)
    assert await world.store.session_closed("i2", user, "s2") == change(user, INV, INV)
    closing = await world.store.session_closed("i1", user, "s1")
    assert closing == change(user, INV, OFF)
    assert not closing.visible_changed  # offline to everyone else already
    assert await world.raw_status(user) is None


async def test_users_are_independent(world: PresenceWorld) -> None:
    alice, bob = world.user(), world.user()
    await world.store.session_opened("i1", alice, "s1")
    await world.store.session_opened("i1", bob, "s2")
    await world.store.set_status(alice, DND)
    assert await world.store.get_status(bob) is ON
    assert await world.store.session_closed("i1", bob, "s2") == change(bob, ON, OFF)
    assert await world.store.get_status(alice) is DND


# -- several instances --------------------------------------------------------------


async def test_two_tabs_on_two_instances(world: PresenceWorld) -> None:
    user = world.user()
    assert await world.store.session_opened("i1", user, "s1") == change(user, OFF, ON)
    assert await world.other.session_opened("i2", user, "s2") == change(user, ON, ON)
    assert await world.other.set_status(user, IDLE) == change(user, ON, IDLE)
    assert await world.store.get_status(user) is IDLE
    assert await world.store.session_closed("i1", user, "s1") == change(user, IDLE, IDLE)
    assert await world.other.session_closed("i2", user, "s2") == change(user, IDLE, OFF)
    assert await world.raw_status(user) is None


async def test_concurrent_close_of_the_last_two_tabs_goes_offline_once(
    world: PresenceWorld,
) -> None:
    for _ in range(10):
        user = world.user()
        await world.store.session_opened("i1", user, "s1")
        await world.other.session_opened("i2", user, "s2")
        results = await asyncio.gather(
            world.store.session_closed("i1", user, "s1"),
            world.other.session_closed("i2", user, "s2"),
        )
        assert sorted(r.after.value for r in results) == ["offline", "online"]
        assert sum(r.visible_changed for r in results) == 1
        assert await world.raw_status(user) is None


async def test_concurrent_first_opens_go_online_once(world: PresenceWorld) -> None:
    user = world.user()
    results = await asyncio.gather(
        world.store.session_opened("i1", user, "s1"),
        world.other.session_opened("i2", user, "s2"),
    )
    assert sorted(results, key=lambda r: r.before.value) == [
        change(user, OFF, ON),
        change(user, ON, ON),
    ]


# -- liveness and reaping ------------------------------------------------------------


async def test_reap_turns_the_users_of_a_dead_instance_offline(world: PresenceWorld) -> None:
    dying, alive = f"dying-{uuid.uuid4().hex}", f"alive-{uuid.uuid4().hex}"
    only_dying, both, only_alive = world.user(), world.user(), world.user()
    await world.store.session_opened(dying, only_dying, "a1")
    await world.store.session_opened(dying, only_dying, "a2")
    await world.store.session_opened(dying, both, "b1")
    await world.other.session_opened(alive, both, "b2")
    await world.other.session_opened(alive, only_alive, "c1")
    await world.store.set_status(both, DND)
    await world.other.keep_alive(alive, LONG_MS)
    await world.store.keep_alive(dying, SHORT_MS)
    assert await world.store.reap() == []  # nobody dead yet

    await world.advance(SHORT_MS / 1000 + 0.1)
    assert await world.other.reap() == [change(only_dying, ON, OFF)]
    assert await world.raw_status(only_dying) is None
    assert await world.store.get_status(both) is DND
    assert await world.store.get_status(only_alive) is ON

    # The dead instance's sessions are gone: closing them changes nothing; the
    # user who also had a session on the live instance goes offline with it.
    assert await world.store.session_closed(dying, only_dying, "a1") == change(only_dying, OFF, OFF)
    assert await world.store.session_closed(dying, both, "b1") == change(both, DND, DND)
    assert await world.other.session_closed(alive, both, "b2") == change(both, DND, OFF)
    assert await world.store.reap() == []


async def test_keep_alive_keeps_an_instance_from_being_reaped(world: PresenceWorld) -> None:
    instance = f"i-{uuid.uuid4().hex}"
    user = world.user()
    await world.store.session_opened(instance, user, "s1")
    await world.store.keep_alive(instance, 600)
    for _ in range(3):
        await world.advance(0.25)
        await world.store.keep_alive(instance, 600)
        assert await world.other.reap() == []
    assert await world.store.get_status(user) is ON
    await world.advance(0.7)
    assert await world.other.reap() == [change(user, ON, OFF)]


async def test_an_instance_that_never_kept_alive_is_not_reaped(world: PresenceWorld) -> None:
    user = world.user()
    await world.store.session_opened(f"i-{uuid.uuid4().hex}", user, "s1")
    await world.advance(0.2)
    assert await world.store.reap() == []
    assert await world.store.get_status(user) is ON


async def test_reap_reports_invisible_users_too(world: PresenceWorld) -> None:
    instance = f"i-{uuid.uuid4().hex}"
    user = world.user()
    await world.store.keep_alive(instance, SHORT_MS)
    await world.store.session_opened(instance, user, "s1")
    await world.store.set_status(user, INV)
    await world.advance(SHORT_MS / 1000 + 0.1)
    reaped = await world.store.reap()
    assert reaped == [change(user, INV, OFF)]
    assert not reaped[0].visible_changed


async def test_a_reaped_instance_that_comes_back_starts_afresh(world: PresenceWorld) -> None:
    instance = f"i-{uuid.uuid4().hex}"
    user = world.user()
    await world.store.keep_alive(instance, SHORT_MS)
    await world.store.session_opened(instance, user, "s1")
    await world.advance(SHORT_MS / 1000 + 0.1)
    assert await world.other.reap() == [change(user, ON, OFF)]
    await world.store.keep_alive(instance, LONG_MS)
    assert await world.store.session_opened(instance, user, "s2") == change(user, OFF, ON)
    assert await world.other.reap() == []
    assert await world.store.get_status(user) is ON


async def test_concurrent_reap_returns_each_change_once(world: PresenceWorld) -> None:
    dead = [f"dead-{i}-{uuid.uuid4().hex}" for i in range(3)]
    users = [world.user() for _ in range(30)]
    for instance in dead:
        await world.store.keep_alive(instance, SHORT_MS)
    for i, user in enumerate(users):
        await world.store.session_opened(dead[i % 3], user, f"s{i}")
    await world.advance(SHORT_MS / 1000 + 0.1)
    results = await asyncio.gather(
        world.store.reap(), world.other.reap(), world.store.reap(), world.other.reap()
    )
    returned = [c for result in results for c in result]
    assert sorted(returned, key=lambda c: c.user_id) == sorted(
        (change(u, ON, OFF) for u in users), key=lambda c: c.user_id
    )
    for user in users:
        assert await world.raw_status(user) is None


async def test_ping(world: PresenceWorld) -> None:
    await world.store.ping()
    await world.other.ping()


# -- Redis only ------------------------------------------------------------------------


async def test_redis_key_layout(redis_url: str) -> None:
    prefix = f"test-{uuid.uuid4().hex}:presence:"
    raw = create_client(redis_url)
    async with RedisPresenceStore.from_url(redis_url, registry_prefix=prefix) as store:
        user, instance = new_user(), f"i-{uuid.uuid4().hex}"
        await store.keep_alive(instance, LONG_MS)
        await store.session_opened(instance, user, "s1")
        await store.set_status(user, IDLE)
        assert await raw.get(f"presence:{user}") == b"idle"
        assert await raw.hgetall(store.sessions_key(user)) == {b"s1": instance.encode()}
        assert await raw.smembers(store.instance_users_key(instance)) == {user.encode()}
        assert await raw.sismember(store.instances_key(), instance)
        assert 0 < await raw.pttl(store.instance_alive_key(instance)) <= LONG_MS
        await store.session_closed(instance, user, "s1")
        assert await raw.exists(f"presence:{user}") == 0
        assert await raw.exists(store.sessions_key(user)) == 0
        assert await raw.exists(store.instance_users_key(instance)) == 0
        keys = [k async for k in raw.scan_iter(match=f"{prefix}*")]
        await raw.delete(*keys)
    await raw.aclose()


async def test_redis_status_key_written_by_others_is_read(redis_url: str) -> None:
    """``presence:{userId}`` is external: an ``offline`` or unknown value reads as
    offline, and the next transition overwrites it."""
    raw = create_client(redis_url)
    async with RedisPresenceStore.from_url(
        redis_url, registry_prefix=f"test-{uuid.uuid4().hex}:presence:"
    ) as store:
        user = new_user()
        await raw.set(presence_key(user), "offline")
        assert await store.get_status(user) is OFF
        assert await store.session_opened("i1", user, "s1") == change(user, OFF, ON)
        assert await raw.get(presence_key(user)) == b"online"
        await store.session_closed("i1", user, "s1")
    await raw.aclose()


async def test_redis_store_reports_an_unreachable_server() -> None:
    async with RedisPresenceStore.from_url("redis://127.0.0.1:1/15", timeout=0.5) as store:
        for call in (
            store.ping(),
            store.get_status("u"),
            store.session_opened("i", "u", "s"),
            store.reap(),
        ):
            with pytest.raises(BackendUnavailable):
                await call


async def test_get_statuses_in_order_in_one_call(world: PresenceWorld) -> None:
    """PRESENCE_SNAPSHOT's read (PROTOCOL 14): each user's status, in the order asked."""
    online, dnd, invisible, never = (world.user() for _ in range(4))
    await world.store.session_opened("i1", online, "a")
    await world.store.session_opened("i1", dnd, "b")
    await world.store.set_status(dnd, DND)
    await world.store.session_opened("i1", invisible, "c")
    await world.store.set_status(invisible, INV)
    asked = [never, invisible, online, dnd, online]
    assert await world.store.get_statuses(asked) == [OFF, INV, ON, DND, ON]
    assert await world.store.get_statuses([]) == []
    await world.store.session_closed("i1", online, "a")
    assert await world.other.get_statuses([online, dnd]) == [OFF, DND]
