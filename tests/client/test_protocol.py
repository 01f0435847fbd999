"""The client against a scripted fake gateway: RESUME (PROTOCOL 13) and its refusals,
heartbeats and zombies, RECONNECT, faults, drops and close codes."""

from __future__ import annotations

import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from entrypoints.client import (
    CLIENT_RECONNECT_CLOSE,
    AuthenticationFailed,
    Backoff,
    ClientEvent,
    Connected,
    Disconnected,
    Dispatch,
    GatewayClient,
    GatewayUnavailable,
    ProtocolFault,
    SessionLost,
    SessionTakenOver,
    connect,
)
from tests.client.conftest import FakeGateway, Peer, next_event, next_of

FAST = Backoff(base=0.01, cap=0.05)


def tokens() -> tuple[list[str], Callable[[], Awaitable[str]]]:
    """A token provider that hands out t1, t2, ... and records them."""
    issued: list[str] = []

    async def provider() -> str:
        issued.append(f"t{len(issued) + 1}")
        return issued[-1]

    return issued, provider


async def identified(peer: Peer, session_id: str = "S", **ready: str) -> None:
    await peer.hello()
    await peer.expect("IDENTIFY")
    await peer.ready(session_id, **ready)


async def _until_failure(client: GatewayClient) -> AsyncIterator[ClientEvent]:
    """The client's events until it gives up (GatewayUnavailable)."""
    try:
        async for event in client:
            yield event
    except GatewayUnavailable:
        return


def ops(events: list[ClientEvent]) -> list[str]:
    return [e.op if isinstance(e, Dispatch) else type(e).__name__ for e in events]


async def test_resume_after_a_drop_replays_in_order_and_restores_nothing(
    fake: FakeGateway,
) -> None:
    issued, provider = tokens()
    async with connect(fake.url, provider, subscribe=["s1"], backoff=FAST) as client:
        one = await fake.accept()
        await one.hello()
        assert await one.expect("IDENTIFY") == {"token": "t1"}
        await one.ready("S")
        assert await one.expect("SUBSCRIBE_SERVER") == {"serverId": "s1"}
        await one.send("SUBSCRIBED", {"serverId": "s1"}, s=2)
        await one.send("EV", {"n": 3}, s=3)
        seen = [await next_event(client) for _ in range(4)]
        assert ops(seen) == ["READY", "Connected", "SUBSCRIBED", "EV"]
        one.abort()  # TCP loss: no close frame

        two = await fake.accept()
        await two.hello(session_id="another")
        assert await two.expect("RESUME") == {"token": "t2", "sessionId": "S", "seq": 3}
        await two.send("EV", {"n": 4}, s=4)  # replayed, original s
        await two.send("EV", {"n": 5}, s=5)
        await two.send("RESUMED", {"sessionId": "S", "replayed": 2}, s=6)
        await two.send("EV", {"n": 7}, s=7)  # live
        disconnected = await next_event(client)
        assert isinstance(disconnected, Disconnected) and disconnected.code == 1006
        assert disconnected.reconnect_in is not None
        seen = [await next_event(client) for _ in range(5)]
        assert ops(seen) == ["EV", "EV", "RESUMED", "Connected", "EV"]
        assert [e.s for e in seen if isinstance(e, Dispatch)] == [4, 5, 6, 7]
        connected = seen[3]
        assert isinstance(connected, Connected)
        assert connected.resumed and connected.replayed == 2 and connected.session_id == "S"
        assert client.seq == 7 and client.session_id == "S"
    code, sent = await two.until_closed()
    assert code == 1000  # leaving the block ends the session
    assert sent == []  # a resumed session keeps its subscriptions: nothing re-sent
    assert issued == ["t1", "t2"]  # the provider runs before every IDENTIFY and RESUME


