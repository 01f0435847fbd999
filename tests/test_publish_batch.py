"""The broker's batched PUBLISH (adapters/redis/batch.py's CommandBatcher)."""

from __future__ import annotations

import uuid

import anyio
import pytest

from adapters.redis import RedisBroker
from domain.ports import BackendUnavailable
from tests.support.net import TcpProxy


@pytest.mark.redis
async def test_publishes_of_one_tick_are_one_pipeline_and_all_arrive(redis_url: str) -> None:
    channel = f"test:batch:{uuid.uuid4().hex}"
    received: list[bytes] = []
    arrived = anyio.Event()

    async def handler(_: str, payload: bytes) -> None:
        received.append(payload)
        if len(received) == 300:
            arrived.set()

    async with (
        RedisBroker(redis_url) as sub,
        RedisBroker(redis_url) as pub,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(sub.run, handler)
        await sub.subscribe(channel)
        async with anyio.create_task_group() as burst:
            for i in range(300):
                burst.start_soon(pub.publish, channel, b"%d" % i)
        # The first goes alone; the 299 issued meanwhile in the next round trips
        # (128 a pipeline at most): 4, not 300.
        assert pub.publish_round_trips <= 4
        assert pub.stats.publishes == 300
        with anyio.fail_after(5):
            await arrived.wait()
        tg.cancel_scope.cancel()
    assert sorted(received, key=int) == [b"%d" % i for i in range(300)]


@pytest.mark.redis
async def test_a_batch_that_cannot_reach_redis_fails_every_publish(redis_url: str) -> None:
    proxy = TcpProxy.for_url(redis_url, 6379)
    await proxy.start()
    try:
        async with RedisBroker(proxy.url(), publish_timeout=0.3) as pub:
            await pub.publish("test:batch:warm", b"x")
            proxy.hang()
            failures: list[BaseException] = []

            async def call(i: int) -> None:
                try:
                    await pub.publish("test:batch:hung", b"%d" % i)
                except BackendUnavailable as exc:
                    failures.append(exc)

            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(call, i)
            assert len(failures) == 20
            assert len({id(f) for f in failures}) == 20  # each caller its own exception
            assert pub.stats.publish_failures == 20
    finally:
        await proxy.close()
