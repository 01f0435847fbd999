"""Every ERROR row of PROTOCOL section 6 (and the 7a rules about them). After each
ERROR the same connection must keep serving (a HEARTBEAT round trip, and usually a
real op), and other connections must not notice."""

from __future__ import annotations

from typing import Any

import pytest

from tests.blackbox.conftest import Client, GatewayServer

READY_OPS = ("SUBSCRIBE_SERVER", "UNSUBSCRIBE_SERVER", "TYPING_START", "PRESENCE_UPDATE")
VALID_D = {
    "SUBSCRIBE_SERVER": {"serverId": "s1"},
    "UNSUBSCRIBE_SERVER": {"serverId": "s1"},
    "TYPING_START": {"channelId": "c1"},
    "PRESENCE_UPDATE": {"status": "dnd"},
}


async def _still_serves(client: Client) -> None:
    await client.heartbeat()


# --- DECODE_ERROR -----------------------------------------------------------------

NOT_OBJECTS = ["not json", "{", '{"op": "HEARTBEAT"', "", "   ", "[1, 2]", "[]", "42",
               '"HEARTBEAT"', "null", "true", "{'op': 'HEARTBEAT'}", "\U0001f600"]


@pytest.mark.parametrize("identified", [False, True], ids=["before-ready", "after-ready"])
async def test_text_that_is_not_a_json_object_is_decode_error(
    harness: GatewayServer, identified: bool
) -> None:
    client = await (harness.login("u1") if identified else harness.connect())
    for raw in NOT_OBJECTS:
        await client.send_raw(raw)
        await client.expect_error("DECODE_ERROR", None)
        await _still_serves(client)
    if not identified:
        await client.identify(harness.mint("u1"))
    await client.subscribe("s1")


@pytest.mark.parametrize("identified", [False, True], ids=["before-ready", "after-ready"])
async def test_binary_frame_is_decode_error(harness: GatewayServer, identified: bool) -> None:
    client = await (harness.login("u1") if identified else harness.connect())
    for raw in (b'{"op": "HEARTBEAT", "d": null}', b"", b"\x00\xff"):
        await client.send_raw(raw)
        await client.expect_error("DECODE_ERROR", None)
        await _still_serves(client)


# --- UNKNOWN_OP -------------------------------------------------------------------

UNKNOWN_OPS: list[tuple[dict[str, Any], str | None]] = [
    ({"d": None}, None),
    ({}, None),
    ({"op": None, "d": None}, None),
    ({"op": 5, "d": None}, None),
    ({"op": 1.5, "d": None}, None),
    ({"op": True, "d": None}, None),
    ({"op": ["HEARTBEAT"], "d": None}, None),
    ({"op": {"name": "HEARTBEAT"}, "d": None}, None),
    ({"op": "READY", "d": {}}, "READY"),
    ({"op": "HELLO", "d": None}, "HELLO"),
    ({"op": "HEARTBEAT_ACK", "d": None}, "HEARTBEAT_ACK"),
    ({"op": "SUBSCRIBED", "d": {"serverId": "s1"}}, "SUBSCRIBED"),
    ({"op": "UNSUBSCRIBED", "d": {"serverId": "s1"}}, "UNSUBSCRIBED"),
    ({"op": "ERROR", "d": None}, "ERROR"),
    ({"op": "RECONNECT", "d": None}, "RECONNECT"),
    ({"op": "identify", "d": {"token": "x"}}, "identify"),
    ({"op": "heartbeat", "d": None}, "heartbeat"),
    ({"op": "Subscribe_Server", "d": {"serverId": "s1"}}, "Subscribe_Server"),
    ({"op": " HEARTBEAT", "d": None}, " HEARTBEAT"),
    ({"op": "", "d": None}, ""),
    ({"op": "MESSAGE_CREATE", "d": {"content": "hi"}}, "MESSAGE_CREATE"),
]


