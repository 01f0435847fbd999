"""Typing indicators and presence (PROTOCOL sections 7 and 7a)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from domain.model import Status
from tests.blackbox.conftest import Client, GatewayServer, assert_quiet, eventually


def _presence(user_id: str, server_id: str, status: str) -> dict[str, Any]:
    return {"userId": user_id, "serverId": server_id, "status": status}


async def _typing(client: Client, channel_id: str, server_id: str, user_id: str,
                  username: str) -> None:
    frame = await client.expect("TYPING_START")
    d = frame["d"]
    assert set(d) == {"channelId", "serverId", "userId", "username", "timestamp"}, d
    assert (d["channelId"], d["serverId"], d["userId"], d["username"]) == (
        channel_id, server_id, user_id, username)
    timestamp = d["timestamp"]
    assert isinstance(timestamp, int) and not isinstance(timestamp, bool), d
    assert abs(timestamp - time.time() * 1000) < 60_000, "timestamp is ms since the epoch"


# --- typing ---------------------------------------------------------------------------


async def test_typing_reaches_channel_readers_except_the_typer(harness: GatewayServer) -> None:
    alice = await harness.login("u1", "alice")
    bob1 = await harness.login("u2", "bob1")
    bob2 = await harness.login("u2", "bob2")
    carol = await harness.login("u3", "carol")
    carol_unsubscribed = await harness.login("u3", "carol-unsubscribed")
    dave = await harness.login("u4", "dave")
    for client in (alice, bob1, bob2, carol):
        await client.subscribe("s1")
    await dave.subscribe("s2")

    # c3 is readable by alice (owner) and bob (r-mods), not by carol.
    await bob1.send_op("TYPING_START", {"channelId": "c3"})
    await _typing(alice, "c3", "s1", "u2", "bob")
    await assert_quiet(bob1, bob2, carol, carol_unsubscribed, dave, alice)

    # c1 is readable by every member of s1; the typer's other tab is excluded too.
    await carol.send_op("TYPING_START", {"channelId": "c1"})
    await _typing(alice, "c1", "s1", "u3", "carol")
    await _typing(bob1, "c1", "s1", "u3", "carol")
    await _typing(bob2, "c1", "s1", "u3", "carol")
    await assert_quiet(carol, carol_unsubscribed, dave, alice, bob1, bob2)

    await dave.send_op("TYPING_START", {"channelId": "c4"})
    await assert_quiet(alice, bob1, bob2, carol, dave)  # nobody else subscribed to s2


async def test_repeated_typing_within_the_ttl_is_silent(harness: GatewayServer) -> None:
    alice = await harness.login("u1", "alice")
    bob = await harness.login("u2", "bob")
    carol = await harness.login("u3", "carol")
    await alice.subscribe("s1")

    await bob.send_op("TYPING_START", {"channelId": "c1"})
    await _typing(alice, "c1", "s1", "u2", "bob")
    for _ in range(3):
        await bob.send_op("TYPING_START", {"channelId": "c1"})
    await bob.heartbeat()  # no ERROR came before the ACK: accepted silently
    await assert_quiet(alice, bob)

    # The dedup key is per channel and per user.
    await bob.send_op("TYPING_START", {"channelId": "c2"})
    await _typing(alice, "c2", "s1", "u2", "bob")
    await carol.send_op("TYPING_START", {"channelId": "c1"})
    await _typing(alice, "c1", "s1", "u3", "carol")
    await assert_quiet(alice, bob, carol)


@pytest.mark.parametrize("gateway_env", [{"GATEWAY_TYPING_TTL_MS": "300"}])
async def test_typing_again_after_the_ttl_is_dispatched_again(harness: GatewayServer) -> None:
    alice = await harness.login("u1", "alice")
    bob = await harness.login("u2", "bob")
    await alice.subscribe("s1")
    for _ in range(2):
        await bob.send_op("TYPING_START", {"channelId": "c1"})
        await _typing(alice, "c1", "s1", "u2", "bob")
        await asyncio.sleep(0.45)  # the key was set before alice saw the event
    await bob.heartbeat()
    await assert_quiet(alice)


# --- presence -------------------------------------------------------------------------


async def test_first_ready_broadcasts_online_once_per_shared_server(
    harness: GatewayServer,
) -> None:
    alice = await harness.login("u1", "alice")  # s1
    carol = await harness.login("u3", "carol")  # s1, s2
    dave = await harness.login("u4", "dave")  # s2
    await alice.subscribe("s1")
    await carol.subscribe("s1")
    await carol.subscribe("s2")
    await dave.subscribe("s2")

    bob1 = await harness.login("u2", "bob1")  # s1, s2
    assert bob1.ready["d"]["user"]["status"] == "online"
    await alice.expect_event("PRESENCE_UPDATE", _presence("u2", "s1", "online"))
    await dave.expect_event("PRESENCE_UPDATE", _presence("u2", "s2", "online"))
    got = [(await carol.expect("PRESENCE_UPDATE"))["d"] for _ in range(2)]
    assert sorted(got, key=lambda d: d["serverId"]) == [
        _presence("u2", "s1", "online"), _presence("u2", "s2", "online")]
    await assert_quiet(alice, carol, dave, bob1)

    # A second tab changes nothing visible: no broadcast.
    bob2 = await harness.login("u2", "bob2")
    assert bob2.ready["d"]["user"]["status"] == "online"
    await assert_quiet(alice, carol, dave, bob1, bob2)


async def test_status_changes_are_broadcast_once_and_new_tabs_inherit_them(
    harness: GatewayServer,
) -> None:
    alice = await harness.login("u1", "alice")
    dave = await harness.login("u4", "dave")
    bob1 = await harness.login("u2", "bob1")
    bob_plain = await harness.login("u2", "bob-not-subscribed")
    await alice.subscribe("s1")
    await dave.subscribe("s2")
    await bob1.subscribe("s1")

    async def broadcast(status: str) -> None:
        await alice.expect_event("PRESENCE_UPDATE", _presence("u2", "s1", status))
        await dave.expect_event("PRESENCE_UPDATE", _presence("u2", "s2", status))
        # bob's own subscribed connection hears about bob like anyone else.
        await bob1.expect_event("PRESENCE_UPDATE", _presence("u2", "s1", status))

    await bob_plain.send_op("PRESENCE_UPDATE", {"status": "dnd"})
    await broadcast("dnd")
    await assert_quiet(alice, dave, bob1, bob_plain)
    assert harness.directory.statuses["u2"] is Status.DND  # kept in the users table
    assert await harness.presence.get_status("u2") is Status.DND

    # A new tab of a dnd user starts dnd and broadcasts nothing.
    bob3 = await harness.login("u2", "bob3")
    assert bob3.ready["d"]["user"]["status"] == "dnd"
    # Repeating the same status broadcasts nothing.
    await bob3.send_op("PRESENCE_UPDATE", {"status": "dnd"})
    await bob3.heartbeat()
    await assert_quiet(alice, dave, bob1, bob_plain, bob3)

    await bob1.send_op("PRESENCE_UPDATE", {"status": "idle"})
    await broadcast("idle")

    # invisible is shown to others as offline ...
    await bob3.send_op("PRESENCE_UPDATE", {"status": "invisible"})
    await broadcast("offline")
    # ... and a new tab of an invisible user keeps it (its own READY says invisible).
    bob4 = await harness.login("u2", "bob4")
    assert bob4.ready["d"]["user"]["status"] == "invisible"
    await assert_quiet(alice, dave, bob1)

    # Back from invisible: visible again.
    await bob4.send_op("PRESENCE_UPDATE", {"status": "online"})
    await broadcast("online")
    await assert_quiet(alice, dave, bob1, bob_plain, bob3, bob4)


async def test_invisible_to_offline_is_not_a_visible_change(harness: GatewayServer) -> None:
    alice = await harness.login("u1", "alice")
    await alice.subscribe("s1")
    bob = await harness.login("u2", "bob")
    await alice.expect_event("PRESENCE_UPDATE", _presence("u2", "s1", "online"))
    await bob.send_op("PRESENCE_UPDATE", {"status": "invisible"})
    await alice.expect_event("PRESENCE_UPDATE", _presence("u2", "s1", "offline"))
    await bob.close()
    await eventually(lambda: "u2" not in harness.gateway.snapshot().users, what="bob's close")
    await assert_quiet(alice)
    assert await harness.presence.get_status("u2") is Status.OFFLINE


async def test_offline_is_broadcast_when_the_last_connection_closes(
    harness: GatewayServer,
) -> None:
    alice = await harness.login("u1", "alice")
    dave = await harness.login("u4", "dave")
    bob1 = await harness.login("u2", "bob1")
    bob2 = await harness.login("u2", "bob2")
    await alice.subscribe("s1")
    await dave.subscribe("s2")

    await bob1.close()
    await eventually(lambda: len(harness.gateway.snapshot().users.get("u2", ())) == 1,
                     what="bob1's close")
    await assert_quiet(alice, dave)
    assert await harness.presence.get_status("u2") is Status.ONLINE

    await bob2.close()
    await alice.expect_event("PRESENCE_UPDATE", _presence("u2", "s1", "offline"))
    await dave.expect_event("PRESENCE_UPDATE", _presence("u2", "s2", "offline"))
    await assert_quiet(alice, dave)
    assert await harness.presence.get_status("u2") is Status.OFFLINE
    assert harness.directory.statuses["u2"] is Status.OFFLINE


async def test_a_user_who_comes_back_starts_online(harness: GatewayServer) -> None:
    alice = await harness.login("u1", "alice")
    await alice.subscribe("s1")
    bob = await harness.login("u2", "bob")
    await alice.expect_event("PRESENCE_UPDATE", _presence("u2", "s1", "online"))
    await bob.send_op("PRESENCE_UPDATE", {"status": "dnd"})
    await alice.expect_event("PRESENCE_UPDATE", _presence("u2", "s1", "dnd"))
    await bob.close()
    await alice.expect_event("PRESENCE_UPDATE", _presence("u2", "s1", "offline"))

    again = await harness.login("u2", "bob-again")
    assert again.ready["d"]["user"]["status"] == "online"
    await alice.expect_event("PRESENCE_UPDATE", _presence("u2", "s1", "online"))
    await assert_quiet(alice, again)
