"""RESUME (PROTOCOL section 13) in process, on fakes and virtual time: every rule, with
the gateway's snapshot and metrics read where the wire cannot tell."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from adapters.shell import GatewaySettings
from domain.session import SessionConfig
from tests.shell.fakes import FakeTransport, World, run_virtual

FAST = GatewaySettings(session=SessionConfig(resume_ttl=30.0, resume_buffer_frames=3))


async def publish(world: World, n: int, op: str = "MSG", start: int = 0) -> None:
    for i in range(start, start + n):
        await world.gateway.publish_to_server("s1", {"op": op, "d": {"i": i}})


async def frames(client: FakeTransport, n: int) -> list[dict[str, Any]]:
    return [await client.recv() for _ in range(n)]


async def resume(
    world: World, user: str, session_id: str, seq: int
) -> tuple[FakeTransport, dict[str, Any]]:
    client = await world.connect()
    await client.send_op("RESUME", {"token": f"token:{user}", "sessionId": session_id, "seq": seq})
    return client, await client.recv()


async def parked_alice(world: World, code: int | None = None) -> tuple[str, int, FakeTransport]:
    """u1 (alice) subscribed to s1 and parked after 2 events; u2 (bob) watches s1."""
    bob = await world.login("u2", "s1")
    alice = await world.login("u1", "s1")
    await bob.expect("PRESENCE_UPDATE")  # alice online
    await publish(world, 2)
    got = await frames(alice, 2)
    await frames(bob, 2)
    sid = next(iter(world.gateway.snapshot().users["u1"]))
    alice.drop(code)
    await world.until(lambda: sid in world.gateway.snapshot().parked, "alice parked")
    return sid, got[-1]["s"], bob


def metric(world: World, name: str, **labels: str) -> float:
    value = world.gateway.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def test_a_dropped_session_resumes_with_the_missed_events_and_their_original_s() -> None:
    async def test(world: World) -> None:
        sid, last, bob = await parked_alice(world)
        await publish(world, 3, start=2)  # while parked: kept
        await frames(bob, 3)
        client, first = await resume(world, "u1", sid, last)
        replay = [first, *await frames(client, 2)]
        assert [f["d"]["i"] for f in replay] == [2, 3, 4]
        assert [f["s"] for f in replay] == [last + 1, last + 2, last + 3]
        resumed = await client.expect("RESUMED")
        assert resumed["d"] == {"sessionId": sid, "replayed": 3} and resumed["s"] == last + 4
        await publish(world, 1, start=5)
        live = await client.recv()
        assert (live["op"], live["s"], live["d"]) == ("MSG", last + 5, {"i": 5})
        # No presence flap for bob: offline nor online was broadcast.
        assert bob.pending() == [] or all(f["op"] != "PRESENCE_UPDATE" for f in bob.pending())
        assert metric(world, "gateway_resumes_total", outcome="resumed") == 1
        assert metric(world, "gateway_replayed_frames_total") == 3
        assert world.gateway.snapshot().parked == frozenset()
        # After RESUMED: ALREADY_AUTHENTICATED for IDENTIFY and RESUME alike.
        for op, d in (("IDENTIFY", {"token": "token:u1"}), ("RESUME", {"token": "token:u1",
                      "sessionId": sid, "seq": 0})):
            await client.send_op(op, d)
            error = await client.expect("ERROR")
            assert error["d"]["code"] == "ALREADY_AUTHENTICATED"

    run_virtual(test, FAST)


def test_dispatches_sent_before_the_drop_are_replayed_from_any_kept_seq() -> None:
    async def test(world: World) -> None:
        sid, last, _ = await parked_alice(world)
        client, first = await resume(world, "u1", sid, last - 2)  # two lost in flight
        assert (first["op"], first["s"]) == ("MSG", last - 1)
        assert (await client.recv())["s"] == last
        assert (await client.expect("RESUMED"))["d"]["replayed"] == 2

    run_virtual(test, FAST)


@pytest.mark.parametrize(
    ("why", "user", "seq"),
    [
        ("other_user", "u2", 0),
        ("seq", "u1", 10_000),  # in the future
        ("seq", "u1", 0),  # older than the 3 kept before the drop (s 2..4)
        ("unknown", "u1", None),
    ],
)
def test_a_refused_resume_is_invalid_session_and_leaves_the_session_untouched(
    why: str, user: str, seq: int | None
) -> None:
    async def test(world: World) -> None:
        sid, last, _ = await parked_alice(world)
        await publish(world, 3, start=2)
        target = "no-such-session" if seq is None else sid
        client, answer = await resume(world, user, target, last if seq is None else seq)
        assert answer == {"op": "INVALID_SESSION", "d": {"resumable": False}}
        assert metric(world, "gateway_resumes_total", outcome=why) == 1
        # The connection stays and may IDENTIFY; the parked session is as it was.
        await client.send_op("IDENTIFY", {"token": f"token:{user}"})
        assert (await client.expect("READY"))["s"] == 1
        assert sid in world.gateway.snapshot().parked
        again, first = await resume(world, "u1", sid, last)
        assert [first["d"]["i"], *[f["d"]["i"] for f in await frames(again, 2)]] == [2, 3, 4]
        assert (await again.expect("RESUMED"))["d"]["replayed"] == 3

    run_virtual(test, FAST)


def test_after_invalid_session_identify_is_due_within_the_timeout_of_it() -> None:
    async def test(world: World) -> None:
        clock = world.gateway.clock
        client = await world.connect()
        start = clock.monotonic()
        await anyio.sleep(4.0)
        await client.send_op("RESUME", {"token": "token:u1", "sessionId": "x", "seq": 0})
        await client.expect("INVALID_SESSION")
        await anyio.sleep(4.0)  # over 8 s after connect, 4 s after INVALID_SESSION: open
        assert clock.monotonic() - start >= 8.0
        await client.send_op("RESUME", {"token": "token:u1", "sessionId": "x", "seq": 0})
        await client.expect("INVALID_SESSION")  # may RESUME again
        refused_at = clock.monotonic()
        await client.closed.wait()
        assert client.close_code == 4003
        assert clock.monotonic() - refused_at == pytest.approx(5.0, abs=0.1)

    run_virtual(test, FAST)


@pytest.mark.parametrize("token", ["bogus", "token:nobody"])
def test_a_bad_token_or_a_sub_that_is_no_user_closes_4004(token: str) -> None:
    async def test(world: World) -> None:
        sid, last, _ = await parked_alice(world)
        client = await world.connect()
        await client.send_op("RESUME", {"token": token, "sessionId": sid, "seq": last})
        await client.closed.wait()
        assert client.close_code == 4004
        assert sid in world.gateway.snapshot().parked

    run_virtual(test, FAST)


@pytest.mark.parametrize(
    ("code", "parks"),
    [(None, True), (4100, True), (1005, True), (1000, False), (1001, False)],
)
def test_which_client_endings_park(code: int | None, parks: bool) -> None:
    async def test(world: World) -> None:
        bob = await world.login("u2", "s1")
        alice = await world.login("u1", "s1")
        await bob.expect("PRESENCE_UPDATE")
        sid = next(iter(world.gateway.snapshot().users["u1"]))
        alice.drop(code)
        await world.until(lambda: sid not in world.gateway.snapshot().connections, "closed")
        assert (sid in world.gateway.snapshot().parked) is parks
        if not parks:
            offline = await bob.expect("PRESENCE_UPDATE")
            assert offline["d"]["status"] == "offline"
            _, answer = await resume(world, "u1", sid, 1)
            assert answer["op"] == "INVALID_SESSION"

    run_virtual(test, FAST)


def test_heartbeat_timeout_parks_and_the_ttl_ends_the_session_like_a_close() -> None:
    settings = GatewaySettings(heartbeat_sweep_ms=5_000, session=SessionConfig(
        heartbeat_timeout=10.0, resume_ttl=30.0))

    async def beat(client: FakeTransport) -> None:
        while True:
            await anyio.sleep(3.0)
            await client.send_op("HEARTBEAT")

    async def test(world: World) -> None:
        bob = await world.login("u2", "s1")
        alice = await world.login("u1", "s1")
        await bob.expect("PRESENCE_UPDATE")
        async with anyio.create_task_group() as group:
            group.start_soon(beat, bob)
            sid = next(iter(world.gateway.snapshot().users["u1"]))
            await world.until(lambda: sid in world.gateway.snapshot().parked, "parked by 4009")
            parked_at = world.gateway.clock.monotonic()
            assert alice.close_code == 4009
            while (offline := await bob.recv())["op"] == "HEARTBEAT_ACK":
                pass
            group.cancel_scope.cancel()
        # The offline broadcast comes only when the TTL ran out, not at the drop.
        assert world.gateway.clock.monotonic() - parked_at == pytest.approx(30.0, abs=0.5)
        assert offline["d"] == {"userId": "u1", "serverId": "s1", "status": "offline"}
        assert world.gateway.snapshot().parked == frozenset()
        assert set(world.gateway.snapshot().users) == {"u2"}
        assert metric(world, "gateway_parked_ended_total", reason="ttl") == 1

    run_virtual(test, settings)


def test_a_parked_session_that_keeps_too_much_ends() -> None:
    settings = GatewaySettings(
        outbound_max_frames=8, session=SessionConfig(replay_max_frames=8, resume_buffer_frames=2)
    )

    async def test(world: World) -> None:
        sid, last, _ = await parked_alice(world)
        await publish(world, 8, start=2)  # 8 since the drop: at the bound, kept
        assert sid in world.gateway.snapshot().parked
        await publish(world, 1, start=10)  # 9: over it
        await world.until(lambda: sid not in world.gateway.snapshot().parked, "ended")
        assert metric(world, "gateway_parked_ended_total", reason="overflow") == 1
        _, answer = await resume(world, "u1", sid, last)
        assert answer["op"] == "INVALID_SESSION"

    run_virtual(test, settings)


def test_resume_off_never_parks() -> None:
    async def test(world: World) -> None:
        bob = await world.login("u2", "s1")
        alice = await world.login("u1", "s1")
        await bob.expect("PRESENCE_UPDATE")
        sid = next(iter(world.gateway.snapshot().users["u1"]))
        alice.drop()
        assert (await bob.expect("PRESENCE_UPDATE"))["d"]["status"] == "offline"
        _, answer = await resume(world, "u1", sid, 1)
        assert answer["op"] == "INVALID_SESSION"

    run_virtual(test, GatewaySettings(session=SessionConfig(resume_ttl=0)))


def test_a_zombie_is_taken_over_and_its_connection_closed_4014() -> None:
    async def test(world: World) -> None:
        bob = await world.login("u2", "s1")
        alice = await world.login("u1", "s1")
        await bob.expect("PRESENCE_UPDATE")
        await publish(world, 2)
        got = await frames(alice, 2)
        sid = next(iter(world.gateway.snapshot().users["u1"]))
        client, first = await resume(world, "u1", sid, got[0]["s"])
        assert first["s"] == got[1]["s"]
        assert (await client.expect("RESUMED"))["d"]["replayed"] == 1
        await alice.closed.wait()
        assert alice.close_code == 4014
        await publish(world, 1, start=2)
        assert (await client.recv())["s"] == got[1]["s"] + 2
        # The old connection's end released nothing of the session.
        snapshot = world.gateway.snapshot()
        assert snapshot.users["u1"] == frozenset({sid}) and sid in snapshot.servers["s1"]
        assert metric(world, "gateway_resumes_total", outcome="taken_over") == 1
        assert all(f["op"] != "PRESENCE_UPDATE" for f in bob.pending())

    run_virtual(test, FAST)


def test_two_resumes_at_once_exactly_one_wins() -> None:
    async def test(world: World) -> None:
        sid, last, _ = await parked_alice(world)
        directory = world.directory
        real = directory.get_user

        async def slow_get_user(user_id: str) -> Any:
            await anyio.sleep(1.0)
            return await real(user_id)

        directory.get_user = slow_get_user  # type: ignore[method-assign]
        a, b = await world.connect(), await world.connect()
        d = {"token": "token:u1", "sessionId": sid, "seq": last}
        await a.send_op("RESUME", d)
        await b.send_op("RESUME", d)
        answers = sorted([(await a.recv())["op"], (await b.recv())["op"]])
        assert answers == ["INVALID_SESSION", "RESUMED"]
        assert metric(world, "gateway_resumes_total", outcome="concurrent") == 1

    run_virtual(test, FAST)


def test_the_rate_window_carries_over_a_resume() -> None:
    settings = GatewaySettings(session=SessionConfig(rate_limit_count=5, rate_limit_window=60.0))

    async def test(world: World) -> None:
        alice = await world.login("u1")  # IDENTIFY: 1
        for _ in range(2):  # 3
            await alice.send_op("HEARTBEAT")
            await alice.expect("HEARTBEAT_ACK")
        sid = next(iter(world.gateway.snapshot().users["u1"]))
        alice.drop()
        await world.until(lambda: sid in world.gateway.snapshot().parked, "parked")
        client, resumed = await resume(world, "u1", sid, 1)  # RESUME: 4
        assert resumed["op"] == "RESUMED" and resumed["d"]["replayed"] == 0
        await client.send_op("HEARTBEAT")  # 5
        await client.expect("HEARTBEAT_ACK")
        await client.send_op("HEARTBEAT")  # 6: over the carried window
        await client.closed.wait()
        assert client.close_code == 4008

    run_virtual(test, settings)


def test_a_client_that_drops_again_mid_replay_resumes_again_from_its_seq() -> None:
    async def test(world: World) -> None:
        sid, last, _ = await parked_alice(world)
        await publish(world, 3, start=2)
        client, first = await resume(world, "u1", sid, last)
        assert first["s"] == last + 1
        client.drop()  # read one replayed frame only
        await world.until(lambda: sid in world.gateway.snapshot().parked, "parked again")
        again, first = await resume(world, "u1", sid, last + 1)
        replay = [first, await again.recv()]
        assert [f["d"]["i"] for f in replay] == [3, 4]
        earlier = await again.expect("RESUMED")  # the first RESUMED is a dispatch: replayed
        assert earlier["s"] == last + 4 and earlier["d"]["replayed"] == 3
        resumed = await again.expect("RESUMED")
        assert resumed["d"]["replayed"] == 3 and resumed["s"] == last + 5

    run_virtual(test, FAST)
