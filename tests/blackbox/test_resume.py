"""RESUME (PROTOCOL section 13) over real sockets, one gateway (memory backends)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from domain.codec import encode_envelope
from tests.blackbox.conftest import Client, GatewayServer, RawClient, eventually

INVALID_SESSION = {"op": "INVALID_SESSION", "d": {"resumable": False}}


async def watched_alice(harness: GatewayServer) -> tuple[Client, Client]:
    """bob watches s1; alice (u1) is READY, dnd, subscribed to s1."""
    bob = await harness.login("u2", "bob")
    await bob.subscribe("s1")
    alice = await harness.login("u1", "alice")
    await bob.expect("PRESENCE_UPDATE")
    await alice.send_op("PRESENCE_UPDATE", {"status": "dnd"})
    await bob.expect_event("PRESENCE_UPDATE", {"userId": "u1", "serverId": "s1", "status": "dnd"})
    await alice.subscribe("s1")
    return alice, bob


async def publish_all_ways(harness: GatewayServer, n: int) -> None:
    """Events for alice through the Python API and a plain broker PUBLISH."""
    for i in range(n):
        if i % 2:
            payload = encode_envelope({"op": "MSG", "d": {"i": i}})
            await harness.broker.publish("ws:server:s1", payload)
        else:
            await harness.gateway.publish_to_user("u1", {"op": "MSG", "d": {"i": i}})


async def resume(harness: GatewayServer, user: str, sid: str, seq: int, name: str) -> Client:
    client = await harness.connect(name)
    client.checker.seq = seq  # the frames that follow continue the session's s
    await client.send_op("RESUME", {"token": harness.mint(user), "sessionId": sid, "seq": seq})
    return client


async def test_tcp_loss_parks_and_a_resume_replays_everything_with_its_s(
    harness: GatewayServer,
) -> None:
    alice, bob = await watched_alice(harness)
    sid, seq = alice.session_id, alice.seq
    alice.ws.transport.abort()  # no close frame: the TCP connection just ends
    await eventually(lambda: sid in harness.gateway.snapshot().parked, what="parked")
    await publish_all_ways(harness, 4)
    again = await resume(harness, "u1", sid, seq, "alice-again")
    got = [await again.expect("MSG") for _ in range(4)]
    assert [f["d"]["i"] for f in got] == [0, 1, 2, 3]
    resumed = await again.expect("RESUMED")  # FrameChecker: s continues, gapless
    assert resumed["d"] == {"sessionId": sid, "replayed": 4}
    await harness.gateway.publish_to_server("s1", {"op": "LIVE", "d": {}})
    await again.expect("LIVE")
    # No presence flap, status unchanged: bob saw only the server's events.
    assert [(await bob.recv_json())["op"] for _ in range(3)] == ["MSG", "MSG", "LIVE"]
    await bob.assert_no_frame()
    assert (await harness.presence.get_status("u1")).value == "dnd"


async def test_no_presence_broadcast_across_a_resume(harness: GatewayServer) -> None:
    alice, bob = await watched_alice(harness)
    sid, seq = alice.session_id, alice.seq
    await alice.ws.close(code=4100)  # a client code other than 1000/1001: parks
    await eventually(lambda: sid in harness.gateway.snapshot().parked, what="parked")
    again = await resume(harness, "u1", sid, seq, "alice-again")
    await again.expect("RESUMED")
    await bob.assert_no_frame()
    await harness.gateway.publish_to_server("s1", {"op": "AFTER", "d": None})
    await bob.expect("AFTER")  # the first frame bob sees since dnd: no offline, no online


@pytest.mark.parametrize("code", [1000, 1001])
async def test_a_client_that_leaves_ends_its_session(harness: GatewayServer, code: int) -> None:
    alice, bob = await watched_alice(harness)
    sid, seq = alice.session_id, alice.seq
    await alice.ws.close(code=code)
    await bob.expect_event("PRESENCE_UPDATE", {"userId": "u1", "serverId": "s1",
                                               "status": "offline"})
    again = await resume(harness, "u1", sid, seq, "alice-again")
    assert await again.recv_json() == INVALID_SESSION
    again.checker.seq = 0
    await again.identify(harness.mint("u1"))  # the connection stays for IDENTIFY


async def test_a_zombie_is_taken_over_and_closed_4014(harness: GatewayServer) -> None:
    alice, bob = await watched_alice(harness)
    sid, seq = alice.session_id, alice.seq
    again = await resume(harness, "u1", sid, seq, "alice-again")
    assert (await again.expect("RESUMED"))["d"] == {"sessionId": sid, "replayed": 0}
    await alice.expect_close(4014)
    await harness.gateway.publish_to_server("s1", {"op": "LIVE", "d": None})
    await again.expect("LIVE")
    await bob.expect("LIVE")
    await bob.assert_no_frame()


async def test_message_too_big_parks(harness: GatewayServer) -> None:
    alice, _ = await watched_alice(harness)
    sid, seq = alice.session_id, alice.seq
    await alice.send_raw("x" * 70_000)
    await alice.expect_close(1009)
    await eventually(lambda: sid in harness.gateway.snapshot().parked, what="parked")
    again = await resume(harness, "u1", sid, seq, "alice-again")
    await again.expect("RESUMED")


@pytest.mark.parametrize("gateway_env", [{"GATEWAY_OUTBOUND_MAX_FRAMES": "16"}])
async def test_a_slow_consumer_close_ends_the_session(harness: GatewayServer) -> None:
    raw: RawClient = await harness.raw_connect()
    hello = await raw.expect("HELLO")
    await raw.send_op("IDENTIFY", {"token": harness.mint("u1")})
    await raw.expect("READY")
    await raw.send_op("SUBSCRIBE_SERVER", {"serverId": "s1"})
    await raw.expect("SUBSCRIBED")
    sid = hello["d"]["sessionId"]
    blob = "y" * 20_000
    for _ in range(3_000):  # it stopped reading: its queue overflows, 4010
        await harness.gateway.publish_to_server("s1", {"op": "BIG", "d": blob})
        await asyncio.sleep(0)
        if sid in harness.gateway.snapshot().closing:
            break
    await eventually(lambda: sid not in harness.gateway.snapshot().connections, what="4010")
    assert sid not in harness.gateway.snapshot().parked
    again = await resume(harness, "u1", sid, 2, "again")
    assert await again.recv_json() == INVALID_SESSION


@pytest.mark.parametrize(
    "d",
    [
        {"token": "t", "sessionId": "x", "seq": True},
        {"token": "t", "sessionId": "x", "seq": -1},
        {"token": "t", "sessionId": "x"},
        {"token": "t", "sessionId": 5, "seq": 0},
        "nope",
    ],
)
async def test_a_malformed_resume_is_invalid_payload(harness: GatewayServer, d: Any) -> None:
    client = await harness.connect()
    await client.send_op("RESUME", d)
    await client.expect_error("INVALID_PAYLOAD", "RESUME")
    await client.identify(harness.mint("u1"))  # still serving, deadline still running
    await client.send_op("RESUME", {"token": harness.mint("u1"), "sessionId": "x", "seq": 0})
    await client.expect_error("ALREADY_AUTHENTICATED", "RESUME")


async def test_a_bad_token_closes_4004_and_leaves_the_parked_session(
    harness: GatewayServer,
) -> None:
    alice, _ = await watched_alice(harness)
    sid, seq = alice.session_id, alice.seq
    await alice.ws.close(code=4100)
    await eventually(lambda: sid in harness.gateway.snapshot().parked, what="parked")
    thief = await harness.connect("thief")
    await thief.send_op("RESUME", {"token": "not-a-jwt", "sessionId": sid, "seq": seq})
    await thief.expect_close(4004)
    other = await resume(harness, "u2", sid, seq, "other-user")
    assert await other.recv_json() == INVALID_SESSION
    future = await resume(harness, "u1", sid, seq + 50, "future")
    assert await future.recv_json() == INVALID_SESSION
    again = await resume(harness, "u1", sid, seq, "alice-again")
    await again.expect("RESUMED")


async def test_resume_metrics(harness: GatewayServer) -> None:
    alice, _ = await watched_alice(harness)
    sid, seq = alice.session_id, alice.seq
    await alice.ws.close(code=4100)
    await eventually(lambda: sid in harness.gateway.snapshot().parked, what="parked")
    assert await harness.metric("gateway_parked_sessions") == 1
    await harness.gateway.publish_to_server("s1", {"op": "MSG", "d": None})
    again = await resume(harness, "u1", sid, seq, "alice-again")
    await again.expect("MSG")
    await again.expect("RESUMED")
    assert await harness.metric('gateway_resumes_total{outcome="resumed"}') == 1
    assert await harness.metric("gateway_replayed_frames_total") == 1
    assert await harness.metric("gateway_parked_sessions") == 0
