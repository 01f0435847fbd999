"""Connection caps (close 4013, README "Limits") and live fuzzing: malformed frames
of every kind, sent over real connections, leave the process serving everyone."""

from __future__ import annotations

import contextlib
import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed

from tests.blackbox.conftest import Client, Closed, GatewayServer

CAPS = {"GATEWAY_MAX_CONNECTIONS": "3", "GATEWAY_MAX_CONNECTIONS_PER_USER": "2"}


@pytest.mark.parametrize("gateway_env", [CAPS])
async def test_per_user_cap_closes_4013_instead_of_ready(harness: GatewayServer) -> None:
    first = await harness.login("u1")
    await harness.login("u1")
    third = await harness.connect()
    await third.send_op("IDENTIFY", {"token": harness.mint("u1")})
    await third.expect_close(4013)
    # Another user is not affected by u1's cap, and u1's tabs keep working.
    await first.heartbeat()


@pytest.mark.parametrize("gateway_env", [CAPS])
async def test_instance_cap_closes_4013_after_hello(harness: GatewayServer) -> None:
    clients = [await harness.connect() for _ in range(3)]
    over = await harness.connect()  # HELLO is read by connect()
    await over.expect_close(4013)
    await clients[0].heartbeat()
    # A slot freed is a slot available again.
    await clients[1].close()
    await harness.close_clients()


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
_ops = st.sampled_from([
    "IDENTIFY", "HEARTBEAT", "SUBSCRIBE_SERVER", "UNSUBSCRIBE_SERVER", "TYPING_START",
    "PRESENCE_UPDATE", "READY", "HELLO", "identify", "", "ERROR",
])
_frames = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200),
    _json.map(json.dumps),
    st.builds(lambda op, d: json.dumps({"op": op, "d": d}), _ops, _json),
    st.builds(lambda op, d: json.dumps({"op": op, "d": d}), _json, _json),
)


@pytest.mark.parametrize("gateway_env", [{"GATEWAY_RATE_LIMIT_COUNT": "100000"}])
async def test_live_fuzzing_leaves_the_gateway_serving(harness: GatewayServer) -> None:
    watcher = await harness.login("u2")
    await watcher.subscribe("s1")
    rng = random.Random(1234)

    @settings(max_examples=200, deadline=None, database=None,
              suppress_health_check=list(HealthCheck), derandomize=True)
    @given(frames=st.lists(_frames, min_size=1, max_size=5))
    def collect(frames: list[str | bytes]) -> None:
        batches.append(frames)

    batches: list[list[str | bytes]] = []
    collect()
    targets: list[Client] = []
    reopened = 0
    for frames in batches:
        if not targets or rng.random() < 0.05:
            targets.append(await (harness.login("u3") if rng.random() < 0.6
                                  else harness.connect()))
        target = rng.choice(targets)
        try:
            for frame in frames:
                await target.ws.send(frame)
        except ConnectionClosed:
            # Closed with a documented code (an IDENTIFY with a bad token: 4004).
            assert target.ws.close_code in (4003, 4004), target.ws.close_code
            targets.remove(target)
            reopened += 1
    # Every fuzzed connection still open answers; the process and the others serve on.
    for client in targets:
        with contextlib.suppress(ConnectionClosed):
            await client.send_op("HEARTBEAT")
        try:
            while (await client.recv_json())["op"] != "HEARTBEAT_ACK":
                pass
        except Closed as closed:
            assert closed.code in (4003, 4004), closed
    await harness.gateway.publish_to_server("s1", {"op": "STILL_SERVING", "d": 1})
    while (event := await watcher.recv_json())["op"] != "STILL_SERVING":
        pass
    assert event["d"] == 1
    fresh = await harness.login("u1")
    await fresh.heartbeat()


async def test_drain_runs_once_however_often_it_is_asked(harness: GatewayServer) -> None:
    """SIGTERM drains from serve.py and the lifespan drains again on the way out:
    one drain, one RECONNECT per client, one shortening of the presence liveness."""
    import asyncio

    gateway = harness.gateway
    harness.check_leaks = False  # a drain leaves presence to its grace on purpose
    calls: list[int] = []
    keep_alive = gateway.presence.keep_alive

    async def counting_keep_alive(instance_id: str, ttl_ms: int) -> bool:
        calls.append(ttl_ms)
        return await keep_alive(instance_id, ttl_ms)

    gateway.presence.keep_alive = counting_keep_alive  # type: ignore[method-assign]
    client = await harness.login("u1")
    await asyncio.gather(gateway.drain(), gateway.drain())
    await gateway.drain()  # after the fact: returns at once
    frames = await client.expect_close(1001)
    assert [f["op"] for f in frames] == ["RECONNECT"]
    assert calls == [gateway.settings.presence_grace_ms]