@pytest.mark.parametrize("refusal", ["INVALID_SESSION", "ERROR"])
async def test_a_refused_resume_identifies_on_the_same_connection_and_restores(
    fake: FakeGateway, refusal: str
) -> None:
    """INVALID_SESSION, or ERROR with op RESUME (today's gateway: UNKNOWN_OP), means
    "cannot resume": IDENTIFY at once on that connection, then subscriptions, presence
    interest and status as they were."""
    async with connect(fake.url, "tok", subscribe=["s1"], backoff=FAST) as client:
        one = await fake.accept()
        await identified(one)
        await one.expect("SUBSCRIBE_SERVER")
        await one.send("SUBSCRIBED", {"serverId": "s1"}, s=2)
        await next_of(client, Connected)
        await client.set_status("dnd")
        assert await one.expect("PRESENCE_UPDATE") == {"status": "dnd"}
        await client.subscribe_presence("s1", ["u2", "u3"])
        assert await one.expect("SUBSCRIBE_PRESENCE") == {"serverId": "s1", "userIds": ["u2", "u3"]}
        await client.subscribe("s2")
        await one.expect("SUBSCRIBE_SERVER")
        await one.send("ERROR", {"code": "FORBIDDEN", "message": "no", "op": "SUBSCRIBE_SERVER"})
        await one.close(4009, "session timed out")  # parks the session

        two = await fake.accept()
        await two.hello(session_id="H2")
        assert await two.expect("RESUME") == {"token": "tok", "sessionId": "S", "seq": 2}
        if refusal == "INVALID_SESSION":
            await two.send("INVALID_SESSION", {"resumable": False})
        else:
            await two.send(
                "ERROR", {"code": "UNKNOWN_OP", "message": "unknown op 'RESUME'", "op": "RESUME"}
            )
        assert await two.expect("IDENTIFY") == {"token": "tok"}
        lost = await next_of(client, SessionLost)
        assert ("INVALID_SESSION" if refusal == "INVALID_SESSION" else "UNKNOWN_OP") in lost.reason
        await two.ready("H2", status="online")
        # Restored in order; s2 was refused FORBIDDEN, so it is not asked again.
        assert await two.expect("SUBSCRIBE_SERVER") == {"serverId": "s1"}
        assert await two.expect("SUBSCRIBE_PRESENCE") == {"serverId": "s1", "userIds": ["u2", "u3"]}
        assert await two.expect("PRESENCE_UPDATE") == {"status": "dnd"}
        connected = await next_of(client, Connected)
        assert not connected.resumed and connected.session_id == "H2"
        await two.send("SUBSCRIBED", {"serverId": "s1"}, s=2)  # s restarts with READY
        assert (await next_of(client, Dispatch)).op == "SUBSCRIBED"
        assert client.subscriptions == {"s1"}


async def test_4004_stops_the_client_with_a_clear_error(fake: FakeGateway) -> None:
    async with connect(fake.url, "bad-token", backoff=FAST) as client:
        peer = await fake.accept()
        await peer.hello()
        await peer.expect("IDENTIFY")
        await peer.close(4004, "authentication failed")
        with pytest.raises(AuthenticationFailed, match="4004"):
            async for _ in client:
                pass
        assert isinstance(client.failure, AuthenticationFailed)
        with pytest.raises(AuthenticationFailed):
            await client.typing_start("c1")
    assert fake.connections == 1  # never retried


async def test_4014_stops_the_client(fake: FakeGateway) -> None:
    async with connect(fake.url, "tok", backoff=FAST) as client:
        peer = await fake.accept()
        await identified(peer)
        await peer.close(4014, "session taken over")
        with pytest.raises(SessionTakenOver):
            async for _ in client:
                pass
    assert fake.connections == 1


async def test_heartbeats_keep_an_acked_connection_and_drop_a_zombie(fake: FakeGateway) -> None:
    async with connect(fake.url, "tok", backoff=FAST) as client:
        one = await fake.accept()
        await one.hello(interval_ms=100)
        await one.expect("IDENTIFY")
        await one.ready("S")
        await one.ack_heartbeats(5)  # acked: the connection stays
        one.auto_ack = False  # from now on no HEARTBEAT_ACK
        code, _ = await one.until_closed()
        assert code == CLIENT_RECONNECT_CLOSE  # closed by the client, resumable
        assert one.heartbeats >= 6
        disconnected = await next_of(client, Disconnected)
        assert "HEARTBEAT_ACK" in disconnected.reason
        two = await fake.accept()
        await two.hello()
        assert (await two.expect("RESUME"))["seq"] == 1


async def test_no_zombie_check_while_queued_for_admission(fake: FakeGateway) -> None:
    """PROTOCOL 15: this gateway ACKs HEARTBEATs while the IDENTIFY waits in its
    admission queue, but an older one held them until READY; the unanswered heartbeats
    of a handshake are not a zombie (the client stays lenient)."""
    async with connect(fake.url, "tok", backoff=FAST) as client:
        peer = await fake.accept()
        peer.auto_ack = False
        await peer.hello(interval_ms=50)
        await peer.expect("IDENTIFY")
        while peer.heartbeats < 6:  # six intervals without an ACK, still queued
            await peer.recv()
        await peer.ready("S")
        assert isinstance(await next_of(client, Connected), Connected)
        code, _ = await peer.until_closed()  # after READY the check is back
        assert code == CLIENT_RECONNECT_CLOSE


async def test_first_heartbeat_is_jittered_within_the_interval(fake: FakeGateway) -> None:
    """With an rng whose first draw is 0 the first heartbeat is immediate, while the
    interval is a minute: the jitter is a fraction of the interval, drawn from the rng."""

    class Zero(random.Random):
        def random(self) -> float:
            return 0.0

    async with connect(fake.url, "tok", backoff=FAST, rng=Zero()):
        peer = await fake.accept()
        peer.auto_ack = False
        await peer.hello(interval_ms=60_000)
        frames = {(await peer.recv())["op"], (await peer.recv())["op"]}
        assert frames == {"HEARTBEAT", "IDENTIFY"}


GARBAGE: list[tuple[str, str | bytes]] = [
    ("not JSON", "garbage{"),
    ("not an object", "[1, 2]"),
    ("no op", '{"d": {}, "s": 2}'),
    ("binary", b"\x00\x01"),
    ("dispatch without s", '{"op": "EV", "d": {}}'),
    ("s is a boolean", '{"op": "EV", "d": {}, "s": true}'),
    ("sequence gap", '{"op": "EV", "d": {}, "s": 3}'),
    ("duplicate s", '{"op": "EV", "d": {}, "s": 1}'),
    ("a second HELLO", '{"op": "HELLO", "d": {"heartbeatInterval": 1000}}'),
]


