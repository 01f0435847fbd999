"""POST /api/publish (PROTOCOL section 8, HTTP), black-box: status codes, what is
delivered, and what an attacker gets (nothing published, a clear JSON error, the key
never in a log line)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import httpx
import pytest

from entrypoints.config import DEV_API_KEY
from tests.blackbox.conftest import WAIT, Client, GatewayServer, StartGateway, assert_quiet

KEY = "test-api-key-" + "a1b2c3d4" * 4
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
async def api(start_gateway: StartGateway) -> GatewayServer:
    return await start_gateway({"GATEWAY_API_KEY": KEY})


async def post(
    server: GatewayServer,
    body: bytes | str | Any,
    headers: dict[str, Any] | None = None,
) -> httpx.Response:
    content = body if isinstance(body, bytes | str) else json.dumps(body)
    async with server.http() as http:
        return await http.post(
            "/api/publish", content=content, headers=AUTH if headers is None else headers
        )


def assert_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    doc = response.json()
    assert set(doc) == {"error"} and isinstance(doc["error"], str) and doc["error"], doc
    return str(doc["error"])


async def subscribed(server: GatewayServer, *user_ids: str) -> list[Client]:
    """Log every user in first, then subscribe them all to s1 (so that no presence
    change of a later login reaches an earlier subscriber)."""
    clients = [await server.login(user_id) for user_id in user_ids]
    for client in clients:
        await client.subscribe("s1")
    return clients


# --- 202 ----------------------------------------------------------------------------


async def test_publish_to_server_reaches_every_subscriber_and_answers_202(
    api: GatewayServer,
) -> None:
    alice, bob = await subscribed(api, "u1", "u2")
    response = await post(api, {"serverId": "s1", "event": {"op": "HELLO_WORLD", "d": {"n": 1}}})
    assert response.status_code == 202 and response.json() == {}, response.text
    await alice.expect_event("HELLO_WORLD", {"n": 1})
    await bob.expect_event("HELLO_WORLD", {"n": 1})


async def test_publish_exclude_and_missing_d(api: GatewayServer) -> None:
    alice, bob = await subscribed(api, "u1", "u2")
    body = {"serverId": "s1", "event": {"op": "PING_ALL"}, "excludeUserId": "u1"}
    assert (await post(api, body)).status_code == 202
    await bob.expect_event("PING_ALL", None)  # no d: delivered with "d": null
    await assert_quiet(alice)


async def test_publish_channel_scoped_reaches_only_readers(api: GatewayServer) -> None:
    bob, carol = await subscribed(api, "u2", "u3")  # c3: mods only
    body = {"serverId": "s1", "channelId": "c3", "event": {"op": "MESSAGE_CREATE", "d": {}}}
    assert (await post(api, body)).status_code == 202
    await bob.expect_event("MESSAGE_CREATE", {})
    await assert_quiet(carol)


async def test_publish_to_user_reaches_every_connection_of_that_user(api: GatewayServer) -> None:
    tab1, tab2 = await api.login("u2"), await api.login("u2")
    other = await api.login("u1")
    response = await post(api, {"userId": "u2", "event": {"op": "NOTIFY", "d": {"x": [1]}}})
    assert response.status_code == 202, response.text
    await tab1.expect_event("NOTIFY", {"x": [1]})
    await tab2.expect_event("NOTIFY", {"x": [1]})
    await assert_quiet(other)


async def test_body_of_exactly_the_limit_is_accepted(api: GatewayServer) -> None:
    (alice,) = await subscribed(api, "u1")
    body = {"serverId": "s1", "event": {"op": "BIG", "d": {"pad": ""}}}
    pad = 65_536 - len(json.dumps(body))
    body["event"]["d"]["pad"] = "x" * pad  # type: ignore[index]
    text = json.dumps(body)
    assert len(text.encode()) == 65_536
    assert (await post(api, text)).status_code == 202
    frame = await alice.expect("BIG")
    assert len(frame["d"]["pad"]) == pad


# --- refusals -----------------------------------------------------------------------


INVALID_BODIES: list[tuple[str, bytes]] = [
    ("not JSON", b"hello"),
    ("empty", b""),
    ("not UTF-8", b'{"serverId": "s1", "event": {"op": "\xff"}}'),
    ("NaN", b'{"serverId": "s1", "event": {"op": "X", "d": NaN}}'),
    ("an array", b"[]"),
    ("a string", b'"s1"'),
    ("no event", b'{"serverId": "s1"}'),
    ("event not an object", b'{"serverId": "s1", "event": "X"}'),
    ("no op", b'{"serverId": "s1", "event": {"d": {}}}'),
    ("op not a string", b'{"serverId": "s1", "event": {"op": 7}}'),
    ("channelId not a string", b'{"serverId": "s1", "channelId": 3, "event": {"op": "X"}}'),
    (
        "excludeUserId not a string",
        b'{"serverId": "s1", "excludeUserId": [], "event": {"op": "X"}}',
    ),
    ("both ids", b'{"serverId": "s1", "userId": "u1", "event": {"op": "X"}}'),
    ("neither id", b'{"event": {"op": "X"}}'),
    ("serverId not a string", b'{"serverId": 1, "event": {"op": "X"}}'),
    ("serverId empty", b'{"serverId": "", "event": {"op": "X"}}'),
    ("userId with channelId", b'{"userId": "u1", "channelId": "c1", "event": {"op": "X"}}'),
    ("deep nesting", b'{"serverId": "s1", "event": {"op": "X", "d": ' + b"[" * 30_000 + b"}}"),
]


@pytest.mark.parametrize(("what", "body"), INVALID_BODIES, ids=[w for w, _ in INVALID_BODIES])
async def test_invalid_body_is_400_with_a_json_error_and_publishes_nothing(
    api: GatewayServer, what: str, body: bytes
) -> None:
    alice, bob = await subscribed(api, "u1", "u2")
    message = assert_error(await post(api, body), 400)
    assert message.startswith("invalid body"), message
    await assert_quiet(alice, bob)
    await alice.heartbeat()  # the gateway still serves


WRONG_AUTH: list[tuple[str, dict[str, Any]]] = [
    ("no header", {}),
    ("wrong key", {"Authorization": "Bearer wrong"}),
    ("key prefix", {"Authorization": f"Bearer {KEY[:-1]}"}),
    ("key plus suffix", {"Authorization": f"Bearer {KEY}x"}),
    ("empty bearer", {"Authorization": "Bearer"}),
    ("basic scheme", {"Authorization": f"Basic {KEY}"}),
    ("bare key", {"Authorization": KEY}),
    ("non-ascii", {"Authorization": "Bearer \u00e9t\u00e9".encode("latin-1")}),
]


@pytest.mark.parametrize(("what", "headers"), WRONG_AUTH, ids=[w for w, _ in WRONG_AUTH])
async def test_without_the_right_key_401_and_nothing_published(
    api: GatewayServer, what: str, headers: dict[str, Any]
) -> None:
    (alice,) = await subscribed(api, "u1")
    response = await post(api, {"serverId": "s1", "event": {"op": "X"}}, headers=headers)
    assert_error(response, 401)
    assert response.headers.get("www-authenticate") == "Bearer"
    await assert_quiet(alice)


async def test_wrong_key_is_refused_before_the_body_is_looked_at(api: GatewayServer) -> None:
    huge = b"x" * 200_000
    assert_error(await post(api, huge, headers={"Authorization": "Bearer nope"}), 401)
    assert_error(await post(api, b"not json", headers={}), 401)


async def test_over_64_kib_with_content_length_is_413(api: GatewayServer) -> None:
    (alice,) = await subscribed(api, "u1")
    body = {"serverId": "s1", "event": {"op": "BIG", "d": "x" * 65_536}}
    assert_error(await post(api, body), 413)
    await assert_quiet(alice)


async def test_over_64_kib_streamed_without_content_length_is_413(api: GatewayServer) -> None:
    """A chunked body is counted as it arrives and refused once over the cap: the 413
    comes while the client has sent 80 KiB of a body it never finishes."""
    reader, writer = await asyncio.open_connection(api.host, api.port)
    try:
        head = (
            f"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n"
        )
        writer.write(head.encode())
        for _ in range(5):
            writer.write(b"4000\r\n" + b"x" * 0x4000 + b"\r\n")  # 16 KiB chunks
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), WAIT)
        assert status_line.startswith(b"HTTP/1.1 413"), status_line
    finally:
        writer.close()


async def test_bad_content_length_is_400(api: GatewayServer) -> None:
    async with api.http() as http:
        request = http.build_request("POST", "/api/publish", content=b"{}", headers=AUTH)
        request.headers["Content-Length"] = "2"
        response = await http.send(request)
    assert response.status_code == 400


async def test_get_is_405(api: GatewayServer) -> None:
    async with api.http() as http:
        response = await http.get("/api/publish", headers=AUTH)
    assert response.status_code == 405


async def test_broker_down_is_503(start_gateway: StartGateway) -> None:
    async def refuse(channel: str, payload: bytes) -> None:
        raise OSError("broker down (test)")

    server = await start_gateway(
        {"GATEWAY_API_KEY": KEY}, customize=lambda gw: setattr(gw.broker, "publish", refuse)
    )
    message = assert_error(await post(server, {"serverId": "s1", "event": {"op": "X"}}), 503)
    assert "broker" in message


async def test_the_key_is_never_logged(
    start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server = await start_gateway({"GATEWAY_API_KEY": KEY})
    await subscribed(server, "u1")
    for headers in (AUTH, {"Authorization": f"Bearer {KEY}x"}, {"Authorization": KEY}):
        await post(server, {"serverId": "s1", "event": {"op": "X"}}, headers=headers)
        await post(server, b"garbage", headers=headers)
    # Server-side records only (the test's own HTTP client logs what it sends).
    server_side = [
        r for r in caplog.records if not r.name.startswith(("httpx", "httpcore", "hpack"))
    ]
    assert server_side, "expected some server log records at DEBUG"
    text = "\n".join(f"{r.getMessage()} {vars(r)}" for r in server_side)
    assert KEY not in text
    assert "Bearer" not in text


# --- off, and development mode ------------------------------------------------------


async def test_without_gateway_api_key_the_endpoint_is_404(harness: GatewayServer) -> None:
    message = assert_error(await post(harness, {"serverId": "s1", "event": {"op": "X"}}), 404)
    assert "GATEWAY_API_KEY" in message
    # Whatever key is tried: there is none to guess.
    response = await post(
        harness,
        {"serverId": "s1", "event": {"op": "X"}},
        headers={"Authorization": f"Bearer {DEV_API_KEY}"},
    )
    assert_error(response, 404)


async def test_development_mode_uses_the_development_key_and_says_so(
    start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.http_api")
    server = await start_gateway({"GATEWAY_JWT_SECRET": ""})  # memory backends, no secret
    assert "DEVELOPMENT key" in caplog.text
    assert DEV_API_KEY not in caplog.text
    (alice,) = await subscribed(server, "u1")
    dev = {"Authorization": f"Bearer {DEV_API_KEY}"}
    assert (
        await post(server, {"serverId": "s1", "event": {"op": "DEV"}}, headers=dev)
    ).status_code == 202
    await alice.expect_event("DEV", None)
    assert_error(await post(server, {"serverId": "s1", "event": {"op": "X"}}, headers={}), 401)


async def test_an_explicit_key_replaces_the_development_key(start_gateway: StartGateway) -> None:
    server = await start_gateway({"GATEWAY_JWT_SECRET": "", "GATEWAY_API_KEY": KEY})
    dev = {"Authorization": f"Bearer {DEV_API_KEY}"}
    assert_error(await post(server, {"serverId": "s1", "event": {"op": "X"}}, headers=dev), 401)
    assert (await post(server, {"serverId": "s1", "event": {"op": "X"}})).status_code == 202
