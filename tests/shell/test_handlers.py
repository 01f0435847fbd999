"""The shell in process, on fakes and virtual time (Cosmic Python's ``test_handlers``
style): what the black-box tests cannot see from outside, read through
``Gateway.snapshot()``, and the one-way flow of effects through a connection."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import anyio
import pytest

from adapters.shell import GatewaySettings
from adapters.shell.connection import Connection, SocketLimits
from adapters.shell.live import LiveSession, Work
from adapters.shell.metrics import Metrics
from adapters.shell.outbound import Flusher
from domain.effects import Send, Subscribe, Unsubscribe
from domain.session import Session, SessionConfig
from simulation.clock import VirtualClock
from tests.shell.fakes import FakeTransport, World, run_virtual

# --- the interpreter ------------------------------------------------------------------


class RecordingHost:
    """A host whose answer to Subscribe is a frame: it must be queued before the
    effects that followed Subscribe."""

    def __init__(self) -> None:
        self.handled: list[Work] = []
        self.closed_conns: list[Connection] = []

    async def handle(self, live: LiveSession, effect: Work) -> Sequence[Work]:
        self.handled.append(effect)
        if isinstance(effect, Subscribe):
            return [Send("answer"), Unsubscribe(effect.server_id)]
        return ()

    async def closed(self, conn: Connection) -> None:
        self.closed_conns.append(conn)


def test_a_hosts_answer_runs_before_the_effects_after_it() -> None:
    async def main() -> None:
        host = RecordingHost()
        live = LiveSession(Session("sid", SessionConfig(), 0.0))
        conn = Connection(
            FakeTransport(),
            live,
            host,
            limits=SocketLimits(100, 1 << 20, 1.0),
            metrics=Metrics(),
            clock=VirtualClock(),
            flusher=Flusher(),
        )
        assert live.outlet is conn
        await conn.perform([Send("first"), Subscribe("s1"), Send("last")])
        assert list(conn.outbound) == ["first", "answer", "last"]
        assert host.handled == [Subscribe("s1"), Unsubscribe("s1")]

    anyio.run(main)


# --- routing and cleanup --------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        GatewaySettings(session=SessionConfig(resume_ttl=0)),
        GatewaySettings(session=SessionConfig(resume_ttl=10.0)),
    ],
    ids=["resume-off", "parked-then-ended"],
)
def test_closing_clients_leaves_nothing_routed(settings: GatewaySettings) -> None:
    async def test(world: World) -> None:
        alice = await world.login("u1", "s1")
        bob = await world.login("u2", "s1", "s2")
        snapshot = world.gateway.snapshot()
        assert set(snapshot.users) == {"u1", "u2"}
        assert set(snapshot.servers) == {"s1", "s2"}
        assert len(snapshot.servers["s1"]) == 2
        assert snapshot.interest == {"ws:user:u1": 1, "ws:user:u2": 1,
                                     "ws:server:s1": 2, "ws:server:s2": 1}
        alice.drop()
        await bob.send_op("UNSUBSCRIBE_SERVER", {"serverId": "s2"})
        bob.drop()
        await world.until(lambda: not world.gateway.snapshot().connections, "connections end")
        snapshot = world.gateway.snapshot()
        if world.gateway.settings.session.resume_ttl > 0:
            # TCP loss parks both sessions (section 13): routes kept until the TTL ends.
            assert len(snapshot.parked) == 2 and set(snapshot.users) == {"u1", "u2"}
            assert set(snapshot.servers) == {"s1"}
            await world.until(lambda: not world.gateway.snapshot().parked, "parked sessions end")
            snapshot = world.gateway.snapshot()
        assert (snapshot.servers, snapshot.users, snapshot.interest) == ({}, {}, {})

    run_virtual(test, settings)


def test_unsubscribe_drops_the_route_at_once_and_the_interest_soon_after() -> None:
    async def test(world: World) -> None:
        alice = await world.login("u1", "s1")
        await alice.send_op("UNSUBSCRIBE_SERVER", {"serverId": "s1"})
        await alice.expect("UNSUBSCRIBED")
        assert world.gateway.snapshot().servers == {}
        await world.until(lambda: "ws:server:s1" not in world.gateway.snapshot().interest,
                          "the broker unsubscribe")
        await world.gateway.publish_to_server("s1", {"op": "AFTER", "d": None})
        await alice.send_op("HEARTBEAT")
        assert (await alice.recv())["op"] == "HEARTBEAT_ACK"  # and no AFTER before it

    run_virtual(test)


def test_member_removal_unsubscribes_through_the_interpreter() -> None:
    async def test(world: World) -> None:
        alice = await world.login("u1", "s1")
        bob = await world.login("u2", "s1", "s2")
        (alice_id,) = world.gateway.snapshot().users["u1"]
        world.directory.remove_member("s1", "u2")
        removal = {"op": "SERVER_MEMBER_REMOVE", "d": {"serverId": "s1", "userId": "u2"}}
        await world.gateway.publish_to_server("s1", removal)
        assert (await bob.recv())["op"] == "SERVER_MEMBER_REMOVE"
        assert (await bob.recv()) | {"s": 0} == {"op": "UNSUBSCRIBED", "d": {"serverId": "s1"},
                                                 "s": 0}
        assert world.gateway.snapshot().servers["s1"] == {alice_id}
        await world.until(lambda: world.gateway.snapshot().interest["ws:server:s1"] == 1,
                          "bob's interest released")
        assert (await alice.event())["op"] == "SERVER_MEMBER_REMOVE"

    run_virtual(test)


def test_a_refused_identify_leaves_nothing_routed() -> None:
    async def test(world: World) -> None:
        client = await world.connect()
        await client.send_op("IDENTIFY", {"token": "token:u-nobody"})
        await client.closed.wait()
        assert client.close_code == 4004
        await world.until(lambda: not world.gateway.snapshot().connections, "the close")
        snapshot = world.gateway.snapshot()
        assert (snapshot.users, snapshot.interest) == ({}, {})

    run_virtual(test)


# --- timers and limits, in virtual time --------------------------------------------------


def test_identify_deadline_closes_4003_after_five_virtual_seconds() -> None:
    async def test(world: World) -> None:
        started = anyio.current_time()
        client = await world.connect()
        await client.closed.wait()
        assert client.close_code == 4003
        assert anyio.current_time() - started == pytest.approx(5.0, abs=0.1)

    run_virtual(test)


def test_heartbeat_sweep_closes_4009() -> None:
    settings = GatewaySettings(heartbeat_sweep_ms=10_000)

    async def test(world: World) -> None:
        started = anyio.current_time()
        client = await world.login("u1")
        await client.closed.wait()
        assert client.close_code == 4009
        assert 60.0 < anyio.current_time() - started <= 70.5

    run_virtual(test, settings)


def test_a_stalled_consumer_is_closed_4010_and_others_keep_up() -> None:
    settings = replace(GatewaySettings(), outbound_max_frames=8)

    async def test(world: World) -> None:
        reader = await world.login("u1", "s1")
        stalled = await world.login("u2", "s1")
        (stalled_id,) = world.gateway.snapshot().users["u2"]
        stalled.stall()
        for i in range(12):
            await world.gateway.publish_to_server("s1", {"op": "BULK", "d": i})
        await stalled.closed.wait()
        assert stalled.close_code == 4010
        registry = world.gateway.metrics.registry
        assert registry.get_sample_value("gateway_slow_consumers_total") == 1
        await world.until(lambda: stalled_id not in world.gateway.snapshot().connections, "gone")
        frames = [await reader.event() for _ in range(12)]
        assert [f["d"] for f in frames] == list(range(12))

    run_virtual(test, settings)
