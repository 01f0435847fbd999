"""PROTOCOL 15 over real WebSockets: a handshake queued for admission.

The gateway admits ``GATEWAY_IDENTIFY_CONCURRENCY`` handshakes at a time; here 1, and
alice's directory read is held open by the test, so bob's IDENTIFY queues behind it
for as long as the test likes. Our reading of section 15 (the safer one, README): a
HEARTBEAT sent while queued is ACKed at once (a client library that misses its ACKs
takes the connection for a zombie and reconnects, feeding the storm); every other
frame sent meanwhile is answered after READY, in the order sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from adapters.shell import Gateway
from domain.effects import StartTyping
from domain.model import User, UserId
from tests.blackbox.conftest import WAIT, Client, GatewayServer, StartGateway, eventually

ONE_AT_A_TIME = {"GATEWAY_IDENTIFY_CONCURRENCY": "1", "GATEWAY_RATE_LIMIT_COUNT": "20"}


def _hold(user: str, gate: asyncio.Event) -> Callable[[Gateway], None]:
    """Make ``user``'s directory read wait for ``gate`` (the slot stays taken)."""

    def customize(gateway: Gateway) -> None:
        directory = gateway.directory
        real: Callable[[UserId], Awaitable[User | None]] = directory.get_user

        async def get_user(user_id: UserId) -> User | None:
            if user_id == user:
                await gate.wait()
            return await real(user_id)

        directory.get_user = get_user  # type: ignore[method-assign]

    return customize


async def _queued_behind_alice(server: GatewayServer) -> tuple[Client, Client]:
    alice = await server.connect("alice")
    await alice.send_op("IDENTIFY", {"token": server.mint("u1")})
    queue = server.gateway.queue
    await eventually(lambda: queue.admitted == 1, what="alice admitted")
    bob = await server.connect("bob")
    await bob.send_op("IDENTIFY", {"token": server.mint("u2")})
    await eventually(lambda: queue.waiting == 1, what="bob queued")
    return alice, bob


async def test_heartbeats_are_acked_while_queued_the_rest_after_ready_in_order(
    start_gateway: StartGateway,
) -> None:
    gate = asyncio.Event()
    server = await start_gateway(ONE_AT_A_TIME, customize=_hold("u1", gate))
    alice, bob = await _queued_behind_alice(server)
    await bob.send_op("SUBSCRIBE_SERVER", {"serverId": "s1"})
    await bob.send_op("HEARTBEAT")
    await bob.send_op("TYPING_START", {"channelId": "c1"})
    await bob.send_op("HEARTBEAT", {})
    # Both ACKs now, bob still queued (nothing else answered yet), however long it waits.
    assert (await bob.expect("HEARTBEAT_ACK"))["d"] is None
    assert (await bob.expect("HEARTBEAT_ACK"))["d"] is None
    await bob.assert_no_frame(0.5)
    assert server.gateway.queue.waiting == 1
    await bob.heartbeat()  # and again, still queued
    gate.set()
    assert (await alice.expect("READY"))["s"] == 1
    # Then READY and the held frames' answers, in the order they were sent.
    ready = await bob.expect("READY")
    assert ready["s"] == 1
    await bob.expect_event("SUBSCRIBED", {"serverId": "s1"})
    await bob.heartbeat()
    await bob.assert_no_frame()


async def test_a_heartbeat_flood_while_queued_is_rate_limited_at_once(
    start_gateway: StartGateway,
) -> None:
    """ACKing while queued must not open a hole: the HEARTBEATs count against the rate
    limit as they arrive, so a flood of them is closed 4008 while still queued."""
    gate = asyncio.Event()
    server = await start_gateway(ONE_AT_A_TIME, customize=_hold("u1", gate))
    alice, bob = await _queued_behind_alice(server)
    for _ in range(25):
        await bob.send_op("HEARTBEAT")
    frames = await bob.expect_close(4008, within=WAIT)
    # 20 allowed in the window: the IDENTIFY and 19 HEARTBEATs, each ACKed.
    assert [f["op"] for f in frames] == ["HEARTBEAT_ACK"] * 19
    await eventually(lambda: server.gateway.queue.waiting == 0, what="bob left the queue")
    gate.set()
    await alice.expect("READY")
    await alice.heartbeat()


async def test_a_client_that_leaves_after_acks_while_queued_leaves_nothing(
    start_gateway: StartGateway,
) -> None:
    gate = asyncio.Event()
    server = await start_gateway(ONE_AT_A_TIME, customize=_hold("u1", gate))
    alice, bob = await _queued_behind_alice(server)
    await bob.heartbeat()
    await bob.send_op("SUBSCRIBE_SERVER", {"serverId": "s1"})
    await bob.close()
    queue = server.gateway.queue
    await eventually(lambda: queue.waiting == 0, what="bob left the queue")
    gate.set()
    await alice.expect("READY")
    await eventually(lambda: len(server.gateway.snapshot().connections) == 1, what="bob gone")
    assert "u2" not in server.gateway.snapshot().users
    assert queue.admitted == 0 and queue.waiting == 0


def _hold_typing(gate: asyncio.Event) -> Callable[[Gateway], None]:
    """Make every typing claim wait for ``gate`` (its backend slot stays taken)."""

    def customize(gateway: Gateway) -> None:
        typing = gateway.handlers.table[StartTyping].__self__  # type: ignore[attr-defined]
        real = typing._gate.claim

        async def claim(key: str, ttl_ms: int) -> bool:
            await gate.wait()
            return bool(await real(key, ttl_ms))

        typing._gate.claim = claim

    return customize


async def test_backend_slots_are_configured(start_gateway: StartGateway) -> None:
    default = await start_gateway()
    assert default.gateway.backend_slots.concurrency == 48
    three = await start_gateway({"GATEWAY_BACKEND_CONCURRENCY": "3"})
    assert three.gateway.backend_slots.concurrency == 3


async def test_an_operation_waiting_for_a_backend_slot_holds_its_frames_in_the_socket(
    start_gateway: StartGateway,
) -> None:
    """One backend slot (GATEWAY_BACKEND_CONCURRENCY=1), taken by alice's TYPING_START
    until the test lets it go: bob's PRESENCE_UPDATE waits for the slot, and bob's
    HEARTBEAT behind it is not read meanwhile (no ACK); then both are answered, in
    order, and nothing is refused or closed."""
    gate = asyncio.Event()
    server = await start_gateway(
        {"GATEWAY_BACKEND_CONCURRENCY": "1"}, customize=_hold_typing(gate)
    )
    slots = server.gateway.backend_slots
    alice = await server.login("u1")
    bob = await server.login("u2")
    watcher = await server.login("u3")
    await watcher.subscribe("s1")
    await alice.send_op("TYPING_START", {"channelId": "c1"})
    await eventually(lambda: slots.admitted == 1, what="alice holds the slot")
    await bob.send_op("PRESENCE_UPDATE", {"status": "dnd"})
    await bob.send_op("HEARTBEAT")
    await eventually(lambda: slots.waiting == 1, what="bob waits for the slot")
    await bob.assert_no_frame(0.5)
    gate.set()
    await bob.expect("HEARTBEAT_ACK")
    typing = await watcher.expect("TYPING_START")
    assert typing["d"]["userId"] == "u1"
    dnd = {"userId": "u2", "serverId": "s1", "status": "dnd"}
    await watcher.expect_event("PRESENCE_UPDATE", dnd)
    assert slots.admitted == 0 and slots.waiting == 0
    await alice.heartbeat()