@pytest.mark.parametrize("identified", [False, True], ids=["before-ready", "after-ready"])
async def test_missing_non_string_or_non_client_op_is_unknown_op(
    harness: GatewayServer, identified: bool
) -> None:
    client = await (harness.login("u1") if identified else harness.connect())
    for frame, op in UNKNOWN_OPS:
        await client.send_json(frame)
        await client.expect_error("UNKNOWN_OP", op)
        await _still_serves(client)
    if not identified:
        # A lowercase 'identify' did not identify; the real one still works.
        await client.identify(harness.mint("u1"))
    await client.subscribe("s1")


# --- INVALID_PAYLOAD --------------------------------------------------------------

INVALID_PAYLOADS: list[tuple[str, Any]] = [
    ("SUBSCRIBE_SERVER", None),
    ("SUBSCRIBE_SERVER", {}),
    ("SUBSCRIBE_SERVER", {"serverId": 1}),
    ("SUBSCRIBE_SERVER", {"serverId": None}),
    ("SUBSCRIBE_SERVER", {"serverId": ["s1"]}),
    ("SUBSCRIBE_SERVER", {"server_id": "s1"}),
    ("SUBSCRIBE_SERVER", "s1"),
    ("SUBSCRIBE_SERVER", ["s1"]),
    ("UNSUBSCRIBE_SERVER", None),
    ("UNSUBSCRIBE_SERVER", {"serverId": 2}),
    ("UNSUBSCRIBE_SERVER", 7),
    ("TYPING_START", None),
    ("TYPING_START", {}),
    ("TYPING_START", {"channelId": 3}),
    ("TYPING_START", {"channelId": {"id": "c1"}}),
    ("PRESENCE_UPDATE", None),
    ("PRESENCE_UPDATE", {}),
    ("PRESENCE_UPDATE", {"status": 1}),
    ("PRESENCE_UPDATE", {"status": None}),
    ("PRESENCE_UPDATE", {"status": "offline"}),
    ("PRESENCE_UPDATE", {"status": "away"}),
    ("PRESENCE_UPDATE", {"status": "ONLINE"}),
    ("PRESENCE_UPDATE", {"status": "online "}),
    ("PRESENCE_UPDATE", {"status": ""}),
    ("PRESENCE_UPDATE", "online"),
]


async def test_bad_d_after_ready_is_invalid_payload(harness: GatewayServer) -> None:
    alice = await harness.login("u1")
    watcher = await harness.login("u2")
    await watcher.subscribe("s1")
    for op, d in INVALID_PAYLOADS:
        await alice.send_op(op, d)
        await alice.expect_error("INVALID_PAYLOAD", op)
        await _still_serves(alice)
    await alice.send_json({"op": "SUBSCRIBE_SERVER"})  # no "d" at all
    await alice.expect_error("INVALID_PAYLOAD", "SUBSCRIBE_SERVER")
    # None of the refused status updates (offline included) changed alice's presence.
    await watcher.assert_no_frame()
    assert alice.seq == 1
    await alice.subscribe("s1")


IDENTIFY_BAD_D: list[Any] = [None, {}, {"token": 5}, {"token": None}, {"token": ["t"]},
                             {"jwt": "x"}, "token", [], 0]


async def test_identify_with_bad_d_is_invalid_payload_and_the_connection_stays(
    harness: GatewayServer,
) -> None:
    client = await harness.connect()
    for d in IDENTIFY_BAD_D:
        await client.send_op("IDENTIFY", d)
        await client.expect_error("INVALID_PAYLOAD", "IDENTIFY")
        await _still_serves(client)
    await client.send_json({"op": "IDENTIFY"})
    await client.expect_error("INVALID_PAYLOAD", "IDENTIFY")
    ready = await client.identify(harness.mint("u1"))
    assert ready["s"] == 1


@pytest.mark.parametrize("gateway_env", [{"GATEWAY_IDENTIFY_TIMEOUT_MS": "500"}])
async def test_identify_with_bad_d_does_not_stop_the_identify_deadline(
    harness: GatewayServer,
) -> None:
    client = await harness.connect()
    await client.send_op("IDENTIFY", {"token": 5})
    await client.expect_error("INVALID_PAYLOAD", "IDENTIFY")
    assert await client.expect_close(4003) == []


# --- NOT_AUTHENTICATED ------------------------------------------------------------


