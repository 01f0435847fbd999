"""RESUME across instances (PROTOCOL 13, adapters/shell/handoff.py): two gateways on
one in-memory broker network, presence store and directory, on virtual time."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc

from adapters.memory import (
    MemoryBrokerNetwork,
    MemoryDirectory,
    MemoryPresenceStore,
    MemoryTypingGate,
)
from adapters.shell import Backends, Gateway, GatewaySettings, make_gateway
from domain.ports import BackendUnavailable
from domain.session import SessionConfig
from entrypoints.config import demo_data
from simulation.clock import VirtualClock
from simulation.world import new_virtual_loop
from tests.shell.fakes import FakeTokens, FakeTransport


class Pair:
    def __init__(self, group: anyio.abc.TaskGroup, a: Gateway, b: Gateway) -> None:
        self.group, self.a, self.b = group, a, b

    async def connect(self, gateway: Gateway) -> FakeTransport:
        transport = FakeTransport()
        self.group.start_soon(gateway.serve, transport)
        await transport.expect("HELLO")
        return transport

    async def login(self, gateway: Gateway, user: str, server: str = "s1") -> FakeTransport:
        client = await self.connect(gateway)
        await client.send_op("IDENTIFY", {"token": f"token:{user}"})
        await client.expect("READY")
        await client.send_op("SUBSCRIBE_SERVER", {"serverId": server})
        while (await client.recv())["op"] != "SUBSCRIBED":
            pass
        return client

    async def until(self, condition: Callable[[], bool]) -> None:
        with anyio.fail_after(30):
            while not condition():  # noqa: ASYNC110
                await anyio.sleep(0.01)


def run_pair(
    test: Callable[[Pair], Awaitable[None]], settings: GatewaySettings | None = None
) -> None:
    loop = new_virtual_loop()
    clock = VirtualClock()
    clock.bind(loop)

    async def main() -> None:
        network, directory = MemoryBrokerNetwork(), MemoryDirectory(demo_data())
        presence = MemoryPresenceStore(clock)

        def gateway(name: str) -> Gateway:
            backends = Backends(network.client(), MemoryTypingGate(clock), presence, directory,
                                FakeTokens(), clock)
            return make_gateway(backends, settings, instance_id=name)

        a, b = gateway("A"), gateway("B")
        async with anyio.create_task_group() as group:
            await group.start(a.run)
            await group.start(b.run)
            await anyio.sleep(0.1)  # the handoff channels are subscribed
            await test(Pair(group, a, b))
            group.cancel_scope.cancel()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


async def resume(pair: Pair, gateway: Gateway, sid: str, seq: int) -> FakeTransport:
    client = await pair.connect(gateway)
    await client.send_op("RESUME", {"token": "token:u1", "sessionId": sid, "seq": seq})
    return client


async def publisher(gateway: Gateway, n: int, every: float) -> None:
    for i in range(n):
        await gateway.publish_to_server("s1", {"op": "MSG", "d": {"i": i}})
        await anyio.sleep(every)


def sid_of(gateway: Gateway, user: str) -> str:
    return next(iter(gateway.snapshot().users[user]))


async def read_until_resumed(client: FakeTransport) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    frames = []
    while (frame := await client.recv())["op"] != "RESUMED":
        frames.append(frame)
    return frames, frame


def test_a_session_parked_on_one_instance_resumes_on_the_other_exactly() -> None:
    async def test(pair: Pair) -> None:
        bob = await pair.login(pair.a, "u2")
        alice = await pair.login(pair.a, "u1")
        await bob.expect("PRESENCE_UPDATE")
        sid = sid_of(pair.a, "u1")
        async with anyio.create_task_group() as group:
            # Events keep coming, from both instances, during the drop and the handoff.
            group.start_soon(publisher, pair.a, 40, 0.05)
            group.start_soon(publisher, pair.b, 40, 0.05)
            seen: list[dict[str, Any]] = []
            while len(seen) < 10:
                seen.append(await alice.recv())
            alice.drop()
            await pair.until(lambda: sid in pair.a.snapshot().parked)
            again = await resume(pair, pair.b, sid, seen[-1]["s"])
            replay, resumed = await read_until_resumed(again)
            assert resumed["d"] == {"sessionId": sid, "replayed": len(replay)}
        live = again.pending()
        got = seen + replay + [resumed] + live
        # s is gapless across the move, and every event arrived exactly once.
        assert [f["s"] for f in got] == list(range(got[0]["s"], got[0]["s"] + len(got)))
        events = sorted(f["d"]["i"] for f in got if f["op"] == "MSG")
        assert events == sorted(list(range(40)) * 2)
        # A let it go entirely; B holds it; nobody saw presence move.
        assert sid not in pair.a.snapshot().parked and "u1" not in pair.a.snapshot().users
        assert pair.b.snapshot().users["u1"] == frozenset({sid})
        assert all(f["op"] != "PRESENCE_UPDATE" for f in bob.pending())
        assert await pair.a.presence.get_status("u1") is not None

    run_pair(test)


def test_a_zombie_on_the_other_instance_is_closed_4014() -> None:
    async def test(pair: Pair) -> None:
        alice = await pair.login(pair.a, "u1")
        sid = sid_of(pair.a, "u1")
        await pair.a.publish_to_server("s1", {"op": "MSG", "d": {"i": 0}})
        first = await alice.recv()
        again = await resume(pair, pair.b, sid, first["s"] - 1)
        replay, resumed = await read_until_resumed(again)
        assert [f["s"] for f in replay] == [first["s"]] and resumed["s"] == first["s"] + 1
        await alice.closed.wait()
        assert alice.close_code == 4014
        await pair.a.publish_to_server("s1", {"op": "MSG", "d": {"i": 1}})
        assert (await again.recv())["s"] == first["s"] + 2

    run_pair(test)


def test_an_unknown_session_or_a_dead_owner_is_invalid_session() -> None:
    async def test(pair: Pair) -> None:
        unknown = await resume(pair, pair.b, "no-such-session", 0)
        assert (await unknown.recv())["op"] == "INVALID_SESSION"
        alice = await pair.login(pair.a, "u1")
        sid = sid_of(pair.a, "u1")
        alice.drop()
        await pair.until(lambda: sid in pair.a.snapshot().parked)
        pair.a.broker.close()  # type: ignore[attr-defined]  # the owner is gone
        orphan = await resume(pair, pair.b, sid, 1)
        assert (await orphan.recv())["op"] == "INVALID_SESSION"
        assert "u1" not in pair.b.snapshot().users  # nothing half taken over

    run_pair(test)


def test_a_drain_hands_every_session_to_the_other_instance_then_ends() -> None:
    async def test(pair: Pair) -> None:
        bob = await pair.login(pair.b, "u2")
        alice = await pair.login(pair.a, "u1")
        await bob.expect("PRESENCE_UPDATE")
        sid = sid_of(pair.a, "u1")
        await pair.a.publish_to_server("s1", {"op": "MSG", "d": {"i": 0}})
        last = (await alice.recv())["s"]
        await bob.expect("MSG")
        async with anyio.create_task_group() as group:
            group.start_soon(pair.a.drain)
            assert (await alice.recv())["op"] == "RECONNECT"
            await alice.closed.wait()
            assert alice.close_code == 1001
            await pair.b.publish_to_server("s1", {"op": "MSG", "d": {"i": 1}})
            started = pair.a.clock.monotonic()
            again = await resume(pair, pair.b, sid, last)
            replay, resumed = await read_until_resumed(again)
            assert [f["d"] for f in replay] == [{"i": 1}] and resumed["s"] == last + 2
        # The drain ended once nothing was parked, well before its timeout.
        assert pair.a.clock.monotonic() - started < 5.0
        assert all(f["op"] != "PRESENCE_UPDATE" for f in bob.pending())

    run_pair(test)


def test_another_users_token_elsewhere_is_refused_and_the_session_stays() -> None:
    async def test(pair: Pair) -> None:
        alice = await pair.login(pair.a, "u1")
        sid = sid_of(pair.a, "u1")
        alice.drop()
        await pair.until(lambda: sid in pair.a.snapshot().parked)
        thief = await pair.connect(pair.b)
        await thief.send_op("RESUME", {"token": "token:u2", "sessionId": sid, "seq": 1})
        assert (await thief.recv())["op"] == "INVALID_SESSION"
        assert sid in pair.a.snapshot().parked  # untouched
        again = await resume(pair, pair.b, sid, 2)
        assert (await again.recv())["op"] == "RESUMED"

    run_pair(test)


def test_two_resumes_of_one_session_on_two_instances_exactly_one_wins() -> None:
    async def test(pair: Pair) -> None:
        alice = await pair.login(pair.a, "u1")
        sid = sid_of(pair.a, "u1")
        alice.drop()
        await pair.until(lambda: sid in pair.a.snapshot().parked)
        here = await pair.connect(pair.a)
        there = await pair.connect(pair.b)
        d = {"token": "token:u1", "sessionId": sid, "seq": 2}
        await there.send_op("RESUME", d)
        await here.send_op("RESUME", d)
        ops = sorted([(await here.recv())["op"], (await there.recv())["op"]])
        assert ops == ["INVALID_SESSION", "RESUMED"], ops
        held = [g for g in (pair.a, pair.b) if "u1" in g.snapshot().users]
        assert len(held) == 1

    run_pair(test)


def test_a_resume_flood_is_answered_and_rate_limited() -> None:
    settings = GatewaySettings(session=SessionConfig(rate_limit_count=20))

    async def test(pair: Pair) -> None:
        flood = await pair.connect(pair.b)
        for i in range(19):
            await flood.send_op("RESUME", {"token": "token:u1", "sessionId": f"x{i}", "seq": 0})
            assert (await flood.recv())["op"] == "INVALID_SESSION"
        await flood.send_op("RESUME", {"token": "token:u1", "sessionId": "x", "seq": 0})
        await flood.recv()
        await flood.send_op("HEARTBEAT")
        await flood.closed.wait()
        assert flood.close_code == 4008
        assert pair.b.snapshot().parked == frozenset()  # a refused RESUME keeps nothing
        ok = await pair.login(pair.b, "u2")  # and the instance serves on
        await ok.send_op("HEARTBEAT")
        assert (await ok.recv())["op"] == "HEARTBEAT_ACK"

    run_pair(test, settings)


def test_the_rate_window_carries_over_a_resume_on_the_other_instance() -> None:
    """PROTOCOL 13: reconnecting does not reset the window, elsewhere neither."""
    settings = GatewaySettings(session=SessionConfig(rate_limit_count=6, rate_limit_window=60.0))

    async def test(pair: Pair) -> None:
        alice = await pair.login(pair.a, "u1")  # IDENTIFY, SUBSCRIBE_SERVER: 2
        for _ in range(2):  # 4
            await alice.send_op("HEARTBEAT")
            while (await alice.recv())["op"] != "HEARTBEAT_ACK":
                pass
        sid = sid_of(pair.a, "u1")
        alice.drop()
        await pair.until(lambda: sid in pair.a.snapshot().parked)
        again = await resume(pair, pair.b, sid, 0)  # RESUME: 5
        await read_until_resumed(again)
        await again.send_op("HEARTBEAT")  # 6
        while (await again.recv())["op"] != "HEARTBEAT_ACK":
            pass
        await again.send_op("HEARTBEAT")  # 7: over the window carried from A
        await again.closed.wait()
        assert again.close_code == 4008

    run_pair(test, settings)


def test_a_handoff_that_fails_midway_releases_only_what_it_took() -> None:
    """B's presence write fails during the handoff: B gives its copy up (INVALID_SESSION)
    and releases the channels that copy subscribed, and no more: bob, on B, keeps s1."""

    async def test(pair: Pair) -> None:
        bob = await pair.login(pair.b, "u2")
        alice = await pair.login(pair.a, "u1")
        sid = sid_of(pair.a, "u1")
        alice.drop()
        await pair.until(lambda: sid in pair.a.snapshot().parked)
        store = pair.b.presence

        async def down(*args: object) -> None:
            raise BackendUnavailable("presence: down")

        store.session_opened = down  # type: ignore[method-assign,assignment]
        try:
            again = await resume(pair, pair.b, sid, 1)
            assert (await again.recv())["op"] == "INVALID_SESSION"
        finally:
            del store.session_opened
        await pair.a.publish_to_server("s1", {"op": "MSG", "d": {"i": 7}})
        with anyio.fail_after(5):
            while (frame := await bob.recv())["op"] != "MSG":
                pass
        assert frame["d"] == {"i": 7}

    run_pair(test)


def test_a_slow_owner_is_waited_for_and_an_unknown_session_refused_on_the_answers() -> None:
    """Every live instance answers an ask (PROTOCOL 13 across instances): an owner whose
    answer takes 2 s under a storm is waited for (it used to be taken for absent after
    1 s: INVALID_SESSION, the events of the gap lost); a session nobody holds is
    refused as soon as every live instance said so, before any timer."""

    async def test(pair: Pair) -> None:
        assert pair.b.handoff.peers.alive(anyio.current_time()) == {"A"}
        started = anyio.current_time()
        unknown = await resume(pair, pair.b, "no-such-session", 0)
        assert (await unknown.recv())["op"] == "INVALID_SESSION"
        assert anyio.current_time() - started < 0.5

        alice = await pair.login(pair.a, "u1")
        sid = sid_of(pair.a, "u1")
        alice.drop()
        await pair.until(lambda: sid in pair.a.snapshot().parked)
        asked = pair.a.handoff._asked

        async def later(doc: dict[str, Any]) -> None:
            await anyio.sleep(2.0)
            asked(doc)

        def slowly(doc: dict[str, Any]) -> None:
            pair.group.start_soon(later, doc)

        pair.a.handoff._asked = slowly  # type: ignore[method-assign]
        again = await resume(pair, pair.b, sid, 1)
        _, resumed = await read_until_resumed(again)
        assert resumed["d"]["sessionId"] == sid

    run_pair(test)
