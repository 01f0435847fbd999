"""PROTOCOL 15: a presence, typing or subscribe call that fails is answered with an ERROR
(UNAVAILABLE), never a close; the connection keeps serving and the op may be retried."""

from __future__ import annotations

from adapters.memory import MemoryPresenceStore
from tests.shell.fakes import World, run_virtual


def test_a_failed_presence_write_is_an_error_and_the_retry_works() -> None:
    async def scenario(world: World) -> None:
        u1 = await world.login("u1", "s1")
        store = world.gateway.presence
        assert isinstance(store, MemoryPresenceStore)
        store.failing = True
        await u1.send_op("PRESENCE_UPDATE", {"status": "dnd"})
        error = await u1.event()
        store.failing = False
        assert (error["op"], error["d"]["code"], error["d"]["op"]) == (
            "ERROR", "UNAVAILABLE", "PRESENCE_UPDATE"
        )
        await u1.send_op("PRESENCE_UPDATE", {"status": "dnd"})
        update = await u1.recv()
        assert update["op"] == "PRESENCE_UPDATE" and update["d"]["status"] == "dnd"
        assert world.gateway.snapshot().closing == frozenset()

    run_virtual(scenario)


def test_a_failed_typing_write_is_an_error_and_the_retry_works() -> None:
    async def scenario(world: World) -> None:
        u1 = await world.login("u1", "s1")
        u2 = await world.login("u2", "s1")
        # Drop the cached permissions (a CHANNEL_UPDATE), so that typing reads the
        # directory, then make the directory fail.
        await world.gateway.publish_to_server("s1", {"op": "CHANNEL_UPDATE", "d": {}})
        assert (await u1.event())["op"] == "CHANNEL_UPDATE"
        assert (await u2.event())["op"] == "CHANNEL_UPDATE"
        world.directory.failing = True
        await u1.send_op("TYPING_START", {"channelId": "c1"})
        error = await u1.event()
        world.directory.failing = False
        assert (error["op"], error["d"]["code"], error["d"]["op"]) == (
            "ERROR", "UNAVAILABLE", "TYPING_START"
        )
        await u1.send_op("TYPING_START", {"channelId": "c1"})
        assert (await u2.event())["op"] == "TYPING_START"
        assert world.gateway.snapshot().closing == frozenset()

    run_virtual(scenario)


def test_a_failed_subscribe_is_an_error_and_the_retry_works() -> None:
    async def scenario(world: World) -> None:
        u2 = await world.login("u2")
        world.directory.failing = True
        await u2.send_op("SUBSCRIBE_SERVER", {"serverId": "s2"})
        error = await u2.event()
        world.directory.failing = False
        assert (error["op"], error["d"]["code"], error["d"]["op"]) == (
            "ERROR", "UNAVAILABLE", "SUBSCRIBE_SERVER"
        )
        assert world.gateway.snapshot().servers == {}  # nothing half-routed
        await u2.send_op("SUBSCRIBE_SERVER", {"serverId": "s2"})
        assert (await u2.event())["op"] == "SUBSCRIBED"
        assert world.gateway.snapshot().closing == frozenset()

    run_virtual(scenario)