async def test_ops_that_need_ready_are_not_authenticated_before_ready(
    harness: GatewayServer,
) -> None:
    watcher = await harness.login("u2")
    await watcher.subscribe("s1")
    client = await harness.connect()
    for op in READY_OPS:
        await client.send_op(op, VALID_D[op])
        await client.expect_error("NOT_AUTHENTICATED", op)
        await _still_serves(client)
    # Malformed ones: refused either way, and never processed.
    for op in READY_OPS:
        await client.send_op(op, None)
        error = await client.expect("ERROR")
        assert error["d"]["code"] in ("NOT_AUTHENTICATED", "INVALID_PAYLOAD"), error
        assert error["d"]["op"] == op
    # Nothing happened: no dispatch consumed a sequence number, no typing or presence
    # reached the watcher, and the connection identifies normally.
    await watcher.assert_no_frame()
    ready = await client.identify(harness.mint("u1"))
    assert ready["s"] == 1


# --- ALREADY_AUTHENTICATED --------------------------------------------------------


async def test_any_second_identify_is_already_authenticated(harness: GatewayServer) -> None:
    alice = await harness.login("u1")
    second: list[dict[str, Any]] = [
        {"op": "IDENTIFY", "d": {"token": harness.mint("u1")}},
        {"op": "IDENTIFY", "d": {"token": harness.mint("u2")}},
        {"op": "IDENTIFY", "d": {"token": "garbage"}},
        {"op": "IDENTIFY", "d": {"token": harness.mint("u1", ttl=-60)}},
        {"op": "IDENTIFY", "d": None},
        {"op": "IDENTIFY", "d": {}},
        {"op": "IDENTIFY", "d": {"token": 5}},
        {"op": "IDENTIFY", "d": "x"},
        {"op": "IDENTIFY"},
    ]
    for frame in second:
        await alice.send_json(frame)
        await alice.expect_error("ALREADY_AUTHENTICATED", "IDENTIFY")
        await _still_serves(alice)
    # Still alice (bob's token did not switch the session): s1 yes, s2 (bob's) no.
    await alice.subscribe("s1")
    await alice.send_op("SUBSCRIBE_SERVER", {"serverId": "s2"})
    await alice.expect_error("FORBIDDEN", "SUBSCRIBE_SERVER")
    assert alice.seq == 2  # READY, SUBSCRIBED: no second READY


async def test_pipelined_second_identify_is_already_authenticated(
    harness: GatewayServer,
) -> None:
    client = await harness.connect()
    await client.send_op("IDENTIFY", {"token": harness.mint("u1")})
    await client.send_op("IDENTIFY", {"token": harness.mint("u1")})
    await client.expect("READY")
    await client.expect_error("ALREADY_AUTHENTICATED", "IDENTIFY")
    await _still_serves(client)


# --- FORBIDDEN and NOT_FOUND ------------------------------------------------------


async def test_subscribe_to_a_server_of_which_one_is_not_a_member_is_forbidden(
    harness: GatewayServer,
) -> None:
    dave = await harness.login("u4")
    await dave.send_op("SUBSCRIBE_SERVER", {"serverId": "s1"})
    await dave.expect_error("FORBIDDEN", "SUBSCRIBE_SERVER")
    await _still_serves(dave)
    await dave.subscribe("s2")
    await harness.gateway.publish_to_server("s1", {"op": "SECRET", "d": {}})
    await harness.gateway.publish_to_server("s2", {"op": "PUBLIC", "d": {}})
    await dave.expect_event("PUBLIC", {})
    await dave.assert_no_frame()


async def test_typing_without_read_permission_is_forbidden(harness: GatewayServer) -> None:
    carol = await harness.login("u3")
    await carol.send_op("TYPING_START", {"channelId": "c3"})
    await carol.expect_error("FORBIDDEN", "TYPING_START")
    await _still_serves(carol)


async def test_typing_in_a_channel_of_a_server_one_is_not_in_is_forbidden(
    harness: GatewayServer,
) -> None:
    dave = await harness.login("u4")
    for channel in ("c1", "c3"):
        await dave.send_op("TYPING_START", {"channelId": channel})
        await dave.expect_error("FORBIDDEN", "TYPING_START")
        await _still_serves(dave)


