"""PROTOCOL section 14 in process (memory backends, virtual time): who receives a
PRESENCE_UPDATE of a large server, PRESENCE_SNAPSHOT, the errors, and that presence
interest never outlives what it belongs to (empty list, UNSUBSCRIBE_SERVER, close)."""

from __future__ import annotations

import weakref
from dataclasses import replace
from typing import Any

from adapters.shell import GatewaySettings
from domain.session import SessionConfig
from tests.shell.fakes import FakeTransport, World, run_virtual

# demo data: s1 = {u1, u2, u3}, s2 = {u2, u3, u4}; with a threshold of 2 both are large.
LARGE = GatewaySettings(session=replace(SessionConfig(), large_server_members=2))
SMALL = GatewaySettings(session=replace(SessionConfig(), large_server_members=3))


#: Frames a client received while :func:`act` waited for its HEARTBEAT_ACK.
_early: weakref.WeakKeyDictionary[FakeTransport, list[Any]] = weakref.WeakKeyDictionary()


async def act(client: FakeTransport, op: str, d: Any) -> None:
    """Send ``op`` and wait until the gateway has handled it (the HEARTBEAT after it
    is answered): what it published is then ahead of any later publish."""
    await client.send_op(op, d)
    await client.send_op("HEARTBEAT")
    while (frame := await client.recv())["op"] != "HEARTBEAT_ACK":
        _early.setdefault(client, []).append((frame["op"], frame["d"]))


async def until_mark(world: World, server_id: str, *clients: FakeTransport) -> list[list[Any]]:
    """Publish a marker to the server; return what each client got before it."""
    await world.gateway.publish_to_server(server_id, {"op": "MARK", "d": None})
    seen: list[list[Any]] = []
    for client in clients:
        frames = _early.pop(client, [])
        while (frame := await client.recv())["op"] != "MARK":
            frames.append((frame["op"], frame["d"]))
        seen.append(frames)
    return seen


def presence(user: str, server: str, status: str) -> tuple[str, dict[str, str]]:
    return ("PRESENCE_UPDATE", {"userId": user, "serverId": server, "status": status})


async def ask(client: FakeTransport, server_id: str, user_ids: list[Any]) -> dict[str, Any]:
    await client.send_op("SUBSCRIBE_PRESENCE", {"serverId": server_id, "userIds": user_ids})
    # The answer, past any MARK an earlier until_mark left for this client (the answer
    # must not be taken for read before the gateway had even handled the op).
    while (frame := await client.event())["op"] == "MARK":
        pass
    return frame


def test_large_server_presence_reaches_the_interested_and_the_users_own() -> None:
    async def scenario(world: World) -> None:
        u1 = await world.login("u1", "s1")
        u3 = await world.login("u3", "s1")
        u2 = await world.login("u2", "s1")
        await until_mark(world, "s1", u1, u3, u2)
        snap = await ask(u3, "s1", ["u2"])
        assert snap["op"] == "PRESENCE_SNAPSHOT"
        await act(u2, "PRESENCE_UPDATE", {"status": "dnd"})
        seen = await until_mark(world, "s1", u1, u3, u2)
        dnd = presence("u2", "s1", "dnd")
        assert seen == [[], [dnd], [dnd]]  # u1 did not ask; u2's own connection did get it

    run_virtual(scenario, LARGE)


def test_snapshot_in_the_order_asked_offline_and_non_members_omitted() -> None:
    async def scenario(world: World) -> None:
        u1 = await world.login("u1", "s1")
        u3 = await world.login("u3", "s1")
        await act(u3, "PRESENCE_UPDATE", {"status": "invisible"})
        snap = await ask(u1, "s1", ["u3", "u4", "nobody", "u2", "u1", "u3"])
        assert snap["op"] == "PRESENCE_SNAPSHOT" and "s" in snap
        assert snap["d"] == {
            "serverId": "s1",
            "presences": [
                {"userId": "u3", "status": "offline"},  # invisible is shown as offline
                {"userId": "u2", "status": "offline"},  # a member, not connected
                {"userId": "u1", "status": "online"},
            ],
        }
        assert world.gateway.interest.size() == (1, 3)  # u4 and nobody are no interest

    run_virtual(scenario, LARGE)


