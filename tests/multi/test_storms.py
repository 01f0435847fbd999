"""PROTOCOL 15 over real sockets and a real Redis made slow: an IDENTIFY storm.

Instance A reaches Redis through a proxy that delays every chunk; hundreds of clients
send IDENTIFY at once. Every one gets READY and none is closed by the server: the
handshakes wait in A's admission queue instead of timing out in Redis' pool."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.multi.conftest import LiveClient, World
from tests.multi.test_faults import open_pair
from tests.support.net import TcpProxy

pytestmark = pytest.mark.redis

CLIENTS = 300
#: The default admission (16). With it unbounded ("100000") this test closes 4000s.
ENV: dict[str, str] = {}


async def test_an_identify_storm_on_a_slow_redis_gets_ready_everywhere(
    redis_url: str, redis_proxy: TcpProxy, world: World, tmp_path: Path
) -> None:
    async with open_pair(redis_url, redis_proxy, world, tmp_path, ENV) as (a, _):
        users = world.users
        clients: list[LiveClient] = list(
            await asyncio.gather(*(a.connect(f"A/storm{i}") for i in range(CLIENTS)))
        )
        redis_proxy.latency = 0.1  # every chunk each way: a round trip >= 200 ms
        try:
            tokens = [a.mint(users[i % len(users)]) for i in range(CLIENTS)]
            await asyncio.gather(
                *(c.send_op("IDENTIFY", {"token": t}) for c, t in zip(clients, tokens, strict=True))
            )
            frames = await asyncio.gather(*(c.expect("READY", within=60) for c in clients))
        finally:
            redis_proxy.latency = 0.0
        assert len(frames) == CLIENTS
        assert a.gateway.queue.waiting == 0
        closes = a.gateway.metrics.closes
        assert not any(
            sample.labels.get("side") == "server" and sample.value
            for metric in closes.collect()
            for sample in metric.samples
        ), "the server closed connections during the storm"
