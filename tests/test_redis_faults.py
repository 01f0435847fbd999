"""RedisBroker under faults: a hung server, a killed connection, a server gone.

The shared Redis is never restarted (other suites use it): faults are made with a
small TCP proxy in front of it, which can stop forwarding bytes without closing
anything (a hung server or a silent network partition), drop every connection, or
refuse new ones (a server that is down). The killed-connection test uses
``CLIENT KILL`` aimed at this broker's subscriber connection only.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import anyio
import pytest

from adapters.redis import RedisBroker, create_client, open_redis_backends
from domain.model import Status
from domain.ports import BackendUnavailable, Broker
from tests.support.net import TcpProxy

pytestmark = pytest.mark.redis

PING_INTERVAL = 0.2
PING_TIMEOUT = 0.5
WAIT = 5.0  # seconds: bound for anything expected to happen soon


@dataclass
class Recorder:
    received: list[tuple[str, bytes]] = field(default_factory=list)
    _arrival: anyio.Event = field(default_factory=anyio.Event)

    async def handler(self, channel: str, payload: bytes) -> None:
        self.received.append((channel, payload))
        self._arrival.set()
        self._arrival = anyio.Event()

    def payloads(self, channel: str) -> list[bytes]:
        return [p for c, p in self.received if c == channel]

    async def wait_for(self, channel: str, payload: bytes) -> None:
        with anyio.fail_after(WAIT):
            while payload not in self.payloads(channel):
                await self._arrival.wait()


def _target(redis_url: str) -> tuple[str, int, str]:
    parts = urlsplit(redis_url)
    return parts.hostname or "127.0.0.1", parts.port or 6379, parts.path.lstrip("/") or "0"


@pytest.fixture
async def proxy(redis_url: str) -> AsyncIterator[TcpProxy]:
    host, port, _ = _target(redis_url)
    p = TcpProxy(host, port)
    await p.start()
    try:
        yield p
    finally:
        await p.close()


@contextlib.asynccontextmanager
async def running(broker: RedisBroker, recorder: Recorder) -> AsyncIterator[RedisBroker]:
    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.run, recorder.handler)
        try:
            await wait_healthy(broker)
            yield broker
        finally:
            await broker.close()
            tg.cancel_scope.cancel()


async def eventually(predicate: Callable[[], bool]) -> float:
    """Poll state that has no event to wait on; return how long it took."""
    start = time.monotonic()
    with anyio.fail_after(WAIT):
        while not predicate():  # noqa: ASYNC110 - nothing to wait on but time
            await anyio.sleep(0.005)
    return time.monotonic() - start


async def wait_healthy(broker: Broker) -> float:
    return await eventually(broker.is_healthy)


async def wait_unhealthy(broker: Broker) -> float:
    return await eventually(lambda: not broker.is_healthy())


def proxied_broker(
    proxy: TcpProxy, db: str, *, publish_timeout: float = 0.5, subscribe_timeout: float = 3.0
) -> RedisBroker:
    return RedisBroker(
        proxy.url(f"redis://127.0.0.1/{db}"),
        ping_interval=PING_INTERVAL,
        ping_timeout=PING_TIMEOUT,
        connect_timeout=0.5,
        publish_timeout=publish_timeout,
        subscribe_timeout=subscribe_timeout,
        reconnect_max=0.4,
    )


def channel_name() -> str:
    return f"ws:server:test-{uuid.uuid4().hex}"


async def test_hung_server_is_detected_and_recovered(redis_url: str, proxy: TcpProxy) -> None:
    db = _target(redis_url)[2]
    recorder = Recorder()
    channel, late = channel_name(), channel_name()
    async with (
        running(proxied_broker(proxy, db), recorder) as broker,
        RedisBroker(redis_url) as direct,
    ):
        await broker.subscribe(channel)
        await direct.publish(channel, b"before")
        await recorder.wait_for(channel, b"before")

        proxy.hang()
        noticed = await wait_unhealthy(broker)
        print(f"\nhung server noticed after {noticed * 1000:.0f} ms")
        assert noticed <= PING_INTERVAL + PING_TIMEOUT + 0.3
        assert broker.stats.outages == 1

        # A subscribe while down waits for the reconnect instead of failing.
        async with anyio.create_task_group() as tg:
            tg.start_soon(broker.subscribe, late)
            await anyio.sleep(0.3)
            assert not broker.is_healthy()
            proxy.restore()
            recovered = await wait_healthy(broker)
        print(f"recovered {recovered * 1000:.0f} ms after the proxy resumed")

        await direct.publish(channel, b"after")
        await direct.publish(late, b"late")
        await recorder.wait_for(channel, b"after")
        await recorder.wait_for(late, b"late")
        assert recorder.payloads(channel) == [b"before", b"after"]
        assert broker.stats.reconnects == 1
        assert broker.stats.outages == 1


async def test_hung_server_is_detected_with_a_busy_handler_too(
    redis_url: str, proxy: TcpProxy
) -> None:
    """Time in the handler is not silence: a slow handler is not a dead server."""
    db = _target(redis_url)[2]
    channel = channel_name()
    seen: list[bytes] = []

    async def slow_handler(_channel: str, payload: bytes) -> None:
        seen.append(payload)
        await anyio.sleep(PING_INTERVAL + PING_TIMEOUT + 0.3)

    broker = proxied_broker(proxy, db)
    async with anyio.create_task_group() as tg, RedisBroker(redis_url) as direct:
        tg.start_soon(broker.run, slow_handler)
        await wait_healthy(broker)
        await broker.subscribe(channel)
        await direct.publish(channel, b"slow-1")
        await direct.publish(channel, b"slow-2")
        await eventually(lambda: len(seen) >= 2)
        assert broker.stats.outages == 0
        await broker.close()
        tg.cancel_scope.cancel()


async def test_killed_connection_resubscribes_and_delivery_resumes(
    redis_url: str, proxy: TcpProxy
) -> None:
    name = f"gw-test-{uuid.uuid4().hex[:12]}"
    recorder = Recorder()
    channels = [channel_name() for _ in range(1200)]  # three SUBSCRIBE batches
    async with (
        running(RedisBroker(redis_url, client_name=name, reconnect_max=0.5), recorder) as broker,
        RedisBroker(redis_url) as direct,
    ):
        admin = create_client(redis_url)
        try:
            await asyncio.gather(*(broker.subscribe(c) for c in channels))
            await direct.publish(channels[0], b"before")
            await recorder.wait_for(channels[0], b"before")

            clients = await admin.client_list()
            ours = [c for c in clients if c.get("name") == name]
            assert len(ours) == 1, ours
            # Only our subscriber connection: other suites share this server.
            killed = await admin.client_kill_filter(_id=ours[0]["id"], _type="pubsub")
            killed_at = time.monotonic()
            assert killed == 1

            probe = channels[-1]
            i = 0
            with anyio.fail_after(WAIT):
                while not recorder.payloads(probe):
                    i += 1
                    await direct.publish(probe, f"probe-{i}".encode())
                    await anyio.sleep(0.002)
            resumed_ms = (time.monotonic() - killed_at) * 1000
            print(f"\ndelivery resumed {resumed_ms:.0f} ms after CLIENT KILL")
            assert broker.is_healthy()
            assert broker.stats.outages == 1
            assert broker.stats.reconnects == 1

            for channel in channels[::97]:
                await direct.publish(channel, b"after")
            for channel in channels[::97]:
                await recorder.wait_for(channel, b"after")
        finally:
            await admin.aclose()


async def test_publish_while_down_fails_fast(redis_url: str, proxy: TcpProxy) -> None:
    db = _target(redis_url)[2]
    recorder = Recorder()
    async with running(proxied_broker(proxy, db, publish_timeout=1.0), recorder) as broker:
        channel = channel_name()
        await broker.publish(channel, b"fine")

        # Hung: the first publish waits at most its timeout...
        proxy.hang()
        start = time.monotonic()
        with pytest.raises(BackendUnavailable):
            await broker.publish(channel, b"hung")
        assert time.monotonic() - start < 2.0
        # ... and once the broker knows it is down, publishes fail at once.
        await wait_unhealthy(broker)
        with pytest.raises(BackendUnavailable):
            await broker.publish(channel, b"hung again")
        start = time.monotonic()
        with pytest.raises(BackendUnavailable):
            await broker.publish(channel, b"and again")
        assert time.monotonic() - start < 0.1

        # Down (connections refused): fails fast too.
        proxy.refuse()
        start = time.monotonic()
        for _ in range(5):
            with pytest.raises(BackendUnavailable):
                await broker.publish(channel, b"refused")
        assert time.monotonic() - start < 2.0

        # Back: publishing and subscribing work again.
        proxy.restore()
        await wait_healthy(broker)
        await broker.subscribe(channel)
        await broker.publish(channel, b"back")
        await recorder.wait_for(channel, b"back")


async def test_subscribe_while_down_times_out_with_backend_unavailable(
    redis_url: str, proxy: TcpProxy
) -> None:
    db = _target(redis_url)[2]
    recorder = Recorder()
    async with running(proxied_broker(proxy, db, subscribe_timeout=0.5), recorder) as broker:
        proxy.refuse()
        await wait_unhealthy(broker)
        channel = channel_name()
        start = time.monotonic()
        with pytest.raises(BackendUnavailable):
            await broker.subscribe(channel)
        assert time.monotonic() - start < 1.0
        assert channel not in broker.subscribed_channels  # a failed subscribe has no effect
        proxy.restore()
        await wait_healthy(broker)
        await broker.subscribe(channel)
        await broker.publish(channel, b"ok")
        await recorder.wait_for(channel, b"ok")


async def test_broker_starts_while_redis_is_down(redis_url: str, proxy: TcpProxy) -> None:
    db = _target(redis_url)[2]
    proxy.refuse()
    recorder = Recorder()
    broker = proxied_broker(proxy, db)
    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.run, recorder.handler)
        await anyio.sleep(0.5)
        assert not broker.is_healthy()
        assert broker.stats.connect_failures >= 1
        proxy.restore()
        await wait_healthy(broker)
        assert broker.stats.outages == 0
        channel = channel_name()
        await broker.subscribe(channel)
        await broker.publish(channel, b"up")
        await recorder.wait_for(channel, b"up")
        await broker.close()
        tg.cancel_scope.cancel()


async def test_close_stops_run_and_releases_a_waiting_subscribe(
    redis_url: str, proxy: TcpProxy
) -> None:
    db = _target(redis_url)[2]
    broker = proxied_broker(proxy, db, subscribe_timeout=10.0)
    outcome: list[BaseException] = []

    async def subscribe_while_down() -> None:
        try:
            await broker.subscribe(channel_name())
        except BackendUnavailable as exc:
            outcome.append(exc)

    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(broker.run, Recorder().handler)
            await wait_healthy(broker)
            proxy.hang()
            await wait_unhealthy(broker)
            tg.start_soon(subscribe_while_down)
            await anyio.sleep(0.1)
            await broker.close()
            # run returns by itself and the subscribe is released: the task group
            # ends without being cancelled.
    assert len(outcome) == 1
    assert not broker.is_healthy()
    with pytest.raises(BackendUnavailable):
        await broker.publish(channel_name(), b"closed")


async def test_a_cancelled_subscribe_has_no_effect(redis_url: str, proxy: TcpProxy) -> None:
    db = _target(redis_url)[2]
    recorder = Recorder()
    async with running(proxied_broker(proxy, db), recorder) as broker:
        proxy.refuse()
        await wait_unhealthy(broker)
        channel = channel_name()
        with anyio.move_on_after(0.2):
            await broker.subscribe(channel)
        assert channel not in broker.subscribed_channels
        proxy.restore()
        await wait_healthy(broker)
        await broker.publish(channel, b"not subscribed")
        fence = channel_name()
        await broker.subscribe(fence)
        await broker.publish(fence, b"fence")
        await recorder.wait_for(fence, b"fence")
        assert recorder.payloads(channel) == []


async def test_open_redis_backends_works_and_closes_everything(redis_url: str) -> None:
    """The composition root's entry point: three working ports, closed on exit."""
    recorder = Recorder()
    channel = channel_name()
    async with (
        open_redis_backends(redis_url) as (broker, typing_gate, presence),
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(broker.run, recorder.handler)
        await wait_healthy(broker)
        await broker.subscribe(channel)
        await broker.publish(channel, b"wired")
        await recorder.wait_for(channel, b"wired")
        key = f"typing:test-{uuid.uuid4().hex}:u1"
        assert await typing_gate.claim(key, 1000) is True
        await presence.ping()
        assert await presence.get_status(f"test-{uuid.uuid4().hex}") is Status.OFFLINE
        await broker.close()  # run returns
    with pytest.raises(BackendUnavailable):
        await broker.publish(channel, b"closed")


async def test_open_redis_backends_starts_while_redis_is_down(proxy: TcpProxy) -> None:
    proxy.refuse()
    url = proxy.url("redis://127.0.0.1/15")
    async with open_redis_backends(url, call_timeout=0.5) as (broker, typing_gate, _):
        assert not broker.is_healthy()
        with pytest.raises(BackendUnavailable):
            await typing_gate.claim("typing:c:u", 1000)