async def test_unknown_server_or_channel_is_not_found(harness: GatewayServer) -> None:
    alice = await harness.login("u1")
    await alice.send_op("SUBSCRIBE_SERVER", {"serverId": "s-nope"})
    await alice.expect_error("NOT_FOUND", "SUBSCRIBE_SERVER")
    await _still_serves(alice)
    await alice.send_op("TYPING_START", {"channelId": "c-nope"})
    await alice.expect_error("NOT_FOUND", "TYPING_START")
    await _still_serves(alice)
    await alice.subscribe("s1")


# --- TOO_MANY_SUBSCRIPTIONS -------------------------------------------------------


@pytest.mark.parametrize("gateway_env", [{"GATEWAY_MAX_SUBSCRIPTIONS": "1"}])
async def test_subscriptions_over_the_cap_are_refused_and_repeats_do_not_count(
    harness: GatewayServer,
) -> None:
    carol = await harness.login("u3")
    await carol.subscribe("s1")
    await carol.subscribe("s1")  # a repeat never counts toward the cap
    await carol.send_op("SUBSCRIBE_SERVER", {"serverId": "s2"})
    await carol.expect_error("TOO_MANY_SUBSCRIPTIONS", "SUBSCRIBE_SERVER")
    await _still_serves(carol)
    await harness.gateway.publish_to_server("s2", {"op": "NOT_FOR_YOU", "d": {}})
    await harness.gateway.publish_to_server("s1", {"op": "FOR_YOU", "d": {}})
    await carol.expect_event("FOR_YOU", {})
    await carol.unsubscribe("s1")
    await carol.subscribe("s2")
    await harness.gateway.publish_to_server("s1", {"op": "NOT_FOR_YOU", "d": {}})
    await harness.gateway.publish_to_server("s2", {"op": "FOR_YOU", "d": {}})
    await carol.expect_event("FOR_YOU", {})
    await carol.assert_no_frame()


# --- errors are local to the frame --------------------------------------------------


async def test_a_stream_of_bad_frames_disturbs_nobody(harness: GatewayServer) -> None:
    alice = await harness.login("u1")
    bob = await harness.login("u2")
    await alice.subscribe("s1")
    await bob.subscribe("s1")
    bad: list[str | bytes] = ["nope", b"\x01", '{"op": 1}', '{"op": "READY"}',
                              '{"op": "SUBSCRIBE_SERVER", "d": 1}',
                              '{"op": "IDENTIFY", "d": {"token": "x"}}',
                              '{"op": "SUBSCRIBE_SERVER", "d": {"serverId": "s-nope"}}',
                              '{"op": "TYPING_START", "d": {"channelId": "c-nope"}}']
    for raw in bad:
        await alice.send_raw(raw)
    for _ in bad:
        await alice.expect("ERROR")
    await harness.gateway.publish_to_server("s1", {"op": "AFTER", "d": {"n": 1}})
    await alice.expect_event("AFTER", {"n": 1})
    await bob.expect_event("AFTER", {"n": 1})
    await bob.assert_no_frame()


async def test_lone_surrogates_in_client_frames_do_not_break_the_connection(
    harness: GatewayServer,
) -> None:
    alice = await harness.login("u1")
    await alice.send_raw('{"op": "\\ud800", "d": null}')
    await alice.expect_error("UNKNOWN_OP", "\ud800")
    await alice.send_raw('{"op": "SUBSCRIBE_SERVER", "d": {"serverId": "\\udfff"}}')
    await alice.expect_error("NOT_FOUND", "SUBSCRIBE_SERVER")
    await alice.send_raw('{"op": "UNSUBSCRIBE_SERVER", "d": {"serverId": "\\ud800x"}}')
    await alice.expect_event("UNSUBSCRIBED", {"serverId": "\ud800x"})
    await alice.send_raw('{"op": "TYPING_START", "d": {"channelId": "\\ud800"}}')
    await alice.expect_error("NOT_FOUND", "TYPING_START")
    await _still_serves(alice)
