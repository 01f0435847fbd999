"""The client library (entrypoints.client) against the real gateway served by
Hypercorn: events, typed ops, a restart (reconnect, RESUME refused by today's gateway,
fresh IDENTIFY, subscriptions and status restored), and 4004."""

from __future__ import annotations

import asyncio
import socket
import time
from contextlib import AbstractAsyncContextManager
from typing import TypeVar

import pytest

from adapters.jwt import JwtIssuer
from entrypoints.client import (
    AuthenticationFailed,
    Backoff,
    ClientEvent,
    Connected,
    Disconnected,
    Dispatch,
    GatewayClient,
    ServerError,
    SessionLost,
    connect,
)
from tests.blackbox.conftest import TEST_SECRET, WAIT, GatewayServer, serve_gateway

FAST = Backoff(base=0.02, cap=0.2)
E = TypeVar("E")


def mint(user_id: str) -> str:
    return JwtIssuer(key=TEST_SECRET, algorithm="HS256").issue(user_id, now=time.time(), ttl=600)


async def next_event(client: GatewayClient) -> ClientEvent:
    return await asyncio.wait_for(client.__anext__(), WAIT)


async def next_of(client: GatewayClient, kind: type[E]) -> E:
    while True:
        event = await next_event(client)
        if isinstance(event, kind):
            return event


async def dispatch(client: GatewayClient, op: str) -> Dispatch:
    """The next dispatch with this op (other events skipped)."""
    while True:
        event = await next_of(client, Dispatch)
        if event.op == op:
            return event


async def test_two_clients_see_typing_presence_and_published_events(
    harness: GatewayServer,
) -> None:
    async with (
        connect(harness.ws_url, mint("u1"), subscribe=["s1"]) as alice,
        connect(harness.ws_url, mint("u2")) as bob,
    ):
        await dispatch(alice, "SUBSCRIBED")
        ready = await next_of(bob, Connected)
        assert ready.user is not None and ready.user["username"] == "bob"
        await bob.subscribe("s1")
        await dispatch(bob, "SUBSCRIBED")
        await bob.typing_start("c1")
        typing = await dispatch(alice, "TYPING_START")
        assert typing.d["userId"] == "u2" and typing.d["channelId"] == "c1"
        await bob.set_status("dnd")
        presence = await dispatch(alice, "PRESENCE_UPDATE")
        assert presence.d == {"userId": "u2", "serverId": "s1", "status": "dnd"}
        await harness.gateway.publish_to_server("s1", {"op": "HELLO_WORLD", "d": {}})
        assert (await dispatch(alice, "HELLO_WORLD")).d == {}
        assert (await dispatch(bob, "HELLO_WORLD")).d == {}
        await bob.typing_start("c404")
        error = await next_of(bob, ServerError)
        assert (error.code, error.op) == ("NOT_FOUND", "TYPING_START")
        await bob.unsubscribe("s1")
        await dispatch(bob, "UNSUBSCRIBED")
        assert bob.subscriptions == frozenset()
        assert alice.seq >= 5 and alice.connected


async def test_a_subscription_the_gateway_refuses_is_not_kept(harness: GatewayServer) -> None:
    async with connect(harness.ws_url, mint("u1"), subscribe=["s1", "s2"]) as alice:
        # alice is not a member of s2: FORBIDDEN, and the client forgets it.
        await dispatch(alice, "SUBSCRIBED")
        error = await next_of(alice, ServerError)
        assert (error.code, error.op) == ("FORBIDDEN", "SUBSCRIBE_SERVER")
        assert alice.subscriptions == {"s1"}


async def test_a_bad_token_stops_the_client_with_authentication_failed(
    harness: GatewayServer,
) -> None:
    expired = JwtIssuer(key=TEST_SECRET, algorithm="HS256").issue("u1", now=time.time(), ttl=-60)
    async with connect(harness.ws_url, expired, backoff=FAST) as client:
        with pytest.raises(AuthenticationFailed, match="4004"):
            async for _ in client:
                pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_the_client_survives_a_gateway_restart() -> None:
    """Drain and stop a gateway, start a new one on the same port: the client gets
    RECONNECT and 1001, retries with backoff while nothing listens, tries RESUME (today's
    gateway answers ERROR op RESUME), identifies on that same connection, and restores
    its subscription and its dnd status; then events flow again."""
    port = free_port()
    first_block: AbstractAsyncContextManager[GatewayServer] | None = serve_gateway(port=port)
    assert first_block is not None
    first = await first_block.__aenter__()
    try:
        alice_listens = asyncio.Event()
        calls = 0

        async def token() -> str:
            """bob's token provider: after the restart, bob identifies only once alice
            listens (so that she must see him come back)."""
            nonlocal calls
            calls += 1
            if calls > 1:
                await alice_listens.wait()
            return mint("u2")

        async with connect(first.ws_url, token, subscribe=["s1"], backoff=FAST) as bob:
            await dispatch(bob, "SUBSCRIBED")
            await bob.set_status("dnd")
            await dispatch(bob, "PRESENCE_UPDATE")
            first.check_leaks = False  # bob is not one of the harness's own clients
            block, first_block = first_block, None
            await block.__aexit__(None, None, None)  # drain: RECONNECT, 1001
            gone = await next_of(bob, Disconnected)
            assert gone.code == 1001 and gone.reconnect_in is not None
            async with serve_gateway(port=port) as second:
                alice = await second.login("u1")
                await alice.subscribe("s1")
                alice_listens.set()
                lost = await next_of(bob, SessionLost)
                assert "INVALID_SESSION" in lost.reason  # a new instance: unknown session (13)
                back = await next_of(bob, Connected)
                assert not back.resumed and back.url == second.ws_url
                assert (await dispatch(bob, "SUBSCRIBED")).d == {"serverId": "s1"}
                # alice sees bob come back online, then his dnd restored.
                await alice.expect_event(
                    "PRESENCE_UPDATE", {"userId": "u2", "serverId": "s1", "status": "online"}
                )
                await alice.expect_event(
                    "PRESENCE_UPDATE", {"userId": "u2", "serverId": "s1", "status": "dnd"}
                )
                await second.gateway.publish_to_server("s1", {"op": "AFTER", "d": {"n": 1}})
                assert (await dispatch(bob, "AFTER")).d == {"n": 1}
                await alice.expect_event("AFTER", {"n": 1})
                await bob.aclose()
    finally:
        if first_block is not None:
            await first_block.__aexit__(None, None, None)


async def test_leaving_the_block_closes_with_1000_as_the_gateway_records(
    harness: GatewayServer,
) -> None:
    async with connect(harness.ws_url, mint("u1")) as client:
        await next_of(client, Connected)
    sample = 'gateway_closes_total{code="1000",side="client"}'
    for _ in range(500):  # bounded wait for the server to record the close
        if await harness.metric(sample) == 1.0:
            break
        await asyncio.sleep(0.01)
    assert await harness.metric(sample) == 1.0
