"""The client library across a drain of one of two instances sharing Redis, and
``gateway publish --redis`` into the same Redis.

A drain sends RECONNECT and closes 1001; the client comes back on the other instance
with RESUME (PROTOCOL 13), so ``test_..._nothing_lost`` gets the event published while
it was between instances, replayed before RESUMED.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

from entrypoints.client import (
    Backoff,
    ClientEvent,
    Connected,
    Disconnected,
    Dispatch,
    GatewayClient,
    connect,
)
from tests.multi.conftest import WAIT, RedisProbe, RedisTarget, StartCluster, World

pytestmark = pytest.mark.redis

FAST = Backoff(base=0.02, cap=0.2)
E = TypeVar("E")
#: Short heartbeats and presence grace, so that the drained instance's presence
#: sessions are reaped before the end-of-test leak check.
ENV = {
    "GATEWAY_HEARTBEAT_INTERVAL_MS": "300",
    "GATEWAY_HEARTBEAT_TIMEOUT_MS": "1500",
    "GATEWAY_PRESENCE_GRACE_MS": "300",
}


async def next_of(client: GatewayClient, kind: type[E]) -> E:
    while True:
        event: ClientEvent = await asyncio.wait_for(client.__anext__(), WAIT)
        if isinstance(event, kind):
            return event


async def dispatches_until(client: GatewayClient, op: str) -> list[Dispatch]:
    """Every dispatch up to and including the first with this op."""
    seen: list[Dispatch] = []
    while True:
        event = await next_of(client, Dispatch)
        seen.append(event)
        if event.op == op:
            return seen


def gated_token(mint: Callable[[], str]) -> tuple[asyncio.Event, asyncio.Event, Any]:
    """A token provider that, from its second call on, first says it is waiting and
    then waits for the gate: the test acts while the client is between instances."""
    waiting, gate = asyncio.Event(), asyncio.Event()
    calls = 0

    async def provider() -> str:
        nonlocal calls
        calls += 1
        if calls > 1:
            waiting.set()
            await gate.wait()
        return mint()

    return waiting, gate, provider


async def drained_over(
    start_cluster: StartCluster, world: World, probe: RedisProbe, gap: bool
) -> list[Dispatch]:
    """Subscribe on A, drain A, come back on B; with ``gap``, publish EV 2 while the
    client is between instances. Returns the dispatches received on B up to EV 3."""
    a, b = await start_cluster(2, ENV)
    waiting, gate, provider = gated_token(lambda: a.mint(world.u1))
    async with connect(
        [a.ws_url, b.ws_url], provider, subscribe=[world.s1], backoff=FAST
    ) as client:
        await dispatches_until(client, "SUBSCRIBED")
        await probe.publish_server(world.s1, {"op": "EV", "d": {"n": 1}})
        assert (await dispatches_until(client, "EV"))[-1].d == {"n": 1}
        a.stop_event.set()  # SIGTERM: drain (RECONNECT, 1001), then exit
        gone = await next_of(client, Disconnected)
        assert gone.code == 1001
        await waiting.wait()  # connected to B, about to RESUME
        if gap:
            await probe.publish_server(world.s1, {"op": "EV", "d": {"n": 2}})
        gate.set()
        # A RESUME replays what was missed before RESUMED (Connected): keep it.
        seen: list[Dispatch] = []
        while True:
            event: ClientEvent = await asyncio.wait_for(client.__anext__(), WAIT)
            if isinstance(event, Dispatch):
                seen.append(event)
            elif isinstance(event, Connected):
                back = event
                break
        assert back.url == b.ws_url
        if not back.resumed:
            await dispatches_until(client, "SUBSCRIBED")
        await probe.publish_server(world.s1, {"op": "EV", "d": {"n": 3}})
        while not seen or seen[-1].d != {"n": 3}:  # every dispatch on B up to EV 3
            seen += await dispatches_until(client, "EV")
        return seen


async def test_drain_moves_the_client_to_the_other_instance_and_resubscribes(
    start_cluster: StartCluster, world: World, probe: RedisProbe
) -> None:
    seen = await drained_over(start_cluster, world, probe, gap=False)
    assert [d.d for d in seen if d.op == "EV"] == [{"n": 3}]


async def test_drain_then_resume_on_the_other_instance_nothing_lost(
    start_cluster: StartCluster, world: World, probe: RedisProbe
) -> None:
    seen = await drained_over(start_cluster, world, probe, gap=True)
    assert [d.d for d in seen if d.op == "EV"] == [{"n": 2}, {"n": 3}]
    assert not [d for d in seen if d.op == "READY"]  # resumed, not identified afresh


async def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "entrypoints.cli",
        *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_gateway_publish_redis_reaches_clients_on_every_instance(
    start_cluster: StartCluster, world: World, redis_target: RedisTarget
) -> None:
    a, b = await start_cluster(2)
    async with (
        connect(a.ws_url, a.mint(world.u1), subscribe=[world.s1]) as on_a,
        connect(b.ws_url, b.mint(world.u2), subscribe=[world.s1]) as on_b,
    ):
        await dispatches_until(on_a, "SUBSCRIBED")
        await dispatches_until(on_b, "SUBSCRIBED")
        code, out, err = await run_cli(
            "publish",
            world.s1,
            "HELLO_WORLD",
            '{"via": "redis"}',
            "--redis",
            redis_target.url,
            env={"GATEWAY_REDIS_MODE": redis_target.mode},
        )
        assert code == 0, err
        assert f"ws:server:{world.s1}" in out and "(2 gateway instances listening)" in out
        for client in (on_a, on_b):
            events = await dispatches_until(client, "HELLO_WORLD")
            assert events[-1].d == {"via": "redis"}
        code, out, err = await run_cli(
            "publish",
            "--user",
            world.u2,
            "DM",
            "[1]",
            "--redis",
            redis_target.url,
            env={"GATEWAY_REDIS_MODE": redis_target.mode},
        )
        assert code == 0, err
        assert (await dispatches_until(on_b, "DM"))[-1].d == [1]