def test_a_new_list_replaces_an_empty_list_and_unsubscribe_end_and_close_cleans() -> None:
    async def scenario(world: World) -> None:
        interest = world.gateway.interest
        u1 = await world.login("u1", "s1")
        u2 = await world.login("u2", "s1")
        u3 = await world.login("u3", "s1")
        await ask(u1, "s1", ["u2"])
        await ask(u1, "s1", ["u3"])  # replaces: u2 no longer
        await act(u2, "PRESENCE_UPDATE", {"status": "idle"})
        await act(u3, "PRESENCE_UPDATE", {"status": "dnd"})
        seen = await until_mark(world, "s1", u1)
        assert seen == [[presence("u3", "s1", "dnd")]]
        assert (await ask(u1, "s1", []))["d"] == {"serverId": "s1", "presences": []}
        assert interest.size() == (0, 0)
        await act(u3, "PRESENCE_UPDATE", {"status": "online"})
        assert await until_mark(world, "s1", u1) == [[]]
        await ask(u1, "s1", ["u2", "u3"])
        await ask(u2, "s1", ["u3"])
        assert interest.size() == (2, 2)
        await u1.send_op("UNSUBSCRIBE_SERVER", {"serverId": "s1"})
        assert (await u1.event())["op"] == "UNSUBSCRIBED"
        assert interest.size() == (1, 1)
        await ask(u3, "s1", ["u2"])
        assert interest.size() == (2, 2)
        u3.drop(1000)  # the client leaves: its session ends, its interest with it
        await world.until(lambda: interest.size() == (1, 1), "interest released on close")
        u2.drop()  # TCP loss: the session parks (13) and keeps its interest with it
        await world.until(lambda: bool(world.gateway.snapshot().parked), "u2 parked")
        assert interest.size() == (1, 1)
        await world.gateway.resumer.end_all()  # the parked session ends: nothing left
        assert interest.size() == (0, 0)

    run_virtual(scenario, LARGE)


def test_errors_not_subscribed_not_found_and_the_connection_stays() -> None:
    async def scenario(world: World) -> None:
        u1 = await world.login("u1")
        err = await ask(u1, "s1", ["u2"])
        assert (err["op"], err["d"]["code"], err["d"]["op"]) == (
            "ERROR", "NOT_SUBSCRIBED", "SUBSCRIBE_PRESENCE"
        )
        assert (await ask(u1, "nowhere", ["u2"]))["d"]["code"] == "NOT_FOUND"
        assert (await ask(u1, "s1", ["u2"] * 101))["d"]["code"] == "INVALID_PAYLOAD"
        assert (await ask(u1, "s1", ["u2", 7]))["d"]["code"] == "INVALID_PAYLOAD"
        await u1.send_op("HEARTBEAT")
        assert (await u1.event())["op"] == "HEARTBEAT_ACK"
        assert world.gateway.interest.size() == (0, 0)

    run_virtual(scenario, LARGE)


def test_a_server_that_is_not_large_is_answered_and_nothing_else_changes() -> None:
    async def scenario(world: World) -> None:
        u1 = await world.login("u1", "s1")
        u3 = await world.login("u3", "s1")
        u2 = await world.login("u2", "s1")
        await until_mark(world, "s1", u1, u3, u2)
        snap = await ask(u1, "s1", ["u3"])
        assert snap["d"]["presences"] == [{"userId": "u3", "status": "online"}]
        await act(u2, "PRESENCE_UPDATE", {"status": "dnd"})
        dnd = presence("u2", "s1", "dnd")
        assert await until_mark(world, "s1", u1, u3, u2) == [[dnd], [dnd], [dnd]]

    run_virtual(scenario, SMALL)


def test_a_flood_of_full_lists_holds_one_list_per_server() -> None:
    async def scenario(world: World) -> None:
        u1 = await world.login("u1", "s1")
        for i in range(20):
            ids = [f"x{i}-{j}" for j in range(99)] + ["u2"]
            snap = await ask(u1, "s1", ids)
            assert snap["d"]["presences"] == [{"userId": "u2", "status": "offline"}]
        assert world.gateway.interest.size() == (1, 1)  # non-members are never held

    run_virtual(scenario, LARGE)


def test_a_backend_failure_is_an_error_never_a_close() -> None:
    async def scenario(world: World) -> None:
        u1 = await world.login("u1", "s1")
        world.directory.failing = True
        try:
            err = await ask(u1, "s1", ["u2", "u3"])
        finally:
            world.directory.failing = False
        assert (err["op"], err["d"]["code"]) == ("ERROR", "UNAVAILABLE")
        snap = await ask(u1, "s1", ["u2"])  # the client may simply ask again
        assert snap["op"] == "PRESENCE_SNAPSHOT"

    run_virtual(scenario, LARGE)
