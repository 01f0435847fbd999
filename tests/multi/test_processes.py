"""Gateway instances as separate ``gateway serve`` processes sharing one real Redis.

Configured through the environment only (PROTOCOL section 12): GATEWAY_REDIS_URL,
GATEWAY_JWT_SECRET, GATEWAY_FIXTURES (a per-test fixture with unique ids) and, for
the crash test, a short heartbeat timeout so that a dead instance is detected within
seconds (by design within 1.5 heartbeat timeouts; PROTOCOL section 7 allows 2).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest

from domain import keys
from tests.multi.conftest import (
    GatewayProcess,
    LiveClient,
    RedisProbe,
    RedisTarget,
    World,
    quiet,
    spawn_gateway,
)

pytestmark = pytest.mark.redis

HEARTBEAT_TIMEOUT_MS = 1500
HEARTBEAT_EVERY = 0.4  # seconds, well inside the timeout


def presence_update(user_id: str, server_id: str, status: str) -> dict[str, str]:
    return {"userId": user_id, "serverId": server_id, "status": status}


def base_env(redis: RedisTarget, world: World, tmp_path: Path) -> dict[str, str]:
    return {**redis.env, "GATEWAY_FIXTURES": world.write(tmp_path)}


@asynccontextmanager
async def two_processes(
    env: Mapping[str, str], tmp_path: Path
) -> AsyncIterator[tuple[GatewayProcess, GatewayProcess]]:
    """Two ``gateway serve`` processes, started in parallel."""
    async with AsyncExitStack() as stack:
        p1 = await stack.enter_async_context(spawn_gateway("P1", env, tmp_path, wait_ready=False))
        p2 = await stack.enter_async_context(spawn_gateway("P2", env, tmp_path, wait_ready=False))
        await asyncio.gather(p1.wait_ready(), p2.wait_ready())
        yield p1, p2


async def expect_all(clients: list[LiveClient], op: str, d: object) -> None:
    await asyncio.gather(*(c.expect_event(op, d) for c in clients))


async def test_two_processes_behave_like_one_gateway(
    redis_target: RedisTarget, world: World, probe: RedisProbe, tmp_path: Path
) -> None:
    async with two_processes(base_env(redis_target, world, tmp_path), tmp_path) as (p1, p2):
        watcher_1 = await p1.login(world.u3)  # s1 and s2, no access to c3
        watcher_2 = await p2.login(world.u2)  # s1 and s2, mod: reads c3
        watchers = [watcher_1, watcher_2]
        for w in watchers:
            await w.subscribe(world.s1)

        # Presence: online once, across processes; a second tab changes nothing.
        u1_on_2 = await p2.login(world.u1)
        await expect_all(watchers, "PRESENCE_UPDATE", presence_update(world.u1, world.s1, "online"))
        u1_on_1 = await p1.login(world.u1, "P1/u1 second tab")
        assert u1_on_1.ready["d"]["user"]["status"] == "online"
        await quiet(*watchers)
        u1_tabs = [u1_on_1, u1_on_2]
        for tab in u1_tabs:
            await tab.subscribe(world.s1)
        everyone = [*watchers, *u1_tabs]
        server_channel = keys.server_channel(world.s1)
        assert await probe.numsub(server_channel) == 2  # one subscriber per process

        # Events published by another service reach every subscriber once.
        assert await probe.publish_server(world.s1, {"op": "MESSAGE_CREATE", "d": {"n": 1}}) == 2
        await expect_all(everyone, "MESSAGE_CREATE", {"n": 1})
        # Channel-scoped: c3 is mods-only (u1 owns s1, u2 is a mod, u3 is neither).
        await probe.publish_server(world.s1, {"op": "MESSAGE_CREATE", "d": {"n": 2}},
                                   channel_id=world.c3)
        await probe.publish_server(world.s1, {"op": "MESSAGE_CREATE", "d": {"n": 3}},
                                   exclude_user_id=world.u1)
        await expect_all([watcher_2, *u1_tabs], "MESSAGE_CREATE", {"n": 2})
        await expect_all(watchers, "MESSAGE_CREATE", {"n": 3})
        # A user's events reach every tab of that user, in both processes.
        assert await probe.publish_user(world.u1, {"op": "NOTIFICATION", "d": {"n": 4}}) == 2
        await expect_all(u1_tabs, "NOTIFICATION", {"n": 4})
        await quiet(*everyone)

        # Typing in P2 is heard in P1; a repeat from P1 inside the TTL is silent.
        await u1_on_2.send_op("TYPING_START", {"channelId": world.c1})
        for reader in watchers:
            frame = await reader.expect("TYPING_START")
            assert (frame["d"]["userId"], frame["d"]["channelId"]) == (world.u1, world.c1)
        await u1_on_1.send_op("TYPING_START", {"channelId": world.c1})
        await u1_on_1.heartbeat()
        await quiet(*everyone)

        # SERVER_MEMBER_REMOVE for u3, published once: u3's connection in P1 gets the
        # event then UNSUBSCRIBED, and nothing more from s1.
        remove = {"op": "SERVER_MEMBER_REMOVE", "d": {"userId": world.u3}}
        await probe.publish_server(world.s1, remove)
        await watcher_1.expect_event("SERVER_MEMBER_REMOVE", remove["d"])
        await watcher_1.expect_event("UNSUBSCRIBED", {"serverId": world.s1})
        await expect_all([watcher_2, *u1_tabs], "SERVER_MEMBER_REMOVE", remove["d"])
        await probe.publish_server(world.s1, {"op": "MESSAGE_CREATE", "d": {"n": 5}})
        await expect_all([watcher_2, *u1_tabs], "MESSAGE_CREATE", {"n": 5})

        # Closing one of the two tabs (in different processes): nothing; the last: offline.
        await u1_on_2.close()
        await probe.wait_session_count(world.u1, 1)
        await quiet(watcher_2)
        await u1_on_1.close()
        await watcher_2.expect_event(
            "PRESENCE_UPDATE", presence_update(world.u1, world.s1, "offline")
        )
        await probe.wait_presence(world.u1, None)
        await quiet(*watchers)
        for p in (p1, p2):
            await p.close_clients()
        await probe.assert_no_presence(world)


async def test_killed_process_users_go_offline_on_the_survivor(
    redis_target: RedisTarget, world: World, probe: RedisProbe, tmp_path: Path
) -> None:
    env = {
        **base_env(redis_target, world, tmp_path),
        "GATEWAY_HEARTBEAT_TIMEOUT_MS": str(HEARTBEAT_TIMEOUT_MS),
        "GATEWAY_HEARTBEAT_SWEEP_MS": "500",
    }
    try:
        async with two_processes(env, tmp_path) as (doomed, survivor):
            watcher = await survivor.login(world.u3, heartbeat_every=HEARTBEAT_EVERY)
            await watcher.subscribe(world.s1)
            await watcher.subscribe(world.s2)

            only_doomed = await doomed.login(world.u1, heartbeat_every=HEARTBEAT_EVERY)  # s1
            await watcher.expect_event(
                "PRESENCE_UPDATE", presence_update(world.u1, world.s1, "online")
            )
            also_doomed = await doomed.login(world.u4, heartbeat_every=HEARTBEAT_EVERY)  # s2
            await watcher.expect_event(
                "PRESENCE_UPDATE", presence_update(world.u4, world.s2, "online")
            )
            # u2 has a tab on each process: it must stay online.
            await doomed.login(world.u2, heartbeat_every=HEARTBEAT_EVERY)
            frames = await watcher.events(2)
            assert sorted(f["d"]["serverId"] for f in frames) == sorted([world.s1, world.s2])
            u2_survivor = await survivor.login(world.u2, "P2/u2", heartbeat_every=HEARTBEAT_EVERY)
            await quiet(watcher)
            assert len(await probe.sessions(world.u2)) == 2

            doomed.signal(signal.SIGKILL)
            killed_at = time.monotonic()
            await doomed.wait_exit()
            frames = await watcher.events(2, within=10)
            detected = time.monotonic() - killed_at
            assert sorted((f["d"]["userId"], f["d"]["serverId"], f["d"]["status"])
                          for f in frames) == sorted([(world.u1, world.s1, "offline"),
                                                      (world.u4, world.s2, "offline")]), frames
            print(f"\nSIGKILL -> offline broadcast on the survivor after {detected:.2f}s "
                  f"(heartbeat timeout {HEARTBEAT_TIMEOUT_MS / 1000}s)")
            # PROTOCOL 7: within 2 heartbeat timeouts (the design reaps within 1.5);
            # the slack absorbs a loaded machine's scheduling delays.
            assert detected <= 2 * HEARTBEAT_TIMEOUT_MS / 1000 + 1.5, detected
            await probe.wait_presence(world.u1, None)
            await probe.wait_presence(world.u4, None)
            assert await probe.sessions(world.u1) == {}

            # u2 kept a tab on the survivor: still online, no broadcast, still served.
            await quiet(watcher, within=1.0)
            assert await probe.presence(world.u2) == "online"
            assert len(await probe.sessions(world.u2)) == 1
            assert await probe.publish_user(world.u2, {"op": "NOTIFICATION", "d": None}) == 1
            await u2_survivor.expect_event("NOTIFICATION", None)
            for client in (only_doomed, also_doomed):
                client.stop_heartbeats()

            # Its last tab closes: offline (once per shared server).
            await u2_survivor.close()
            frames = await watcher.events(2)
            assert {f["d"]["status"] for f in frames} == {"offline"}
            await survivor.close_clients()
            await probe.assert_no_presence(world)
    finally:
        await probe.forget(world)


async def test_workers_share_one_port_and_drain_on_sigterm(
    redis_target: RedisTarget, world: World, probe: RedisProbe, tmp_path: Path
) -> None:
    env = base_env(redis_target, world, tmp_path)
    try:
        async with spawn_gateway("W", env, tmp_path, workers=2) as gw:
            # /readyz answered: one worker serves. Wait for the other one too.
            deadline = time.monotonic() + 30
            while len(gw.children()) < 2 or gw.log_text().count("Running on http") < 2:
                assert time.monotonic() < deadline, "the 2 workers did not start serving"
                await asyncio.sleep(0.05)
            workers = gw.children()

            # Connect (u2 and u3 in turn, both in s1) until each worker serves a client
            # and the two workers hold connections of different users (the kernel
            # picks the worker that accepts).
            by_pid: dict[int, list[LiveClient]] = {}

            def across() -> tuple[LiveClient, LiveClient] | None:
                if len(by_pid) < 2:
                    return None
                xs, ys = by_pid.values()
                return next(((x, y) for x in xs for y in ys if x.user_id != y.user_id), None)

            while (found := across()) is None:
                assert time.monotonic() < deadline + 15, f"clients all on one worker: {by_pid}"
                client = await gw.login((world.u2, world.u3)[len(gw.clients) % 2])
                pid = gw.pid_serving(client, workers)
                assert pid is not None, "no worker holds the connection"
                by_pid.setdefault(pid, []).append(client)
            print(f"\nclients per worker pid: { {p: len(c) for p, c in by_pid.items()} }")
            assert set(by_pid) == set(workers)
            x, y = found
            clients = list(gw.clients)

            # Both workers subscribe to the server; each client gets an event once.
            for client in clients:
                await client.subscribe(world.s1)
            assert await probe.numsub(keys.server_channel(world.s1)) == 2
            event = {"op": "MESSAGE_CREATE", "d": {"n": 1}}
            assert await probe.publish_server(world.s1, event) == 2
            await expect_all(clients, "MESSAGE_CREATE", {"n": 1})
            # Typing on one worker is heard on the other (not by the typer's own tabs).
            await x.send_op("TYPING_START", {"channelId": world.c1})
            hearers = [c for c in clients if c.user_id != x.user_id]
            assert y in hearers
            for frame in await asyncio.gather(*(c.expect("TYPING_START") for c in hearers)):
                assert frame["d"]["userId"] == x.user_id
            await quiet(*clients)
            # Presence too: u1 comes online on one worker, subscribers on both hear it.
            await gw.login(world.u1)
            await expect_all(
                clients, "PRESENCE_UPDATE", presence_update(world.u1, world.s1, "online")
            )
            await quiet(*clients)

            # SIGTERM to the supervisor: every client gets RECONNECT, then 1001.
            fresh = await gw.connect("W/not identified")
            everyone = list(gw.clients)
            gw.signal(signal.SIGTERM)
            results = await asyncio.gather(*(c.expect_close(1001, within=15) for c in everyone))
            for client, frames in zip(everyone, results, strict=True):
                assert frames and frames[-1] == {"op": "RECONNECT", "d": None}, (
                    client.name, frames)
                assert [f["op"] for f in frames] == ["RECONNECT"], (client.name, frames)
            assert fresh in everyone
            assert await gw.wait_exit(20) == 0, gw.log_text()[-3000:]
            for pid in workers:
                assert _is_gone(pid), f"worker {pid} outlived the supervisor"
    finally:
        await probe.forget(world)


def _is_gone(pid: int) -> bool:
    """The process no longer exists (or is a zombie nobody reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"
