"""Rate limit (4008) and slow consumers (4010): PROTOCOL sections 6 and 7a.

Timing rule of these tests: the client and the gateway share one event loop clock,
and a frame is stamped by the gateway after the client sent it and before the client
reads its answer. So "wait until <answer time> + WINDOW" is a safe lower bound for a
frame to have left the window, and the sliding-window test leaves half a window of
slack on the other side.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.blackbox.conftest import Client, Closed, GatewayServer, eventually


def _now() -> float:
    return asyncio.get_running_loop().time()


async def _sleep_until(deadline: float) -> None:
    await asyncio.sleep(max(0.0, deadline - _now()))


async def _heartbeats(client: Client, n: int) -> float:
    """Send n HEARTBEATs at once; return the time the last ACK was read."""
    for _ in range(n):
        await client.send_op("HEARTBEAT")
    for _ in range(n):
        await client.expect("HEARTBEAT_ACK")
    return _now()


BURST = {"GATEWAY_RATE_LIMIT_COUNT": "10", "GATEWAY_RATE_LIMIT_WINDOW_MS": "2000"}


@pytest.mark.parametrize("gateway_env", [BURST])
async def test_the_frame_after_count_frames_in_the_window_closes_4008(
    harness: GatewayServer,
) -> None:
    bystander = await harness.login("u4")
    await bystander.subscribe("s2")
    client = await harness.connect()
    # IDENTIFY counts (1), then 9 HEARTBEATs (10): all answered.
    await client.send_op("IDENTIFY", {"token": harness.mint("u1")})
    for _ in range(9):
        await client.send_op("HEARTBEAT")
    # HEARTBEATs read while the IDENTIFY is in flight are ACKed at once (PROTOCOL 15):
    # READY may come before, between or after the ACKs.
    ops = sorted([(await client.recv_json())["op"] for _ in range(10)])
    assert ops == ["HEARTBEAT_ACK"] * 9 + ["READY"]
    await client.send_op("HEARTBEAT")  # the 11th
    assert await client.expect_close(4008) == []
    assert await harness.metric("gateway_rate_limited_total") == 1
    await harness.gateway.publish_to_server("s2", {"op": "STILL_HERE", "d": None})
    await bystander.expect_event("STILL_HERE", None)


@pytest.mark.parametrize("gateway_env", [BURST])
async def test_every_client_frame_counts_bad_ones_included(harness: GatewayServer) -> None:
    client = await harness.login("u1")  # IDENTIFY: 1
    await client.send_raw("not json")  # 2
    await client.send_raw(b"\x00")  # 3
    await client.send_json({"op": "NOPE"})  # 4
    await client.send_op("SUBSCRIBE_SERVER", {"serverId": "s-nope"})  # 5
    await client.send_op("SUBSCRIBE_SERVER", None)  # 6
    await client.send_op("TYPING_START", {"channelId": "c1"})  # 7
    await client.send_op("PRESENCE_UPDATE", {"status": "idle"})  # 8
    await client.send_op("UNSUBSCRIBE_SERVER", {"serverId": "s1"})  # 9
    await client.send_op("IDENTIFY", {"token": "x"})  # 10
    await client.send_op("HEARTBEAT")  # 11: over
    frames = await client.expect_close(4008)
    assert [f["op"] for f in frames] == ["ERROR"] * 5 + ["UNSUBSCRIBED", "ERROR"], frames


@pytest.mark.parametrize("gateway_env", [BURST])
async def test_the_window_slides(harness: GatewayServer) -> None:
    # A fixed bucket or a refilling token bucket would let the last frame through.
    window = 2.0
    client = await harness.connect()
    await client.send_op("IDENTIFY", {"token": harness.mint("u1")})
    await client.expect("READY")
    first_batch_done = await _heartbeats(client, 4)  # frames 1-5 by here
    await _sleep_until(first_batch_done + window / 2)
    await _heartbeats(client, 5)  # frames 6-10, half a window later
    # The first five have left the window; the next five have not.
    await _sleep_until(first_batch_done + window + 0.15)
    await _heartbeats(client, 5)  # 10 frames in the last window: fine
    await client.send_op("HEARTBEAT")  # 11 frames within one window
    assert await client.expect_close(4008) == []


@pytest.mark.parametrize(
    "gateway_env", [{"GATEWAY_RATE_LIMIT_COUNT": "10", "GATEWAY_RATE_LIMIT_WINDOW_MS": "500"}]
)
async def test_a_client_within_the_limit_is_never_closed(harness: GatewayServer) -> None:
    window = 0.5
    client = await harness.connect()
    await client.send_op("IDENTIFY", {"token": harness.mint("u1")})
    await client.expect("READY")
    done = await _heartbeats(client, 9)
    for _ in range(3):
        # COUNT frames, then wait until all of them left the window.
        await _sleep_until(done + window + 0.05)
        done = await _heartbeats(client, 10)
    await _sleep_until(done + window + 0.05)
    await client.subscribe("s1")
    await client.assert_no_frame()


# --- slow consumers ---------------------------------------------------------------------


@pytest.mark.parametrize("gateway_env", [{"GATEWAY_OUTBOUND_MAX_BYTES": "65536"}])
async def test_a_consumer_that_stops_reading_is_closed_4010_and_others_keep_up(
    harness: GatewayServer,
) -> None:
    reader = await harness.login("u2", "reader")
    stalled = await harness.raw_connect()
    await stalled.expect("HELLO")
    await stalled.send_op("IDENTIFY", {"token": harness.mint("u3")})
    await stalled.expect("READY")
    await reader.subscribe("s1")
    await stalled.send_op("SUBSCRIBE_SERVER", {"serverId": "s1"})
    await stalled.expect("SUBSCRIBED")
    (stalled_id,) = harness.gateway.snapshot().users["u3"]
    # From here on the raw client reads nothing: its kernel buffers fill, then the
    # gateway's outbound queue for it grows past 64 KiB.

    pad = "x" * 16_000
    sent = 0
    slow_closed = False
    for i in range(3_000):  # ~48 MB at most; it takes a few MB in practice
        await harness.gateway.publish_to_server("s1", {"op": "BULK", "d": {"i": i, "pad": pad}})
        sent += 1
        frame = await reader.recv_json()
        while frame["op"] == "PRESENCE_UPDATE":  # carol going offline once closed
            assert frame["d"] == {"userId": "u3", "serverId": "s1", "status": "offline"}
            frame = await reader.recv_json()
        assert frame["op"] == "BULK" and frame["d"]["i"] == i, frame["op"]
        if stalled_id in harness.gateway.snapshot().closing:  # the gateway decided to close it
            slow_closed = True
            break
    assert slow_closed, f"the stalled client was not closed after {sent} events"

    # The reader keeps receiving everything, in order, with no gap (checked by s).
    for i in range(sent, sent + 20):
        await harness.gateway.publish_to_server("s1", {"op": "BULK", "d": {"i": i}})
    for i in range(sent, sent + 20):
        frame = await reader.recv_json()
        if frame["op"] == "PRESENCE_UPDATE":
            frame = await reader.recv_json()
        assert frame == {"op": "BULK", "d": {"i": i}, "s": frame["s"]}

    assert await harness.metric("gateway_slow_consumers_total") == 1
    # Whatever was already in flight, the stalled client finally reads a 4010 close.
    with pytest.raises(Closed) as closed:
        while True:
            await stalled.recv_json(within=10)
    assert closed.value.code == 4010
    await eventually(lambda: len(harness.gateway.snapshot().connections) == 1,
                     what="the stalled close")
    assert await harness.metric('gateway_closes_total{code="4010",side="server"}') == 1
