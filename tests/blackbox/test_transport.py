"""Transport (PROTOCOL section 1 and 7a): the endpoint, no permessage-deflate, and
the incoming message size limit in UTF-8 bytes of the assembled message."""

from __future__ import annotations

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from tests.blackbox.conftest import GatewayServer, eventually

LIMIT = 65536
HEAD = '{"op":"HEARTBEAT","d":"'
TAIL = '"}'


def heartbeat_of_bytes(size: int, char: str = "x") -> str:
    """A HEARTBEAT frame of exactly ``size`` UTF-8 bytes, padded with ``char``."""
    room = size - len(HEAD) - len(TAIL)
    width = len(char.encode())
    count, rest = divmod(room, width)
    text = HEAD + char * count + "y" * rest + TAIL
    assert len(text.encode()) == size
    return text


async def _released(harness: GatewayServer, remaining: int) -> None:
    """The closed connection is gone from the gateway (5.5), others stay."""
    await eventually(lambda: len(harness.gateway.snapshot().connections) == remaining,
                     what=f"{remaining} connection(s) to remain")


async def test_permessage_deflate_is_never_negotiated(harness: GatewayServer) -> None:
    # websockets offers permessage-deflate by default.
    client = await harness.connect()
    assert client.ws.request is not None
    offered = client.ws.request.headers.get("Sec-WebSocket-Extensions")
    assert offered is not None and "permessage-deflate" in offered
    assert client.ws.response is not None
    assert "Sec-WebSocket-Extensions" not in client.ws.response.headers
    await client.identify(harness.mint("u1"))
    await client.heartbeat()


async def test_other_paths_are_not_the_gateway(harness: GatewayServer) -> None:
    async with harness.http() as http:
        response = await http.get("/ws/other")
        # A plain GET of the gateway's own path is not a WebSocket: not served.
        assert (await http.get("/ws/gateway")).status_code == 404
    assert response.status_code == 404
    # The gateway's WebSocket skips Starlette's router (entrypoints.app.GatewayApp);
    # a WebSocket to any other path still goes through it and is refused.
    for path in ("/ws/other", "/ws/gateway/", "/ws/gatewayx", "/"):
        with pytest.raises(InvalidStatus) as refused:
            await ws_connect(f"ws://{harness.host}:{harness.port}{path}", proxy=None)
        assert refused.value.response.status_code == 403, path
    assert harness.gateway.snapshot().connections == frozenset()


async def test_a_message_of_exactly_the_limit_is_accepted(harness: GatewayServer) -> None:
    client = await harness.login("u1")
    await client.send_raw(heartbeat_of_bytes(LIMIT))
    await client.expect("HEARTBEAT_ACK")
    # Also when multibyte characters make up the bytes.
    await client.send_raw(heartbeat_of_bytes(LIMIT, "\u00e9"))
    await client.expect("HEARTBEAT_ACK")
    await client.send_raw(heartbeat_of_bytes(LIMIT, "\U0001f600"))
    await client.expect("HEARTBEAT_ACK")


@pytest.mark.parametrize("identified", [False, True], ids=["before-ready", "after-ready"])
async def test_a_message_over_the_limit_closes_1009(
    harness: GatewayServer, identified: bool
) -> None:
    bystander = await harness.login("u4")  # shares no server with u1: no presence noise
    await bystander.subscribe("s2")
    client = await (harness.login("u1") if identified else harness.connect())
    await client.send_raw(heartbeat_of_bytes(LIMIT + 1))
    assert await client.expect_close(1009) == []
    await _released(harness, 1)
    await harness.gateway.publish_to_server("s2", {"op": "STILL_HERE", "d": None})
    await bystander.expect_event("STILL_HERE", None)


async def test_a_much_larger_message_closes_1009(harness: GatewayServer) -> None:
    # Far over the limit: the message reaches the server in many TCP reads.
    client = await harness.login("u1")
    await client.send_raw(heartbeat_of_bytes(16 * LIMIT))
    await client.expect_close(1009)
    await _released(harness, 0)


async def test_an_oversized_message_followed_by_more_frames_closes_1009(
    harness: GatewayServer,
) -> None:
    # A client does not wait for an answer before sending its next frame.
    client = await harness.login("u1")
    await client.send_raw(heartbeat_of_bytes(LIMIT + 1))
    await client.send_op("HEARTBEAT")
    await client.expect_close(1009)
    await _released(harness, 0)


