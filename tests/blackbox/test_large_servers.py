"""Large servers and presence interest over a real WebSocket (PROTOCOL section 14).

Demo data: s1 = {u1 alice, u2 bob, u3 carol}, s2 = {u2, u3, u4 dave}. With
GATEWAY_LARGE_SERVER_MEMBERS=2 both servers are large; with 3 neither is."""

from __future__ import annotations

from typing import Any

import pytest

from tests.blackbox.conftest import Client, GatewayServer, assert_quiet

LARGE = {"GATEWAY_LARGE_SERVER_MEMBERS": "2"}
SMALL = {"GATEWAY_LARGE_SERVER_MEMBERS": "3"}


def _presence(user_id: str, server_id: str, status: str) -> dict[str, Any]:
    return {"userId": user_id, "serverId": server_id, "status": status}


async def _ask(client: Client, server_id: str, user_ids: list[Any]) -> None:
    await client.send_op("SUBSCRIBE_PRESENCE", {"serverId": server_id, "userIds": user_ids})


async def _snapshot(client: Client, server_id: str, user_ids: list[Any]) -> list[Any]:
    await _ask(client, server_id, user_ids)
    frame = await client.expect("PRESENCE_SNAPSHOT")
    assert frame["d"]["serverId"] == server_id and isinstance(frame["s"], int)
    presences: list[Any] = frame["d"]["presences"]
    return presences


@pytest.mark.parametrize("gateway_env", [LARGE])
async def test_ready_says_member_count_and_large(harness: GatewayServer) -> None:
    carol = await harness.login("u3")
    servers = {s["id"]: (s["memberCount"], s["large"]) for s in carol.ready["d"]["servers"]}
    assert servers == {"s1": (3, True), "s2": (3, True)}


@pytest.mark.parametrize("gateway_env", [LARGE])
async def test_large_server_presence_only_to_the_interested_and_the_users_own(
    harness: GatewayServer,
) -> None:
    alice = await harness.login("u1", "alice")
    carol = await harness.login("u3", "carol")
    await alice.subscribe("s1")
    await carol.subscribe("s1")
    assert await _snapshot(carol, "s1", ["u2"]) == [{"userId": "u2", "status": "offline"}]
    bob = await harness.login("u2", "bob")  # comes online: carol asked, alice did not
    await bob.subscribe("s1")
    await carol.expect_event("PRESENCE_UPDATE", _presence("u2", "s1", "online"))
    await bob.send_op("PRESENCE_UPDATE", {"status": "dnd"})
    await carol.expect_event("PRESENCE_UPDATE", _presence("u2", "s1", "dnd"))
    await bob.expect_event("PRESENCE_UPDATE", _presence("u2", "s1", "dnd"))  # his own
    await assert_quiet(alice, carol, bob)
    # Typing and other events are unchanged: everyone subscribed gets them.
    await harness.gateway.publish_to_server("s1", {"op": "ANY", "d": {}})
    for client in (alice, carol, bob):
        await client.expect_event("ANY", {})
    # A new list replaces the old one; an empty list ends the interest.
    assert await _snapshot(carol, "s1", ["u1"]) == [{"userId": "u1", "status": "online"}]
    await bob.send_op("PRESENCE_UPDATE", {"status": "idle"})
    await bob.expect_event("PRESENCE_UPDATE", _presence("u2", "s1", "idle"))
    await assert_quiet(alice, carol)
    assert await _snapshot(alice, "s1", ["u2"]) == [{"userId": "u2", "status": "idle"}]
    assert await _snapshot(alice, "s1", []) == []
    await bob.send_op("PRESENCE_UPDATE", {"status": "online"})
    await bob.expect_event("PRESENCE_UPDATE", _presence("u2", "s1", "online"))
    await assert_quiet(alice, carol)


@pytest.mark.parametrize("gateway_env", [LARGE])
async def test_snapshot_order_offline_non_members_and_errors(harness: GatewayServer) -> None:
    alice = await harness.login("u1", "alice")
    carol = await harness.login("u3", "carol")
    await carol.send_op("PRESENCE_UPDATE", {"status": "invisible"})
    await _ask(alice, "s1", ["u2"])
    await alice.expect_error("NOT_SUBSCRIBED", "SUBSCRIBE_PRESENCE")
    await _ask(alice, "s-nope", ["u2"])
    await alice.expect_error("NOT_FOUND", "SUBSCRIBE_PRESENCE")
    await _ask(alice, "s1", [f"u{i}" for i in range(101)])
    await alice.expect_error("INVALID_PAYLOAD", "SUBSCRIBE_PRESENCE")
    await _ask(alice, "s1", ["u2", 3])
    await alice.expect_error("INVALID_PAYLOAD", "SUBSCRIBE_PRESENCE")
    await alice.subscribe("s1")
    got = await _snapshot(alice, "s1", ["u4", "u3", "nobody", "u2", "u1"])
    assert got == [
        {"userId": "u3", "status": "offline"},  # invisible, shown as offline
        {"userId": "u2", "status": "offline"},  # a member, not connected
        {"userId": "u1", "status": "online"},
    ]  # u4 and nobody are no members of s1: omitted
    await alice.heartbeat()  # the connection stays


@pytest.mark.parametrize("gateway_env", [LARGE])
async def test_unsubscribe_and_close_end_the_interest(harness: GatewayServer) -> None:
    alice = await harness.login("u1", "alice")
    await alice.subscribe("s1")
    await _snapshot(alice, "s1", ["u2", "u3"])
    assert harness.gateway.interest.size() == (1, 2)
    await alice.unsubscribe("s1")
    assert harness.gateway.interest.size() == (0, 0)
    await alice.subscribe("s1")  # back in the server: no interest until asked again
    bob = await harness.login("u2", "bob")
    await bob.send_op("PRESENCE_UPDATE", {"status": "dnd"})
    await assert_quiet(alice)
    await _snapshot(alice, "s1", ["u2"])
    await alice.close()
    await bob.close()
    await harness.assert_clean()
    assert harness.gateway.interest.size() == (0, 0)


@pytest.mark.parametrize("gateway_env", [SMALL])
async def test_a_server_that_is_not_large_answers_and_changes_nothing(
    harness: GatewayServer,
) -> None:
    alice = await harness.login("u1", "alice")
    carol = await harness.login("u3", "carol")
    assert {s["large"] for s in alice.ready["d"]["servers"]} == {False}
    await alice.subscribe("s1")
    await carol.subscribe("s1")
    assert await _snapshot(alice, "s1", ["u3"]) == [{"userId": "u3", "status": "online"}]
    bob = await harness.login("u2", "bob")
    for client in (alice, carol):  # nobody asked for bob: delivered to all, as in 7
        await client.expect_event("PRESENCE_UPDATE", _presence("u2", "s1", "online"))
    await assert_quiet(alice, carol, bob)