@pytest.mark.parametrize(("what", "raw"), GARBAGE, ids=[w for w, _ in GARBAGE])
async def test_a_protocol_fault_is_surfaced_then_resumed_from_the_last_good_s(
    fake: FakeGateway, what: str, raw: str | bytes
) -> None:
    async with connect(fake.url, "tok", backoff=FAST) as client:
        one = await fake.accept()
        await identified(one)
        await next_of(client, Connected)
        await one.send_raw(raw)
        fault = await next_event(client)
        assert isinstance(fault, ProtocolFault), fault
        code, _ = await one.until_closed()
        assert code == CLIENT_RECONNECT_CLOSE
        two = await fake.accept()
        await two.hello()
        assert (await two.expect("RESUME"))["seq"] == 1  # the faulty frame did not count
        assert client.seq == 1


async def test_bad_hello_is_a_fault(fake: FakeGateway) -> None:
    async with connect(fake.url, "tok", backoff=FAST) as client:
        one = await fake.accept()
        await one.send("HELLO", {"heartbeatInterval": -5})
        assert isinstance(await next_event(client), ProtocolFault)
        assert (await one.until_closed())[0] == CLIENT_RECONNECT_CLOSE
        await fake.accept()


async def test_no_hello_is_dropped_and_retried(fake: FakeGateway) -> None:
    async with connect(fake.url, "tok", backoff=FAST, hello_timeout=0.05) as client:
        one = await fake.accept()  # never says HELLO
        assert (await one.until_closed())[0] == CLIENT_RECONNECT_CLOSE
        assert "HELLO" in (await next_of(client, Disconnected)).reason
        two = await fake.accept()
        await identified(two)
        await next_of(client, Connected)


async def test_a_drop_mid_identify_reconnects_and_identifies(fake: FakeGateway) -> None:
    async with connect(fake.url, "tok", backoff=FAST) as client:
        one = await fake.accept()
        await one.hello()
        await one.expect("IDENTIFY")
        one.abort()
        disconnected = await next_of(client, Disconnected)
        assert disconnected.code == 1006 and disconnected.reconnect_in is not None
        two = await fake.accept()
        await two.hello()
        await two.expect("IDENTIFY")  # no session yet: nothing to resume
        await two.ready("S2")
        assert (await next_of(client, Connected)).session_id == "S2"


async def test_reconnect_moves_to_the_next_url_and_resumes_there(
    fake: FakeGateway, fake2: FakeGateway
) -> None:
    async with connect([fake.url, fake2.url], "tok", backoff=FAST) as client:
        a = await fake.accept()
        await identified(a)
        await a.send("EV", {}, s=2)
        await next_of(client, Connected)
        await a.send("RECONNECT")
        await a.close(1001, "server shutting down")
        disconnected = await next_of(client, Disconnected)
        assert disconnected.code == 1001
        b = await fake2.accept()
        await b.hello()
        assert await b.expect("RESUME") == {"token": "tok", "sessionId": "S", "seq": 2}
        await b.send("RESUMED", {"sessionId": "S", "replayed": 0}, s=3)
        connected = await next_of(client, Connected)
        assert connected.resumed and connected.url == fake2.url


async def test_reconnect_without_a_close_is_closed_by_the_client(fake: FakeGateway) -> None:
    async with connect(fake.url, "tok", backoff=FAST, reconnect_close_timeout=0.05) as client:
        a = await fake.accept()
        await identified(a)
        await next_of(client, Connected)
        await a.send("RECONNECT")  # and never closes
        code, _ = await a.until_closed()
        assert code == CLIENT_RECONNECT_CLOSE
        b = await fake.accept()
        await b.hello()
        await b.expect("RESUME")


async def test_an_unreachable_gateway_is_retried_then_given_up(unused_port: int) -> None:
    url = f"ws://127.0.0.1:{unused_port}/ws/gateway"
    async with connect(url, "tok", backoff=FAST, max_attempts=3) as client:
        seen = [event async for event in _until_failure(client)]
    assert [type(e) for e in seen] == [Disconnected] * 3
    assert all(isinstance(e, Disconnected) and e.code is None for e in seen)
    assert [e.reconnect_in is None for e in seen if isinstance(e, Disconnected)] == [
        False,
        False,
        True,
    ]
    assert isinstance(client.failure, GatewayUnavailable)


@pytest.fixture
def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_full_jitter_backoff_is_uniform_under_a_capped_doubling_ceiling() -> None:
    backoff = Backoff(base=0.5, cap=8.0)
    rng = random.Random(17)
    for attempt in range(12):
        ceiling = min(8.0, 0.5 * 2**attempt)
        delays = [backoff.delay(attempt, rng) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # spread over the whole range, not clustered
        assert min(delays) < ceiling * 0.2
    assert backoff.delay(10_000, rng) <= 8.0  # no overflow for a huge attempt number
