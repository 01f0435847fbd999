"""TickBatcher (adapters/redis/batching.py) and the broker's batched PUBLISH."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import anyio
import pytest

from adapters.redis import RedisBroker
from adapters.redis.batching import TickBatcher
from domain.ports import BackendUnavailable
from tests.support.net import TcpProxy


class Recorder:
    def __init__(self, delay: float = 0.0, fail: set[int] | None = None) -> None:
        self.batches: list[list[int]] = []
        self.delay, self.fail = delay, fail or set()
        self.started = anyio.Event()

    async def run(self, items: Sequence[int]) -> list[int | BaseException]:
        self.batches.append(list(items))
        self.started.set()
        await anyio.sleep(self.delay)
        return [ValueError(i) if i in self.fail else i * 10 for i in items]


async def test_what_one_tick_submits_is_one_batch_each_caller_its_own_answer() -> None:
    rec = Recorder(fail={3})
    batcher: TickBatcher[int, int] = TickBatcher(rec.run)
    results: dict[int, object] = {}

    async def call(i: int) -> None:
        try:
            results[i] = await batcher.submit(i)
        except ValueError as exc:
            results[i] = exc

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(call, i)
    assert rec.batches == [list(range(50))]
    assert results[7] == 70
    assert isinstance(results[3], ValueError)


async def test_a_batch_is_cut_at_max_batch() -> None:
    rec = Recorder()
    batcher: TickBatcher[int, int] = TickBatcher(rec.run, max_batch=8)
    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(batcher.submit, i)
    assert [len(b) for b in rec.batches] == [8, 8, 4]


async def test_a_later_submit_does_not_wait_for_the_batch_on_the_wire() -> None:
    rec = Recorder(delay=0.5)
    batcher: TickBatcher[int, int] = TickBatcher(rec.run)
    done: list[int] = []

    async def call(i: int) -> None:
        done.append(await batcher.submit(i))

    async with anyio.create_task_group() as tg:
        tg.start_soon(call, 1)
        await rec.started.wait()
        rec.delay = 0.0
        await call(2)  # answered while the first batch still sleeps
        assert done == [20]
    assert done == [20, 10]
    assert rec.batches == [[1], [2]]


async def test_the_leader_cancelled_still_answers_the_rest() -> None:
    rec = Recorder(delay=0.2)
    batcher: TickBatcher[int, int] = TickBatcher(rec.run)
    got: list[int] = []
    leader_scope = anyio.CancelScope()
    leader_result: list[int] = []

    async def leader() -> None:
        with leader_scope:
            leader_result.append(await batcher.submit(1))

    async def follower() -> None:
        got.append(await batcher.submit(2))

    async with anyio.create_task_group() as tg:
        tg.start_soon(leader)
        tg.start_soon(follower)
        await rec.started.wait()
        leader_scope.cancel()
    assert rec.batches == [[1, 2]]
    assert got == [20]  # the batch ran to its end for the follower
    assert leader_result == [10]  # shielded: the cancellation lands after the answer


async def test_a_runner_that_raises_fails_every_item() -> None:
    async def broken(items: Sequence[int]) -> list[int | BaseException]:
        raise RuntimeError("boom")

    batcher: TickBatcher[int, int] = TickBatcher(broken)
    errors: list[BaseException] = []

    async def call(i: int) -> None:
        try:
            await batcher.submit(i)
        except RuntimeError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(call, i)
    assert len(errors) == 3


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
        assert pub.stats.publish_round_trips == 1
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
