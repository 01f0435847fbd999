"""Subscriptions and routing (PROTOCOL sections 7, 7a, 8): who receives what, exactly
once and in order, through the in-process publishers and raw broker envelopes.

Clients identify first and subscribe after, so that presence broadcasts of later
logins do not interleave with the events under test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from domain.model import Channel, Overwrite
from tests.blackbox.conftest import Client, GatewayServer, StartGateway, assert_quiet

MESSAGE = {"op": "MESSAGE_CREATE", "d": {"id": "m1", "content": "hello", "n": [1, 2.5, None]}}


async def _receives(clients: list[Client], event: dict[str, Any]) -> None:
    for client in clients:
        await client.expect_event(event["op"], event.get("d"))


async def _nothing(clients: list[Client]) -> None:
    await assert_quiet(*clients)


# --- subscriptions ------------------------------------------------------------------


async def test_server_event_reaches_exactly_its_subscribers(harness: GatewayServer) -> None:
    alice_sub = await harness.login("u1", "alice-sub")
    alice_idle = await harness.login("u1", "alice-idle")
    bob = await harness.login("u2", "bob")
    carol = await harness.login("u3", "carol")
    dave = await harness.login("u4", "dave")
    unidentified = await harness.connect("unidentified")
    await alice_sub.subscribe("s1")
    await bob.subscribe("s1")
    await carol.subscribe("s2")
    await dave.subscribe("s2")

    await harness.gateway.publish_to_server("s1", MESSAGE)
    await _receives([alice_sub, bob], MESSAGE)
    await _nothing([alice_idle, carol, dave, unidentified, alice_sub, bob])

    other = {"op": "GAME_START", "d": {"x": 1}}
    await harness.gateway.publish_to_server("s2", other)
    await _receives([carol, dave], other)
    await _nothing([alice_sub, alice_idle, bob, carol, dave])


async def test_two_tabs_of_one_user_subscribe_independently(harness: GatewayServer) -> None:
    tab1 = await harness.login("u1", "tab1")
    tab2 = await harness.login("u1", "tab2")
    await tab1.subscribe("s1")
    await harness.gateway.publish_to_server("s1", MESSAGE)
    await _receives([tab1], MESSAGE)
    await _nothing([tab2])

    await tab2.subscribe("s1")
    await harness.gateway.publish_to_server("s1", MESSAGE)
    await _receives([tab1, tab2], MESSAGE)

    await tab1.unsubscribe("s1")
    await harness.gateway.publish_to_server("s1", MESSAGE)
    await _receives([tab2], MESSAGE)
    await _nothing([tab1, tab2])


async def test_repeated_subscribe_answers_subscribed_and_delivers_once(
    harness: GatewayServer,
) -> None:
    alice = await harness.login("u1")
    await alice.subscribe("s1")
    await alice.subscribe("s1")
    await alice.subscribe("s1")
    await harness.gateway.publish_to_server("s1", MESSAGE)
    await _receives([alice], MESSAGE)
    await _nothing([alice])


async def test_subscribe_twice_then_unsubscribe_once_ends_delivery(
    harness: GatewayServer,
) -> None:
    alice = await harness.login("u1")
    await alice.subscribe("s1")
    await alice.subscribe("s1")
    await alice.unsubscribe("s1")
    await harness.gateway.publish_to_server("s1", MESSAGE)
    await _nothing([alice])
    assert harness.gateway.snapshot().servers == {}


async def test_unsubscribe_is_always_answered_unsubscribed(harness: GatewayServer) -> None:
    dave = await harness.login("u4")
    await dave.unsubscribe("s2")  # a member, never subscribed
    await dave.unsubscribe("s1")  # not a member
    await dave.unsubscribe("s-nope")  # no such server
    await dave.subscribe("s2")
    await dave.unsubscribe("s2")
    await dave.unsubscribe("s2")  # again
    await harness.gateway.publish_to_server("s2", MESSAGE)
    await _nothing([dave])


# --- excludeUserId and channel-scoped events ----------------------------------------


async def test_exclude_user_id_skips_every_connection_of_that_user(
    harness: GatewayServer,
) -> None:
    alice1 = await harness.login("u1", "alice1")
    alice2 = await harness.login("u1", "alice2")
    bob = await harness.login("u2", "bob")
    for client in (alice1, alice2, bob):
        await client.subscribe("s1")

    await harness.gateway.publish_to_server("s1", MESSAGE, exclude_user_id="u1")
    await _receives([bob], MESSAGE)
    await _nothing([alice1, alice2])

    await harness.gateway.publish_to_channel("c1", "s1", MESSAGE, exclude_user_id="u2")
    await _receives([alice1, alice2], MESSAGE)
    await _nothing([bob])


async def test_channel_scoped_event_reaches_only_readers_of_the_channel(
    harness: GatewayServer,
) -> None:
    alice = await harness.login("u1", "alice")  # owner of s1: every permission
    bob = await harness.login("u2", "bob")  # r-mods: may read c3
    carol = await harness.login("u3", "carol")  # @everyone only: may not read c3
    carol_unsubscribed = await harness.login("u3", "carol-unsubscribed")
    for client in (alice, bob, carol):
        await client.subscribe("s1")

    await harness.gateway.publish_to_channel("c3", "s1", MESSAGE)
    await _receives([alice, bob], MESSAGE)
    await _nothing([carol, carol_unsubscribed])

    await harness.gateway.publish_to_channel("c1", "s1", MESSAGE)
    await _receives([alice, bob, carol], MESSAGE)
    await _nothing([carol_unsubscribed])

    await harness.gateway.publish_to_channel("c3", "s1", MESSAGE, exclude_user_id="u2")
    await _receives([alice], MESSAGE)
    await _nothing([alice, bob, carol])


@pytest.mark.parametrize(
    "op", ["CHANNEL_UPDATE", "CHANNEL_DELETE", "ROLE_UPDATE", "ROLE_DELETE",
           "SERVER_MEMBER_UPDATE"]
)
async def test_permission_changing_events_invalidate_cached_permissions(
    harness: GatewayServer, op: str
) -> None:
    alice = await harness.login("u1", "alice")
    bob = await harness.login("u2", "bob")
    carol = await harness.login("u3", "carol")
    for client in (alice, bob, carol):
        await client.subscribe("s1")
    # Fill whatever cache there is with c1 readable by everyone.
    await harness.gateway.publish_to_channel("c1", "s1", MESSAGE)
    await _receives([alice, bob, carol], MESSAGE)

    # The owning service hides c1 from @everyone except r-mods, then announces it.
    harness.directory.put_channel(Channel(
        id="c1", server_id="s1", name="general", type="text",
        overwrites=(Overwrite(id="s1", type="role", allow=0, deny=1024),
                    Overwrite(id="r-mods", type="role", allow=1024, deny=0)),
    ))
    announcement = {"op": op, "d": {"serverId": "s1", "id": "c1"}}
    await harness.gateway.publish_to_server("s1", announcement)
    await _receives([alice, bob, carol], announcement)

    await harness.gateway.publish_to_channel("c1", "s1", MESSAGE)
    await _receives([alice, bob], MESSAGE)
    await _nothing([carol])


# --- user events --------------------------------------------------------------------


async def test_user_event_reaches_every_connection_of_the_user(harness: GatewayServer) -> None:
    carol_sub = await harness.login("u3", "carol-sub")
    carol_plain = await harness.login("u3", "carol-plain")
    bob = await harness.login("u2", "bob")
    unidentified = await harness.connect("unidentified")
    await carol_sub.subscribe("s1")
    await bob.subscribe("s1")

    direct = {"op": "DM_CREATE", "d": {"from": "u2", "text": "hi"}}
    await harness.gateway.publish_to_user("u3", direct)
    await _receives([carol_sub, carol_plain], direct)
    await _nothing([bob, unidentified])

    # A connection receives user events as soon as it is READY (7a).
    carol_new = await harness.connect("carol-new")
    await carol_new.identify(harness.mint("u3"))
    await harness.gateway.publish_to_user("u3", direct)
    await _receives([carol_sub, carol_plain, carol_new], direct)


# --- order and exactly-once -----------------------------------------------------------


async def test_events_from_one_publisher_arrive_in_publish_order(harness: GatewayServer) -> None:
    alice1 = await harness.login("u1", "alice1")
    alice2 = await harness.login("u1", "alice2")
    bob = await harness.login("u2", "bob")
    for client in (alice1, alice2, bob):
        await client.subscribe("s1")
    await alice1.subscribe("s1")

    for i in range(200):
        await harness.gateway.publish_to_server("s1", {"op": "SEQ", "d": {"i": i}})
    for client in (alice1, alice2, bob):
        for i in range(200):
            await client.expect_event("SEQ", {"i": i})
    await _nothing([alice1, alice2, bob])

    # Interleaved server, channel and user events of one publisher keep their order.
    expected: list[int] = []
    for i in range(60):
        if i % 3 == 0:
            await harness.gateway.publish_to_server("s1", {"op": "MIX", "d": {"i": i}})
        elif i % 3 == 1:
            await harness.gateway.publish_to_channel("c1", "s1", {"op": "MIX", "d": {"i": i}})
        else:
            await harness.gateway.publish_to_user("u1", {"op": "MIX", "d": {"i": i}})
        expected.append(i)
    for i in expected:
        await alice1.expect_event("MIX", {"i": i})
    for i in expected:
        if i % 3 != 2:
            await bob.expect_event("MIX", {"i": i})
    await _nothing([alice1, bob])


# --- raw envelopes through the broker -------------------------------------------------

INVALID_ENVELOPES: list[bytes] = [
    b"not json",
    b"\xff\xfe\x00",
    b"",
    b"[]",
    b'"event"',
    b"null",
    b"{}",
    b'{"event": null}',
    b'{"event": "MESSAGE_CREATE"}',
    b'{"event": ["MESSAGE_CREATE"]}',
    b'{"event": {"d": {}}}',
    b'{"event": {"op": 5, "d": {}}}',
    b'{"event": {"op": null, "d": {}}}',
    b'{"event": {"op": "X", "d": {}}, "channelId": 5}',
    b'{"event": {"op": "X", "d": {}}, "channelId": ["c1"]}',
    b'{"event": {"op": "X", "d": {}}, "channelId": {"id": "c1"}}',
    b'{"event": {"op": "X", "d": {}}, "excludeUserId": 7}',
    b'{"event": {"op": "X", "d": {}}, "excludeUserId": false}',
]


async def test_raw_envelopes_invalid_ones_are_dropped_and_counted(
    harness: GatewayServer,
) -> None:
    alice = await harness.login("u1", "alice")
    carol = await harness.login("u3", "carol")
    await alice.subscribe("s1")
    await carol.subscribe("s1")
    broker = harness.gateway.broker
    before = await harness.metric("gateway_invalid_envelopes_total")

    for payload in INVALID_ENVELOPES:
        await broker.publish("ws:server:s1", payload)
        await broker.publish("ws:user:u1", payload)
    await _nothing([alice, carol])
    after = await harness.metric("gateway_invalid_envelopes_total")
    assert after - before == 2 * len(INVALID_ENVELOPES)

    valid: list[tuple[str, dict[str, Any], list[Client], dict[str, Any]]] = [
        # An event without d is delivered with "d": null.
        ("ws:server:s1", {"event": {"op": "NO_D"}}, [alice, carol], {"op": "NO_D", "d": None}),
        ("ws:server:s1", {"event": {"op": "FULL", "d": {"k": [1]}}, "channelId": None,
                          "excludeUserId": None, "extra": {"ignored": True}},
         [alice, carol], {"op": "FULL", "d": {"k": [1]}}),
        ("ws:server:s1", {"event": {"op": "SCOPED", "d": 1, "extra": 2}, "channelId": "c3"},
         [alice], {"op": "SCOPED", "d": 1}),
        ("ws:server:s1", {"event": {"op": "EXCL", "d": "x"}, "excludeUserId": "u1"},
         [carol], {"op": "EXCL", "d": "x"}),
        ("ws:user:u3", {"event": {"op": "DIRECT"}}, [carol], {"op": "DIRECT", "d": None}),
        ("ws:user:u1", {"event": {"op": "DIRECT", "d": [True]}, "whatever": 1},
         [alice], {"op": "DIRECT", "d": [True]}),
    ]
    for channel, envelope, _, _ in valid:
        await broker.publish(channel, json.dumps(envelope).encode())
    # Each client gets exactly its events, in publish order, and nothing else.
    for client in (alice, carol):
        for _, _, receivers, event in valid:
            if client in receivers:
                await client.expect_event(event["op"], event["d"])
    await _nothing([alice, carol])
    assert await harness.metric("gateway_invalid_envelopes_total") == after

    # The gateway is unharmed: in-process publishing still works.
    await harness.gateway.publish_to_server("s1", MESSAGE)
    await _receives([alice, carol], MESSAGE)


async def test_events_for_a_server_nobody_subscribed_go_nowhere(harness: GatewayServer) -> None:
    alice = await harness.login("u1")
    await harness.gateway.publish_to_server("s1", MESSAGE)
    await harness.gateway.publish_to_server("s-nope", MESSAGE)
    await harness.gateway.publish_to_user("u999", MESSAGE)
    await _nothing([alice])


# --- SERVER_MEMBER_REMOVE -------------------------------------------------------------


async def test_member_remove_unsubscribes_the_removed_user_after_the_event(
    harness: GatewayServer,
) -> None:
    alice = await harness.login("u1", "alice")
    carol1 = await harness.login("u3", "carol1")
    carol2 = await harness.login("u3", "carol2")
    carol_other = await harness.login("u3", "carol-not-subscribed-to-s1")
    await alice.subscribe("s1")
    await carol1.subscribe("s1")
    await carol1.subscribe("s2")
    await carol2.subscribe("s1")
    await carol_other.subscribe("s2")

    harness.directory.remove_member("s1", "u3")  # the owning service's change
    removal = {"op": "SERVER_MEMBER_REMOVE", "d": {"serverId": "s1", "userId": "u3"}}
    await harness.gateway.publish_to_server("s1", removal)
    await _receives([alice], removal)
    for carol in (carol1, carol2):
        await carol.expect_event("SERVER_MEMBER_REMOVE", removal["d"])
        await carol.expect_event("UNSUBSCRIBED", {"serverId": "s1"})
    await _nothing([carol_other])

    after = {"op": "MESSAGE_CREATE", "d": {"id": "m2"}}
    await harness.gateway.publish_to_server("s1", after)
    await _receives([alice], after)
    await _nothing([carol1, carol2, carol_other, alice])
    # Other servers are untouched.
    await harness.gateway.publish_to_server("s2", after)
    await _receives([carol1, carol_other], after)
    # Not a member any more: subscribing again is refused (no stale permission cache).
    await carol1.send_op("SUBSCRIBE_SERVER", {"serverId": "s1"})
    await carol1.expect_error("FORBIDDEN", "SUBSCRIBE_SERVER")
    snapshot = harness.gateway.snapshot()
    assert not snapshot.servers.get("s1", frozenset()) & snapshot.users["u3"]


# --- permissions (section 9) through a fixture file (section 11) ----------------------

READ = 1 << 10
PERMISSIONS_FIXTURE: dict[str, Any] = {
    "users": [{"id": f"p{i}", "username": f"user{i}", "displayName": None, "avatarUrl": None}
              for i in range(1, 7)],
    "servers": [{"id": "ps", "name": "Perms", "ownerId": "p1", "iconUrl": None}],
    # No @everyone role: it defaults to READ_MESSAGES | SEND_MESSAGES.
    "roles": [{"id": "admin", "serverId": "ps", "name": "admin", "permissions": 1 << 3},
              {"id": "ra", "serverId": "ps", "name": "a", "permissions": 0},
              {"id": "rb", "serverId": "ps", "name": "b", "permissions": 0}],
    "members": [{"serverId": "ps", "userId": "p1", "roleIds": []},
                {"serverId": "ps", "userId": "p2", "roleIds": ["admin"]},
                {"serverId": "ps", "userId": "p3", "roleIds": []},
                {"serverId": "ps", "userId": "p4", "roleIds": []},
                {"serverId": "ps", "userId": "p5", "roleIds": ["ra"]},
                {"serverId": "ps", "userId": "p6", "roleIds": ["ra", "rb"]}],
    "channels": [
        {"id": "open", "serverId": "ps", "name": "open", "type": "text", "overwrites": []},
        {"id": "secret", "serverId": "ps", "name": "secret", "type": "text", "overwrites": [
            {"id": "ps", "type": "role", "allow": 0, "deny": READ},
            {"id": "p4", "type": "member", "allow": READ, "deny": 0}]},
        {"id": "roles", "serverId": "ps", "name": "roles", "type": "text", "overwrites": [
            {"id": "ra", "type": "role", "allow": 0, "deny": READ},
            {"id": "rb", "type": "role", "allow": READ, "deny": 0}]},
        {"id": "no-p3", "serverId": "ps", "name": "no-p3", "type": "text", "overwrites": [
            {"id": "p3", "type": "member", "allow": 0, "deny": READ},
            {"id": "p2", "type": "member", "allow": 0, "deny": READ}]},
    ],
}


@pytest.mark.parametrize(
    ("channel", "readers"),
    [
        ("open", {"p1", "p2", "p3", "p4", "p5", "p6"}),
        # owner and ADMINISTRATOR get everything; a member allow beats @everyone's deny
        ("secret", {"p1", "p2", "p4"}),
        # role overwrites: the union of denies, then the union of allows
        ("roles", {"p1", "p2", "p3", "p4", "p6"}),
        # a member deny, which an administrator ignores
        ("no-p3", {"p1", "p2", "p4", "p5", "p6"}),
    ],
)
async def test_channel_permissions_follow_discords_algorithm(
    start_gateway: StartGateway, tmp_path: Path, channel: str, readers: set[str]
) -> None:
    fixture = tmp_path / "directory.json"
    fixture.write_text(json.dumps(PERMISSIONS_FIXTURE))
    server = await start_gateway({"GATEWAY_FIXTURES": str(fixture)})
    clients = {f"p{i}": await server.login(f"p{i}") for i in range(1, 7)}
    for client in clients.values():
        await client.subscribe("ps")
    await server.gateway.publish_to_channel(channel, "ps", MESSAGE)
    await _receives([clients[u] for u in sorted(readers)], MESSAGE)
    await _nothing(list(clients.values()))


async def test_channel_events_for_unknown_or_foreign_channels_reach_nobody_and_harm_nothing(
    harness: GatewayServer,
) -> None:
    alice = await harness.login("u1", "alice")
    bob = await harness.login("u2", "bob")
    await alice.subscribe("s1")
    await bob.subscribe("s1")
    await bob.subscribe("s2")
    await harness.gateway.publish_to_channel("c-nope", "s1", MESSAGE)
    await harness.gateway.publish_to_channel("c4", "s1", MESSAGE)  # c4 belongs to s2
    await _nothing([alice, bob])
    after = {"op": "AFTER", "d": None}
    await harness.gateway.publish_to_server("s1", after)
    await _receives([alice, bob], after)


async def test_event_data_is_relayed_verbatim(harness: GatewayServer) -> None:
    alice = await harness.login("u1")
    await alice.subscribe("s1")
    payloads: list[Any] = [
        {"text": "h\u00e9llo \U0001f600 \u4e16\u754c", "quote": '"\\', "nested": [{"a": None}]},
        "\ud800",  # a lone surrogate (possible in JSON text) must not break the socket
        12345678901234567890,
        -0.5,
        [],
        False,
    ]
    for d in payloads:
        await harness.gateway.broker.publish(
            "ws:server:s1", json.dumps({"event": {"op": "DATA", "d": d}}).encode())
    for d in payloads:
        await alice.expect_event("DATA", d)
    await alice.heartbeat()
