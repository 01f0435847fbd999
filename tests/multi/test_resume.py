"""RESUME across instances on a real Redis (PROTOCOL 13): the handoff and its seam."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.multi.conftest import LiveClient, RedisProbe, StartCluster, World, eventually

pytestmark = pytest.mark.redis


async def resume(instance: Any, token: str, sid: str, seq: int, name: str) -> LiveClient:
    client: LiveClient = await instance.connect(name)
    client.checker.seq = seq  # its frames continue the session's s (checked gapless)
    await client.send_op("RESUME", {"token": token, "sessionId": sid, "seq": seq})
    return client


async def until_resumed(client: LiveClient) -> list[dict[str, Any]]:
    frames = []
    while (frame := await client.recv_json())["op"] != "RESUMED":
        frames.append(frame)
    return frames


async def test_resume_on_the_other_instance_while_events_flow(
    start_cluster: StartCluster, world: World, probe: RedisProbe
) -> None:
    a, b = await start_cluster(2)
    watcher = await b.login(world.u2, "B/u2")
    await watcher.subscribe(world.s1)
    alice = await a.login(world.u1, "A/u1")
    await alice.subscribe(world.s1)
    await watcher.expect("PRESENCE_UPDATE")
    sid = alice.session_id
    n = 60

    async def publish() -> None:  # plain Redis PUBLISH and both instances' API
        for i in range(n):
            if i % 3 == 0:
                await probe.publish_server(world.s1, {"op": "MSG", "d": {"i": i}})
            else:
                await (a if i % 3 == 1 else b).gateway.publish_to_server(
                    world.s1, {"op": "MSG", "d": {"i": i}}
                )
            await asyncio.sleep(0.005)

    publisher = asyncio.create_task(publish())
    seen = [(await alice.expect("MSG"))["d"]["i"] for _ in range(5)]
    alice.ws.transport.abort()  # TCP loss: parked on A
    await eventually(lambda: sid in a.gateway.snapshot().parked, what="parked on A")
    again = await resume(b, a.mint(world.u1), sid, alice.seq, "B/u1")
    seen += [f["d"]["i"] for f in await until_resumed(again)]
    await publisher
    while len(seen) < n:
        seen.append((await again.expect("MSG"))["d"]["i"])
    assert sorted(seen) == list(range(n))  # none lost, none twice (s checked gapless)
    await again.assert_no_frame()
    assert sid not in a.gateway.snapshot().parked
    assert world.u1 not in a.gateway.snapshot().users
    # The watcher saw every event and no presence change.
    got = [(await watcher.recv_json())["op"] for _ in range(n)]
    assert got == ["MSG"] * n
    assert await probe.presence(world.u1) == "online"


@pytest.mark.parametrize("env", [{"GATEWAY_DRAIN_TIMEOUT_MS": "8000"}])
async def test_a_drain_under_load_hands_every_session_over(
    start_cluster: StartCluster, world: World, probe: RedisProbe, env: dict[str, str]
) -> None:
    a, b = await start_cluster(2, env)
    watcher = await b.login(world.u2, "B/watcher")
    await watcher.subscribe(world.s1)
    users = [world.u1, world.u3]
    clients = [await a.login(users[i % 2], f"A/{i}") for i in range(10)]
    for client in clients:
        await client.subscribe(world.s1)
    for _ in clients[:2]:  # u1 and u3 online (once each, the other tabs change nothing)
        await watcher.expect("PRESENCE_UPDATE")
    n = 200
    received: dict[int, list[int]] = {i: [] for i in range(len(clients))}

    async def publish() -> None:
        for i in range(n):
            await probe.publish_server(world.s1, {"op": "MSG", "d": {"i": i}})
            await asyncio.sleep(0.005)  # ~200 events/s

    async def follow(i: int, client: LiveClient) -> None:
        sid = client.session_id
        while True:
            frame = await client.recv_json()
            if frame["op"] == "RECONNECT":
                break
            received[i].append(frame["d"]["i"])
        await client.expect_close(1001)
        again = await resume(b, b.mint(users[i % 2]), sid, client.seq, f"B/{i}")
        received[i] += [f["d"]["i"] for f in await until_resumed(again)]
        while len(received[i]) < n:
            received[i].append((await again.expect("MSG"))["d"]["i"])

    publisher = asyncio.create_task(publish())
    await asyncio.sleep(0.3)
    followers = [asyncio.create_task(follow(i, c)) for i, c in enumerate(clients)]
    drained = asyncio.create_task(a.gateway.drain())
    await asyncio.wait_for(asyncio.gather(publisher, *followers), 20)
    await asyncio.wait_for(drained, 10)  # it ends once nothing is parked on it
    for i in range(len(clients)):
        assert received[i] == list(range(n)), f"client {i}"
    got = [(await watcher.recv_json())["op"] for _ in range(n)]
    assert got == ["MSG"] * n  # no presence flap for anyone
    assert a.gateway.snapshot().parked == frozenset()


async def test_a_resume_on_the_other_instance_keeps_the_presence_interest(
    start_cluster: StartCluster, world: World
) -> None:
    """PROTOCOL 13 with 14 on a real Redis: alice asked for bob's presence in a large
    server on A, lost TCP and resumed on B. Without a new SUBSCRIBE_PRESENCE she gets
    bob's changes on B (the one made while she was parked replayed), never carol's."""
    a, b = await start_cluster(2, env={"GATEWAY_LARGE_SERVER_MEMBERS": "2"})
    bob = await b.login(world.u2, "B/bob")
    carol = await b.login(world.u3, "B/carol")
    alice = await a.login(world.u1, "A/alice")
    for client in (bob, carol, alice):
        await client.subscribe(world.s1)
    await alice.send_op("SUBSCRIBE_PRESENCE", {"serverId": world.s1, "userIds": [world.u2]})
    await alice.expect("PRESENCE_SNAPSHOT")
    sid = alice.session_id
    alice.ws.transport.abort()  # TCP loss: parked on A, with its interest
    await eventually(lambda: sid in a.gateway.snapshot().parked, what="parked on A")
    for client in (bob, carol):  # each sees its own change (14), nobody else's
        await client.send_op("PRESENCE_UPDATE", {"status": "dnd"})
        await client.expect("PRESENCE_UPDATE")
    again = await resume(b, a.mint(world.u1), sid, alice.seq, "B/alice")
    replay = await until_resumed(again)
    seen = [(f["d"]["userId"], f["d"]["status"]) for f in replay if f["op"] == "PRESENCE_UPDATE"]
    assert seen == [(world.u2, "dnd")]
    assert a.gateway.interest.size() == (0, 0) and b.gateway.interest.size() == (1, 1)
    for client in (carol, bob):
        await client.send_op("PRESENCE_UPDATE", {"status": "idle"})
        await client.expect("PRESENCE_UPDATE")
    frame = await again.expect("PRESENCE_UPDATE")
    assert frame["d"] == {"userId": world.u2, "serverId": world.s1, "status": "idle"}
    await again.assert_no_frame()