@pytest.mark.parametrize("char", ["\u00e9", "\u20ac", "\U0001f600"], ids=["2-byte", "3-byte",
                                                                          "4-byte"])
async def test_multibyte_message_over_the_limit_in_bytes_closes_1009(
    harness: GatewayServer, char: str
) -> None:
    client = await harness.login("u1")
    text = heartbeat_of_bytes(LIMIT + len(char.encode()), char)
    assert len(text) <= LIMIT < len(text.encode())
    await client.send_raw(text)
    await client.expect_close(1009)


async def test_binary_message_over_the_limit_closes_1009(harness: GatewayServer) -> None:
    client = await harness.login("u1")
    await client.send_raw(b"x" * (LIMIT + 1))
    await client.expect_close(1009)


async def test_fragmented_message_over_the_limit_closes_1009(harness: GatewayServer) -> None:
    # websockets sends each fragment without FIN and then an empty final one.
    client = await harness.login("u1")
    text = heartbeat_of_bytes(LIMIT + 1)
    fragments = [text[i:i + 20000] for i in range(0, len(text), 20000)]
    assert len(fragments) == 4 and all(len(f) < LIMIT for f in fragments)
    await client.send_raw(fragments)
    await client.expect_close(1009)
    await _released(harness, 0)


async def test_fragmented_multibyte_message_over_the_limit_in_bytes_closes_1009(
    harness: GatewayServer,
) -> None:
    client = await harness.login("u1")
    text = heartbeat_of_bytes(LIMIT + 2, "\u00e9")
    assert len(text) < LIMIT
    await client.send_raw([text[i:i + 10000] for i in range(0, len(text), 10000)])
    await client.expect_close(1009)
    await _released(harness, 0)


@pytest.mark.parametrize("char", ["x", "\u00e9"], ids=["ascii", "multibyte"])
async def test_raw_fragmented_message_over_the_limit_closes_1009(
    harness: GatewayServer, char: str
) -> None:
    raw = await harness.raw_connect()
    await raw.expect("HELLO")
    await raw.send_op("IDENTIFY", {"token": harness.mint("u1")})
    await raw.expect("READY")
    data = heartbeat_of_bytes(LIMIT + 1, char).encode()
    parts = [data[i:i + 10000] for i in range(0, len(data), 10000)]
    for i, part in enumerate(parts):
        await raw.send_frame(0x1 if i == 0 else 0x0, part, fin=i == len(parts) - 1)
    assert await raw.read_close_code() == 1009
    await raw.send_frame(0x8, (1009).to_bytes(2, "big"))  # complete the close handshake
    await _released(harness, 0)


async def test_fragmented_message_of_exactly_the_limit_is_accepted(
    harness: GatewayServer,
) -> None:
    client = await harness.login("u1")
    text = heartbeat_of_bytes(LIMIT)
    await client.send_raw([text[i:i + 7000] for i in range(0, len(text), 7000)])
    await client.expect("HEARTBEAT_ACK")
    multibyte = heartbeat_of_bytes(LIMIT, "\u20ac")
    await client.send_raw([multibyte[i:i + 5000] for i in range(0, len(multibyte), 5000)])
    await client.expect("HEARTBEAT_ACK")
    small = '{"op": "SUBSCRIBE_SERVER", "d": {"serverId": "s1"}}'
    await client.send_raw([small[:10], small[10:30], small[30:]])
    await client.expect_event("SUBSCRIBED", {"serverId": "s1"})


@pytest.mark.parametrize("gateway_env", [{"GATEWAY_MAX_PAYLOAD_BYTES": "1024"}])
async def test_the_limit_is_configurable(harness: GatewayServer) -> None:
    client = await harness.login("u1")
    await client.send_raw(heartbeat_of_bytes(1024))
    await client.expect("HEARTBEAT_ACK")
    await client.send_raw(heartbeat_of_bytes(1024, "\u00e9"))
    await client.expect("HEARTBEAT_ACK")
    await client.send_raw(heartbeat_of_bytes(1025, "\u00e9"))
    await client.expect_close(1009)

