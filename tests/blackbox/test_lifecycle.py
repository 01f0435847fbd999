"""Lifecycle and timers (PROTOCOL sections 2, 4, 5, 7a): HELLO, IDENTIFY/READY, tokens,
heartbeats, the identify and heartbeat deadlines, shutdown and cleanup on close."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from domain.model import Status
from tests.blackbox.conftest import (
    TEST_SECRET,
    WAIT,
    Closed,
    GatewayServer,
    StartGateway,
    eventually,
)

USER_FIELDS = {"id", "username", "displayName", "avatarUrl", "status"}
SERVER_FIELDS = {"id", "name", "ownerId", "iconUrl"}
S1 = {"id": "s1", "name": "Home", "ownerId": "u1", "iconUrl": None}
S2 = {"id": "s2", "name": "Gaming", "ownerId": "u2", "iconUrl": None}


def _servers(ready: dict[str, Any]) -> list[dict[str, Any]]:
    servers = ready["d"]["servers"]
    assert isinstance(servers, list)
    for server in servers:
        assert set(server) >= SERVER_FIELDS, server
    return [{k: s[k] for k in SERVER_FIELDS} for s in servers]


# --- HELLO ------------------------------------------------------------------------


async def test_hello_is_sent_at_once_with_a_fresh_uuid4_session(harness: GatewayServer) -> None:
    first = await harness.connect()  # connect() reads HELLO without sending anything
    second = await harness.connect()
    for client in (first, second):
        assert client.hello["op"] == "HELLO"
        d = client.hello["d"]
        assert set(d) == {"heartbeatInterval", "sessionId"}
        assert d["heartbeatInterval"] == 30000
        parsed = uuid.UUID(d["sessionId"])
        assert parsed.version == 4
        assert str(parsed) == d["sessionId"]
    assert first.session_id != second.session_id


@pytest.mark.parametrize("gateway_env", [{"GATEWAY_HEARTBEAT_INTERVAL_MS": "12345"}])
async def test_hello_advertises_the_configured_heartbeat_interval(
    harness: GatewayServer,
) -> None:
    client = await harness.connect()
    assert client.hello["d"]["heartbeatInterval"] == 12345


# --- READY ------------------------------------------------------------------------


async def test_ready_carries_session_user_and_servers(harness: GatewayServer) -> None:
    alice = await harness.connect()
    ready = await alice.identify(harness.mint("u1"))
    assert ready["s"] == 1
    assert set(ready["d"]) >= {"sessionId", "user", "servers"}
    assert ready["d"]["sessionId"] == alice.session_id
    assert ready["d"]["user"] == {
        "id": "u1", "username": "alice", "displayName": "Alice", "avatarUrl": None,
        "status": "online",
    }
    assert _servers(ready) == [S1]

    bob = await harness.login("u2")
    assert set(bob.ready["d"]["user"]) == USER_FIELDS
    assert bob.ready["d"]["user"]["username"] == "bob"
    assert sorted(_servers(bob.ready), key=lambda s: s["id"]) == [S1, S2]

    dave = await harness.login("u4")
    assert _servers(dave.ready) == [S2]


async def test_sequence_is_gapless_and_control_frames_have_no_s(harness: GatewayServer) -> None:
    # The harness checks every frame: dispatches s = previous + 1 from READY's 1,
    # control frames (HELLO, HEARTBEAT_ACK, ERROR) with no "s" key at all.
    alice = await harness.login("u1")
    assert "s" not in alice.hello
    await alice.heartbeat()
    await alice.subscribe("s1")  # s=2
    await alice.send_raw("not json")
    error = await alice.expect_error("DECODE_ERROR", None)
    assert "s" not in error
    await alice.heartbeat()
    for i in range(5):
        await harness.gateway.publish_to_server("s1", {"op": "EVENT", "d": {"i": i}})
    for i in range(5):
        frame = await alice.expect_event("EVENT", {"i": i})
        assert frame["s"] == 3 + i
    await alice.unsubscribe("s1")
    await alice.heartbeat()
    await harness.gateway.publish_to_user("u1", {"op": "DIRECT", "d": None})
    frame = await alice.expect_event("DIRECT", None)
    assert frame["s"] == 9
    assert alice.seq == 9


async def test_unknown_extra_fields_in_client_frames_are_ignored(harness: GatewayServer) -> None:
    client = await harness.connect()
    await client.send_json({"op": "IDENTIFY", "d": {"token": harness.mint("u1"), "extra": 1},
                            "s": 42, "t": "x"})
    await client.expect("READY")
    await client.send_json({"op": "SUBSCRIBE_SERVER", "d": {"serverId": "s1", "x": [1]},
                            "nonce": "n"})
    await client.expect_event("SUBSCRIBED", {"serverId": "s1"})
    await client.send_json({"op": "HEARTBEAT", "d": None, "extra": {"a": 1}})
    await client.expect("HEARTBEAT_ACK")


# --- tokens (4004) ----------------------------------------------------------------


def _b64(data: dict[str, Any]) -> str:
    raw = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": "u1", "iat": now, "exp": now + 3600}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _rsa_private_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _bad_token(kind: str) -> str:
    now = int(time.time())
    if kind == "bad-signature":
        return jwt.encode(_claims(), "some-other-secret-0123456789abcdef", algorithm="HS256")
    if kind == "tampered-payload":
        header, _, signature = jwt.encode(_claims(), TEST_SECRET, algorithm="HS256").split(".")
        return f"{header}.{_b64(_claims(sub='u2'))}.{signature}"
    if kind == "expired":
        return jwt.encode(_claims(iat=now - 7200, exp=now - 60), TEST_SECRET, algorithm="HS256")
    if kind == "alg-none":
        return f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(_claims())}."
    if kind == "alg-None-with-signature":
        good = jwt.encode(_claims(), TEST_SECRET, algorithm="HS256").split(".")[2]
        return f"{_b64({'alg': 'None', 'typ': 'JWT'})}.{_b64(_claims())}.{good}"
    if kind == "wrong-algorithm-hs512":
        return jwt.encode(_claims(), TEST_SECRET, algorithm="HS512")
    if kind == "wrong-algorithm-rs256":
        return jwt.encode(_claims(), _rsa_private_pem(), algorithm="RS256")
    if kind == "missing-sub":
        return jwt.encode(_claims(sub=None), TEST_SECRET, algorithm="HS256")
    if kind == "empty-sub":
        return jwt.encode(_claims(sub=""), TEST_SECRET, algorithm="HS256")
    if kind == "missing-exp":
        return jwt.encode(_claims(exp=None), TEST_SECRET, algorithm="HS256")
    if kind == "unknown-user":
        return jwt.encode(_claims(sub="u999"), TEST_SECRET, algorithm="HS256")
    if kind == "garbage":
        return "this-is-not-a-jwt"
    if kind == "empty":
        return ""
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "bad-signature", "tampered-payload", "expired", "alg-none", "alg-None-with-signature",
        "wrong-algorithm-hs512", "wrong-algorithm-rs256", "missing-sub", "empty-sub",
        "missing-exp", "unknown-user", "garbage", "empty",
    ],
)
async def test_refused_token_closes_4004(harness: GatewayServer, kind: str) -> None:
    client = await harness.connect()
    await client.send_op("IDENTIFY", {"token": _bad_token(kind)})
    frames = await client.expect_close(4004)
    assert frames == [], f"no READY (or anything) before 4004: {frames}"
    # Nothing of the refused session remains routed.
    await eventually(lambda: not harness.gateway.snapshot().connections,
                     what="the refused connection to go")
    assert harness.gateway.snapshot().users == {}


async def test_a_refused_token_does_not_disturb_other_connections(harness: GatewayServer) -> None:
    alice = await harness.login("u1")
    await alice.subscribe("s1")
    intruder = await harness.connect()
    await intruder.send_op("IDENTIFY", {"token": _bad_token("bad-signature")})
    await intruder.expect_close(4004)
    await harness.gateway.publish_to_server("s1", {"op": "STILL_HERE", "d": {}})
    await alice.expect_event("STILL_HERE", {})


# --- heartbeats -------------------------------------------------------------------


@pytest.mark.parametrize(
    "d", [None, {}, {"seq": 3}, 0, 17, "text", [1, 2], True, {"nested": {"a": [None]}}]
)
async def test_heartbeat_is_acked_before_and_after_ready_whatever_its_d(
    harness: GatewayServer, d: Any
) -> None:
    client = await harness.connect()
    await client.heartbeat(d)
    await client.identify(harness.mint("u1"))
    await client.heartbeat(d)
    await client.heartbeat(d)


async def test_heartbeat_without_d_is_acked(harness: GatewayServer) -> None:
    client = await harness.connect()
    await client.send_json({"op": "HEARTBEAT"})
    await client.expect("HEARTBEAT_ACK")


async def test_one_ack_per_heartbeat(harness: GatewayServer) -> None:
    client = await harness.login("u1")
    for _ in range(5):
        await client.send_op("HEARTBEAT")
    for _ in range(5):
        await client.expect("HEARTBEAT_ACK")
    await client.assert_no_frame()


# --- identify deadline (4003) -----------------------------------------------------

IDENTIFY_FAST = {"GATEWAY_IDENTIFY_TIMEOUT_MS": "300"}


@pytest.mark.parametrize("gateway_env", [IDENTIFY_FAST])
async def test_no_identify_in_time_closes_4003(harness: GatewayServer) -> None:
    started = time.monotonic()
    client = await harness.connect()
    frames = await client.expect_close(4003)
    assert frames == []
    assert time.monotonic() - started >= 0.3


@pytest.mark.parametrize("gateway_env", [IDENTIFY_FAST])
async def test_heartbeats_do_not_extend_the_identify_deadline(harness: GatewayServer) -> None:
    started = time.monotonic()
    client = await harness.connect()
    with pytest.raises(Closed) as closed:
        while time.monotonic() - started < WAIT:
            await client.send_op("HEARTBEAT")
            await client.expect("HEARTBEAT_ACK")
            await asyncio.sleep(0.05)
    assert closed.value.code == 4003
    assert time.monotonic() - started >= 0.3


@pytest.mark.parametrize("gateway_env", [{"GATEWAY_IDENTIFY_TIMEOUT_MS": "600"}])
async def test_identified_in_time_is_never_closed_by_the_identify_deadline(
    harness: GatewayServer,
) -> None:
    client = await harness.login("u1")
    await asyncio.sleep(0.8)
    await client.assert_no_frame()
    await client.heartbeat()


# --- heartbeat timeout (4009) -----------------------------------------------------

HEARTBEAT_FAST = {"GATEWAY_HEARTBEAT_TIMEOUT_MS": "800", "GATEWAY_HEARTBEAT_SWEEP_MS": "100"}


@pytest.mark.parametrize("gateway_env", [HEARTBEAT_FAST])
async def test_silent_connection_is_closed_4009(harness: GatewayServer) -> None:
    started = time.monotonic()
    ready = await harness.login("u1")
    unidentified = await harness.connect()
    await ready.expect_close(4009)
    await unidentified.expect_close(4009)
    assert time.monotonic() - started >= 0.8


@pytest.mark.parametrize("gateway_env", [HEARTBEAT_FAST])
async def test_heartbeating_connection_survives_and_times_out_after_its_last_heartbeat(
    harness: GatewayServer,
) -> None:
    keeper = await harness.login("u1")
    silent = await harness.login("u2")
    started = time.monotonic()
    while time.monotonic() - started < 1.6:  # two heartbeat timeouts
        await keeper.heartbeat()
        await asyncio.sleep(0.1)
    await silent.expect_close(4009, within=0.1)  # long gone by now
    last = time.monotonic()
    await keeper.heartbeat()
    await keeper.expect_close(4009)
    assert time.monotonic() - last >= 0.8, "closed before a full timeout since the last heartbeat"


# --- close codes from the server side ---------------------------------------------


async def test_backend_failure_during_identify_closes_4000(harness: GatewayServer) -> None:
    alice = await harness.login("u1")
    harness.directory.failing = True
    try:
        client = await harness.connect()
        await client.send_op("IDENTIFY", {"token": harness.mint("u2")})
        frames = await client.expect_close(4000)
        assert frames == []
    finally:
        harness.directory.failing = False
    await alice.heartbeat()
    assert (await harness.login("u2")).ready["d"]["user"]["id"] == "u2"


async def test_shutdown_sends_reconnect_then_closes_1001(start_gateway: StartGateway) -> None:
    server = await start_gateway()
    # Sessions of a draining instance are kept in the presence registry for a grace
    # period on purpose (users reconnect elsewhere): no leak check of presence here.
    server.check_leaks = False
    alice = await server.login("u1")
    await alice.subscribe("s1")
    fresh = await server.connect()
    stopping = asyncio.create_task(server.stop())
    for client in (alice, fresh):
        frames = await client.expect_close(1001)
        assert frames == [{"op": "RECONNECT", "d": None}], frames
    await asyncio.wait_for(stopping, WAIT * 3)
    assert not server.gateway.snapshot().connections


# --- cleanup on close (5.5) -------------------------------------------------------


async def test_closing_clients_leaves_nothing_behind(harness: GatewayServer) -> None:
    gateway = harness.gateway
    alice = await harness.login("u1")
    bob1 = await harness.login("u2")
    bob2 = await harness.login("u2")
    carol = await harness.login("u3")
    pending = await harness.connect()
    await alice.subscribe("s1")
    await bob1.subscribe("s1")
    await bob1.subscribe("s2")
    await bob2.subscribe("s2")
    await carol.subscribe("s1")
    await carol.subscribe("s1")
    await bob2.send_op("PRESENCE_UPDATE", {"status": "dnd"})
    await bob1.expect_event("PRESENCE_UPDATE", {"userId": "u2", "serverId": "s1",
                                                "status": "dnd"})
    assert set(gateway.snapshot().servers) == {"s1", "s2"}
    assert set(gateway.snapshot().users) == {"u1", "u2", "u3"}
    assert len(gateway.snapshot().connections) == 5

    for client in (alice, bob1, bob2, carol, pending):
        await client.close()
    await eventually(lambda: not gateway.snapshot().connections, what="every connection to end")
    assert gateway.snapshot().servers == {}
    assert gateway.snapshot().users == {}
    assert gateway.snapshot().interest == {}
    # Only the instance's RESUME handoff channels (section 13) stay subscribed.
    assert {c for c in harness.broker.subscribed_channels if not c.startswith("gw:")} == set()
    assert harness.presence.live_sessions() == {}
    for user_id in ("u1", "u2", "u3"):
        assert await harness.presence.get_status(user_id) is Status.OFFLINE
        assert harness.directory.statuses[user_id] is Status.OFFLINE


@pytest.mark.parametrize(
    "gateway_env",
    [{"GATEWAY_RESUME_TTL_MS": "0"}, {"GATEWAY_RESUME_TTL_MS": "800"}],
    ids=["resume-off", "parked-until-ttl"],
)
async def test_a_dropped_tcp_connection_is_cleaned_up_like_a_close(
    harness: GatewayServer, gateway_env: dict[str, str]
) -> None:
    alice = await harness.login("u1", "alice")
    raw = await harness.raw_connect()
    await raw.expect("HELLO")
    await raw.send_op("IDENTIFY", {"token": harness.mint("u2")})
    await raw.expect("READY")
    await alice.subscribe("s1")
    await raw.send_op("SUBSCRIBE_SERVER", {"serverId": "s1"})
    await raw.expect("SUBSCRIBED")
    raw.close()  # no close frame: the socket just goes away
    if gateway_env["GATEWAY_RESUME_TTL_MS"] != "0":
        # Section 13: parked, the user stays online (no broadcast) until the TTL ends.
        await eventually(lambda: len(harness.gateway.snapshot().parked) == 1, what="parked")
        await alice.assert_no_frame(0.4)
        assert set(harness.gateway.snapshot().users) == {"u1", "u2"}
    await alice.expect_event("PRESENCE_UPDATE", {"userId": "u2", "serverId": "s1",
                                                 "status": "offline"})
    await eventually(lambda: len(harness.gateway.snapshot().connections) == 1,
                     what="the dropped one")
    assert set(harness.gateway.snapshot().users) == {"u1"}
    snapshot = harness.gateway.snapshot()
    assert snapshot.servers == {"s1": snapshot.connections}
