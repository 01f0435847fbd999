"""Several gateway instances in one process, one real Redis, one directory.

Each instance is served by its own Hypercorn on its own port and has its own Redis
broker, typing gate and presence store (:func:`open_redis_backends`); clients are
real WebSockets. Together the instances must behave like one gateway (PROTOCOL
sections 7, 7a and 8): exactly once per connection, wherever the publisher and the
subscribers are.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from domain import keys
from domain.model import Status
from tests.multi.conftest import (
    QUIET,
    LiveClient,
    RedisProbe,
    StartCluster,
    World,
    eventually,
    quiet,
)

pytestmark = pytest.mark.redis


def event(n: int, op: str = "MESSAGE_CREATE") -> dict[str, Any]:
    return {"op": op, "d": {"n": n}}


async def expect_all(clients: list[LiveClient], op: str, d: Any) -> None:
    await asyncio.gather(*(c.expect_event(op, d) for c in clients))


def presence_update(user_id: str, server_id: str, status: str) -> dict[str, str]:
    return {"userId": user_id, "serverId": server_id, "status": status}


async def subscribe_all(clients: list[LiveClient], *server_ids: str) -> None:
    for client in clients:
        for server_id in server_ids:
            await client.subscribe(server_id)


# --- publishing -------------------------------------------------------------------


async def test_publish_to_server_reaches_each_subscriber_on_every_instance_once(
    start_cluster: StartCluster, world: World, probe: RedisProbe
) -> None:
    a, b, c = await start_cluster(3)
    subscribers = [
        await a.login(world.u1),
        await b.login(world.u2),
        await b.login(world.u1, "B/u1 second tab"),
        await c.login(world.u3),
    ]
    bystander = await a.login(world.u2, "A/u2 not subscribed")
    await subscribe_all(subscribers, world.s1)

    # In-process publishers on two different instances.
    assert await a.gateway.publish_to_server(world.s1, event(1))
    await expect_all(subscribers, "MESSAGE_CREATE", {"n": 1})
    assert await b.gateway.publish_to_server(world.s1, event(2))
    await expect_all(subscribers, "MESSAGE_CREATE", {"n": 2})

    # Another service, straight into Redis: one subscriber connection per instance
    # (not per client connection) receives it, and each client gets it once.
    assert await probe.publish_server(world.s1, event(3)) == 3
    await expect_all(subscribers, "MESSAGE_CREATE", {"n": 3})

    # An invalid envelope is dropped and counted, never fatal; an event without d
    # is delivered with d null.
    assert await probe.publish_raw(keys.server_channel(world.s1), b"{not json") == 3
    assert await probe.publish_server(world.s1, {"op": "PING_EVENT"}) == 3
    await expect_all(subscribers, "PING_EVENT", None)
    for instance in (a, b, c):
        registry = instance.gateway.metrics.registry
        assert registry.get_sample_value("gateway_invalid_envelopes_total") == 1

    await quiet(*subscribers, bystander)


async def test_publish_to_channel_respects_permissions_across_instances(
    start_cluster: StartCluster, world: World, probe: RedisProbe
) -> None:
    a, b = await start_cluster(2)
    owner = await a.login(world.u1)  # owner of s1: reads the mods-only c3
    mod = await b.login(world.u2)  # role mods: reads c3
    plain_a = await a.login(world.u3)  # reads c1, not c3
    plain_b = await b.login(world.u3, "B/u3 second tab")
    everyone = [owner, mod, plain_a, plain_b]
    await subscribe_all(everyone, world.s1)

    assert await a.gateway.publish_to_channel(world.c3, world.s1, event(1))
    assert await b.gateway.publish_to_channel(world.c1, world.s1, event(2))
    await expect_all([owner, mod], "MESSAGE_CREATE", {"n": 1})
    # The next frame u3's tabs get is the c1 event: the c3 one was skipped.
    await expect_all(everyone, "MESSAGE_CREATE", {"n": 2})

    await probe.publish_server(world.s1, event(3), channel_id=world.c3)
    await probe.publish_server(world.s1, event(4), channel_id=world.c1)
    await expect_all([owner, mod], "MESSAGE_CREATE", {"n": 3})
    await expect_all(everyone, "MESSAGE_CREATE", {"n": 4})

    # Channel-scoped and excluding a user at once.
    assert await b.gateway.publish_to_channel(world.c3, world.s1, event(5), world.u2)
    await owner.expect_event("MESSAGE_CREATE", {"n": 5})
    await quiet(*everyone)


async def test_publish_to_user_reaches_the_users_tabs_on_every_instance(
    start_cluster: StartCluster, world: World, probe: RedisProbe
) -> None:
    a, b = await start_cluster(2)
    tabs = [await a.login(world.u1), await b.login(world.u1, "B/u1 second tab")]
    others = [await a.login(world.u2), await b.login(world.u3)]

    assert await a.gateway.publish_to_user(world.u1, event(1, "NOTIFICATION"))
    await expect_all(tabs, "NOTIFICATION", {"n": 1})
    assert await b.gateway.publish_to_user(world.u1, event(2, "NOTIFICATION"))
    await expect_all(tabs, "NOTIFICATION", {"n": 2})
    assert await probe.publish_user(world.u1, event(3, "NOTIFICATION")) == 2
    await expect_all(tabs, "NOTIFICATION", {"n": 3})
    await quiet(*tabs, *others)


async def test_exclude_user_id_skips_every_connection_of_that_user_everywhere(
    start_cluster: StartCluster, world: World, probe: RedisProbe
) -> None:
    a, b = await start_cluster(2)
    u1_tabs = [await a.login(world.u1), await b.login(world.u1, "B/u1 second tab")]
    u2 = await b.login(world.u2)
    u3 = await a.login(world.u3)
    everyone = [*u1_tabs, u2, u3]
    await subscribe_all(everyone, world.s1)

    assert await a.gateway.publish_to_server(world.s1, event(1), exclude_user_id=world.u1)
    await probe.publish_server(world.s1, event(2), exclude_user_id=world.u2)
    assert await b.gateway.publish_to_server(world.s1, event(3))
    await expect_all([u2, u3], "MESSAGE_CREATE", {"n": 1})
    await expect_all([*u1_tabs, u3], "MESSAGE_CREATE", {"n": 2})
    # Each connection's next frame is event 3: nothing excluded was delivered.
    await expect_all(everyone, "MESSAGE_CREATE", {"n": 3})
    await quiet(*everyone)


# --- typing -----------------------------------------------------------------------


async def test_typing_is_deduplicated_across_instances(
    start_cluster: StartCluster, world: World, probe: RedisProbe
) -> None:
    a, b = await start_cluster(2)
    typer_a = await a.login(world.u2)  # mod: reads c1 and c3
    typer_b = await b.login(world.u2, "B/u2 second tab")
    owner_b = await b.login(world.u1)  # reads c1 and c3
    plain_a = await a.login(world.u3)  # reads c1 only
    plain_b = await b.login(world.u3, "B/u3 second tab")
    everyone = [typer_a, typer_b, owner_b, plain_a, plain_b]
    readers = [owner_b, plain_a, plain_b]
    await subscribe_all(everyone, world.s1)

    before = int(time.time() * 1000)
    await typer_a.send_op("TYPING_START", {"channelId": world.c1})
    frames = await asyncio.gather(*(r.expect("TYPING_START") for r in readers))
    for frame in frames:
        d = frame["d"]
        assert set(d) == {"channelId", "serverId", "userId", "username", "timestamp"}, d
        assert (d["channelId"], d["serverId"], d["userId"]) == (world.c1, world.s1, world.u2)
        assert d["username"] == world.id("bob")
        assert isinstance(d["timestamp"], int)
        assert before - 1000 <= d["timestamp"] <= int(time.time() * 1000) + 1000
    assert frames[0]["d"] == frames[1]["d"] == frames[2]["d"]  # one event, fanned out
    ttl = await probe.client.pttl(keys.typing_key(world.c1, world.u2))
    assert 0 < ttl <= 10_000, ttl

    # The same user typing again from a tab on the other instance, inside the TTL:
    # the key is shared, so nobody hears it (and the typer gets no ERROR).
    await typer_b.send_op("TYPING_START", {"channelId": world.c1})
    await typer_b.heartbeat()  # the typing frame was handled
    await quiet(*everyone)

    # Typing in the mods-only channel reaches its readers only.
    await typer_b.send_op("TYPING_START", {"channelId": world.c3})
    frame = await owner_b.expect("TYPING_START")
    assert frame["d"]["channelId"] == world.c3
    await plain_b.send_op("TYPING_START", {"channelId": world.c3})
    await plain_b.expect_error("FORBIDDEN", "TYPING_START")
    await quiet(*everyone)

    # Two tabs on two instances typing at the same moment: one key, one event.
    await asyncio.gather(
        plain_a.send_op("TYPING_START", {"channelId": world.c1}),
        plain_b.send_op("TYPING_START", {"channelId": world.c1}),
    )
    for reader in (owner_b, typer_a, typer_b):
        frame = await reader.expect("TYPING_START")
        assert frame["d"]["userId"] == world.u3
    await quiet(*everyone)


# --- presence ---------------------------------------------------------------------


async def test_presence_is_per_user_across_instances(
    start_cluster: StartCluster, world: World, probe: RedisProbe
) -> None:
    cluster = await start_cluster(2)
    a, b = cluster
    watcher_a = await a.login(world.u3)  # member of s1 and s2
    watcher_b = await b.login(world.u2)  # member of s1 and s2
    watchers = [watcher_a, watcher_b]
    await subscribe_all(watchers, world.s1, world.s2)

    # First READY anywhere: online, once per shared server (u1 is in s1 only).
    tab_a = await a.login(world.u1)
    assert tab_a.ready["d"]["user"]["status"] == "online"
    await expect_all(watchers, "PRESENCE_UPDATE", presence_update(world.u1, world.s1, "online"))
    assert await probe.presence(world.u1) == "online"
    assert cluster.directory.statuses[world.u1] is Status.ONLINE

    # A second tab on the other instance changes nothing.
    tab_b = await b.login(world.u1, "B/u1 second tab")
    assert tab_b.ready["d"]["user"]["status"] == "online"
    await quiet(*watchers)

    # Closing one of the two tabs (on different instances) changes nothing.
    await tab_a.close()
    await probe.wait_sessions(world.u1, [b.gateway.instance_id])
    await quiet(*watchers)
    assert await probe.presence(world.u1) == "online"

    # Closing the last one anywhere: offline, once, and the key is deleted.
    await tab_b.close()
    await expect_all(watchers, "PRESENCE_UPDATE", presence_update(world.u1, world.s1, "offline"))
    await probe.wait_presence(world.u1, None)
    assert await probe.sessions(world.u1) == {}
    assert cluster.directory.statuses[world.u1] is Status.OFFLINE

    # A user in both servers: one PRESENCE_UPDATE per shared server.
    u4 = await b.login(world.u4)  # member of s2 only
    await expect_all(watchers, "PRESENCE_UPDATE", presence_update(world.u4, world.s2, "online"))
    await u4.close()
    await expect_all(watchers, "PRESENCE_UPDATE", presence_update(world.u4, world.s2, "offline"))
    await quiet(*watchers)


async def test_last_two_tabs_closing_at_once_on_two_instances_broadcast_one_offline(
    start_cluster: StartCluster, world: World, probe: RedisProbe
) -> None:
    a, b = await start_cluster(2)
    watchers = [await a.login(world.u3), await b.login(world.u2)]
    await subscribe_all(watchers, world.s1)
    for round_ in range(5):
        tabs = [
            await a.login(world.u1, f"A/u1 round {round_}"),
            await b.login(world.u1, f"B/u1 round {round_}"),
        ]
        await expect_all(
            watchers, "PRESENCE_UPDATE", presence_update(world.u1, world.s1, "online")
        )
        await asyncio.gather(*(tab.close() for tab in tabs))
        await expect_all(
            watchers, "PRESENCE_UPDATE", presence_update(world.u1, world.s1, "offline")
        )
        await quiet(*watchers)
        await probe.wait_presence(world.u1, None)


async def test_presence_update_applies_to_every_tab_on_every_instance(
    start_cluster: StartCluster, world: World, probe: RedisProbe
) -> None:
    cluster = await start_cluster(2)
    a, b = cluster
    watcher = await a.login(world.u3)
    u2_a = await a.login(world.u2)  # in s1 and s2
    await subscribe_all([watcher, u2_a], world.s1, world.s2)

    await u2_a.send_op("PRESENCE_UPDATE", {"status": "dnd"})
    expected = [
        presence_update(world.u2, world.s1, "dnd"),
        presence_update(world.u2, world.s2, "dnd"),
    ]
    for client in (watcher, u2_a):  # the user's own subscribed tab gets it too (7a)
        frames = await client.events(2)
        assert sorted((f["op"], f["d"]["serverId"]) for f in frames) == [
            ("PRESENCE_UPDATE", world.s1),
            ("PRESENCE_UPDATE", world.s2),
        ]
        assert sorted((f["d"] for f in frames), key=lambda d: d["serverId"]) == expected
    await probe.wait_presence(world.u2, "dnd")
    assert cluster.directory.statuses[world.u2] is Status.DND

    # A new tab elsewhere sees the status its other tabs set, and changes nothing.
    u2_b = await b.login(world.u2, "B/u2 second tab")
    assert u2_b.ready["d"]["user"]["status"] == "dnd"
    await quiet(watcher, u2_a)

    # From the other tab: invisible, shown to others as offline.
    await u2_b.send_op("PRESENCE_UPDATE", {"status": "invisible"})
    frames = await watcher.events(2)
    assert {f["d"]["status"] for f in frames} == {"offline"}
    assert {f["d"]["serverId"] for f in frames} == {world.s1, world.s2}
    await probe.wait_presence(world.u2, "invisible")
    await u2_a.events(2)

    # Invisible -> gone: the visible status stays offline, no broadcast.
    await u2_a.close()
    await u2_b.close()
    await probe.wait_presence(world.u2, None)
    await quiet(watcher)


# --- membership -------------------------------------------------------------------


async def test_member_remove_unsubscribes_the_user_on_every_instance(
    start_cluster: StartCluster, world: World, probe: RedisProbe
) -> None:
    a, b, c = await start_cluster(3)
    removed = [
        await a.login(world.u3),
        await b.login(world.u3, "B/u3 second tab"),
        await c.login(world.u3, "C/u3 only subscriber on C"),
    ]
    u1 = await a.login(world.u1)
    u2 = await b.login(world.u2)
    await subscribe_all([*removed, u1, u2], world.s1)
    await subscribe_all(removed[:2], world.s2)
    assert await probe.publish_server(world.s1, event(0)) == 3
    await expect_all([*removed, u1, u2], "MESSAGE_CREATE", {"n": 0})

    remove = {"op": "SERVER_MEMBER_REMOVE", "d": {"userId": world.u3, "serverId": world.s1}}
    assert await a.gateway.publish_to_server(world.s1, remove)
    for client in removed:
        await client.expect_event("SERVER_MEMBER_REMOVE", remove["d"])
        await client.expect_event("UNSUBSCRIBED", {"serverId": world.s1})
    await expect_all([u1, u2], "SERVER_MEMBER_REMOVE", remove["d"])

    # Nothing more from s1 for u3 anywhere; s2 still flows; C, with no subscriber
    # left, unsubscribed its broker from the server's channel.
    await eventually(
        lambda: keys.server_channel(world.s1) not in c.broker.subscribed_channels,
        what="C to unsubscribe from s1",
    )
    await probe.wait_numsub(keys.server_channel(world.s1), 2)
    assert await b.gateway.publish_to_server(world.s1, event(1))
    assert await probe.publish_server(world.s1, event(2)) == 2
    await expect_all([u1, u2], "MESSAGE_CREATE", {"n": 1})
    await expect_all([u1, u2], "MESSAGE_CREATE", {"n": 2})
    assert await c.gateway.publish_to_server(world.s2, event(3))
    await expect_all(removed[:2], "MESSAGE_CREATE", {"n": 3})
    await quiet(*removed, u1, u2)


# --- exactly once, in order, under load ------------------------------------------


async def test_exactly_once_in_order_under_many_publishes_from_every_side(
    start_cluster: StartCluster, world: World, probe: RedisProbe
) -> None:
    a, b, c = await start_cluster(3)
    clients: list[LiveClient] = []
    for instance in (a, b, c):
        for user in (world.u1, world.u2, world.u3):
            clients.append(await instance.login(user, f"{instance.name}/{user}"))
    await subscribe_all(clients, world.s1)

    per_publisher = {"A": 200, "B": 200, "redis": 100}
    total = sum(per_publisher.values())

    async def publish_from(name: str) -> None:
        for i in range(per_publisher[name]):
            body = {"op": "MESSAGE_CREATE", "d": {"pub": name, "i": i}}
            if name == "redis":
                assert await probe.publish_server(world.s1, body) == 3
            else:
                gateway = (a if name == "A" else b).gateway
                assert await gateway.publish_to_server(world.s1, body)
            if i % 20 == 0:
                await asyncio.sleep(0)

    async def receive(client: LiveClient) -> list[tuple[str, int]]:
        frames = await client.events(total, within=30)
        return [(f["d"]["pub"], f["d"]["i"]) for f in frames]

    started = time.monotonic()
    receivers = [asyncio.create_task(receive(client)) for client in clients]
    await asyncio.gather(*(publish_from(name) for name in per_publisher))
    results = await asyncio.gather(*receivers)
    elapsed = time.monotonic() - started
    print(f"\n{total} events x {len(clients)} connections on 3 instances in {elapsed:.2f}s")

    expected = {(name, i) for name, n in per_publisher.items() for i in range(n)}
    for client, got in zip(clients, results, strict=True):
        assert len(got) == total and set(got) == expected, client.name  # exactly once
        for name, n in per_publisher.items():  # per-publisher order
            assert [i for pub, i in got if pub == name] == list(range(n)), client.name
        assert client.seq == 2 + total  # READY, SUBSCRIBED, then gapless (checked per frame)
    await quiet(*clients, within=QUIET)


async def test_presence_interest_in_a_large_server_across_instances(
    start_cluster: StartCluster, world: World
) -> None:
    """PROTOCOL 14 on two instances: interest is kept per connection on its own
    instance, the broadcast goes over the server's channel, each instance filters."""
    a, b = await start_cluster(2, env={"GATEWAY_LARGE_SERVER_MEMBERS": "2"})
    carol_a = await a.login(world.u3, "A/carol asks for bob")
    alice_a = await a.login(world.u1, "A/alice asks for nobody")
    alice_b = await b.login(world.u1, "B/alice asks for bob")
    await subscribe_all([carol_a, alice_a, alice_b], world.s1)
    for client in (carol_a, alice_b):
        await client.send_op("SUBSCRIBE_PRESENCE", {"serverId": world.s1, "userIds": [world.u2]})
        snap = await client.expect("PRESENCE_SNAPSHOT")
        assert snap["d"]["presences"] == [{"userId": world.u2, "status": "offline"}]
    bob_b = await b.login(world.u2, "B/bob")
    await bob_b.subscribe(world.s1)
    await expect_all([carol_a, alice_b], "PRESENCE_UPDATE",
                     presence_update(world.u2, world.s1, "online"))
    await bob_b.send_op("PRESENCE_UPDATE", {"status": "dnd"})
    dnd = presence_update(world.u2, world.s1, "dnd")
    await expect_all([carol_a, alice_b, bob_b], "PRESENCE_UPDATE", dnd)
    await quiet(alice_a, carol_a, alice_b, bob_b)
    # The other instance's view of bob agrees with the one his own instance wrote.
    await alice_a.send_op("SUBSCRIBE_PRESENCE", {"serverId": world.s1, "userIds": [world.u2]})
    snap = await alice_a.expect("PRESENCE_SNAPSHOT")
    assert snap["d"]["presences"] == [{"userId": world.u2, "status": "dnd"}]
    await carol_a.unsubscribe(world.s1)
    await bob_b.send_op("PRESENCE_UPDATE", {"status": "idle"})
    idle = presence_update(world.u2, world.s1, "idle")
    await expect_all([alice_a, alice_b, bob_b], "PRESENCE_UPDATE", idle)
    await quiet(carol_a)
    assert a.gateway.interest.size() == (1, 1) and b.gateway.interest.size() == (1, 1)
