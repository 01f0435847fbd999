"""Multi-instance harness: several gateways sharing one real Redis.

Three ways to run gateway instances, all driven by real WebSocket clients:

* :func:`serve_instance`: one app served by its own Hypercorn on an ephemeral
  loopback port inside the test's event loop, from any gateway factory (the
  production :func:`build_gateway`, or :func:`redis_gateway_factory`, which gives
  each instance its own broker, typing gate and presence store from
  :func:`open_redis_backends` and lets several instances share one directory).
* :func:`spawn_gateway`: ``gateway serve`` as a subprocess (optionally with
  ``GATEWAY_WORKERS``), configured through its environment only.
* :class:`TcpProxy`: a TCP proxy in front of Redis or Postgres that can drop every
  connection, refuse new ones or hang (stop forwarding while keeping the sockets),
  so that backend faults never touch the shared servers.

Isolation: the shared Redis (db 15) and Postgres are used by other suites at the
same time, so every test gets its own :class:`World`: the demo directory
(``entrypoints/demo.json``) with every id and username suffixed by a random tag.
Redis keys (``presence:{userId}``, ``typing:...``, the presence registry) and pub/sub
channels therefore never collide across tests or concurrent runs.

The WebSocket client is the black-box harness's :class:`Client` (every frame checked
against PROTOCOL section 2, ``s`` gapless), extended with background heartbeats for
gateways configured with a short heartbeat timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from adapters.clock import SystemClock
from adapters.jwt import JwtIssuer
from adapters.memory import MemoryDirectory
from adapters.redis import RedisBroker, RedisClusterBroker, RedisMode, open_redis_backends
from adapters.shell import Backends, Gateway, make_gateway
from domain import keys
from domain.fixtures import parse_directory
from domain.model import DirectoryData
from entrypoints.app import GatewayFactory, create_app
from entrypoints.bootstrap import build_gateway, make_verifier
from entrypoints.config import Config
from entrypoints.serve import serve_app
from tests.blackbox.conftest import QUIET, TEST_SECRET, WAIT, Client, Closed, Frame, eventually
from tests.support.net import TcpProxy, free_port

__all__ = [
    "QUIET",
    "TEST_SECRET",
    "WAIT",
    "Closed",
    "Cluster",
    "Endpoint",
    "Frame",
    "GatewayProcess",
    "Instance",
    "LiveClient",
    "RedisProbe",
    "RedisTarget",
    "StartCluster",
    "TcpProxy",
    "World",
    "config_from",
    "eventually",
    "proxied_url",
    "quiet",
    "redis_gateway_factory",
    "running_proxy",
    "serve_instance",
    "spawn_gateway",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
WS_PATH = "/ws/gateway"
#: Environment of every gateway in this suite (in-process or subprocess).
BASE_ENV: dict[str, str] = {
    "GATEWAY_JWT_SECRET": TEST_SECRET,
    "GATEWAY_DRAIN_TIMEOUT_MS": "2000",
}


# --- the directory of one test ----------------------------------------------------

DEMO: dict[str, Any] = json.loads(
    resources.files("entrypoints").joinpath("demo.json").read_text(encoding="utf-8")
)


def _retag(document: Mapping[str, Any], tag: str) -> dict[str, Any]:
    """A fixture document with every id and username suffixed by ``-{tag}``."""

    def t(value: str) -> str:
        return f"{value}-{tag}"

    return {
        "users": [
            {**u, "id": t(u["id"]), "username": t(u["username"])} for u in document["users"]
        ],
        "servers": [
            {**s, "id": t(s["id"]), "ownerId": t(s["ownerId"])} for s in document["servers"]
        ],
        "roles": [
            {**r, "id": t(r["id"]), "serverId": t(r["serverId"])} for r in document["roles"]
        ],
        "members": [
            {
                **m,
                "serverId": t(m["serverId"]),
                "userId": t(m["userId"]),
                "roleIds": [t(r) for r in m.get("roleIds", [])],
            }
            for m in document["members"]
        ],
        "channels": [
            {
                **c,
                "id": t(c["id"]),
                "serverId": t(c["serverId"]),
                "overwrites": [{**o, "id": t(o["id"])} for o in c.get("overwrites", [])],
            }
            for c in document["channels"]
        ],
    }


class World:
    """A fixture (the demo data unless given) whose ids are unique to one test.

    Demo data: s1 (owner u1) has u1, u2 (role mods), u3; s2 (owner u2) has u2, u3,
    u4. Channels c1, c2 (s1, readable by all), c3 (s1, mods only: readable by u1 as
    owner and u2 as mod, not by u3), c4 (s2).
    """

    def __init__(self, document: Mapping[str, Any] | None = None, tag: str | None = None) -> None:
        self.tag = tag or uuid.uuid4().hex[:10]
        self.document = _retag(document if document is not None else DEMO, self.tag)

    def id(self, name: str) -> str:
        return f"{name}-{self.tag}"

    @property
    def users(self) -> list[str]:
        return [u["id"] for u in self.document["users"]]

    @property
    def u1(self) -> str:
        return self.id("u1")

    @property
    def u2(self) -> str:
        return self.id("u2")

    @property
    def u3(self) -> str:
        return self.id("u3")

    @property
    def u4(self) -> str:
        return self.id("u4")

    @property
    def s1(self) -> str:
        return self.id("s1")

    @property
    def s2(self) -> str:
        return self.id("s2")

    @property
    def c1(self) -> str:
        return self.id("c1")

    @property
    def c3(self) -> str:
        return self.id("c3")

    @property
    def c4(self) -> str:
        return self.id("c4")

    def data(self) -> DirectoryData:
        return parse_directory(self.document)

    def write(self, directory: Path) -> str:
        path = directory / f"fixture-{self.tag}.json"
        path.write_text(json.dumps(self.document), encoding="utf-8")
        return str(path)


@pytest.fixture
def world() -> World:
    return World()


# --- Redis as another service sees it --------------------------------------------


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclasses.dataclass(frozen=True)
class RedisTarget:
    """The Redis the instances of a test share: standalone, or a Redis Cluster
    (PROTOCOL 16) that ``url`` names any node of."""

    mode: str
    url: str

    @property
    def cluster(self) -> bool:
        return self.mode == "cluster"

    @property
    def env(self) -> dict[str, str]:
        return {"GATEWAY_REDIS_URL": self.url, "GATEWAY_REDIS_MODE": self.mode}


@pytest.fixture(params=["standalone", "cluster"])
def redis_target(request: pytest.FixtureRequest) -> RedisTarget:
    """Every multi-instance test that goes through ``probe`` or ``start_cluster`` runs
    on both (a module whose tests need a proxy in front of one Redis overrides it)."""
    if request.param == "cluster":
        return RedisTarget("cluster", request.getfixturevalue("redis_cluster_url"))
    return RedisTarget("standalone", request.getfixturevalue("redis_url"))


class RedisProbe:
    """A plain redis-py client: publishes like another service (PROTOCOL section 8,
    or 16: SPUBLISH into a cluster) and reads the keys of the external contract."""

    def __init__(self, url: str, cluster: bool = False) -> None:
        self.cluster = cluster
        self.client: Any = (
            aioredis.RedisCluster.from_url(url) if cluster else aioredis.Redis.from_url(url)
        )

    async def publish_server(
        self,
        server_id: str,
        event: Mapping[str, Any],
        *,
        channel_id: str | None = None,
        exclude_user_id: str | None = None,
    ) -> int:
        envelope = {"event": event, "channelId": channel_id, "excludeUserId": exclude_user_id}
        return await self.publish_raw(keys.server_channel(server_id), json.dumps(envelope))

    async def publish_user(self, user_id: str, event: Mapping[str, Any]) -> int:
        return await self.publish_raw(keys.user_channel(user_id), json.dumps({"event": event}))

    async def publish_raw(self, channel: str, payload: str | bytes) -> int:
        if self.cluster:
            shard_receivers: int = await self.client.spublish(channel, payload)
            return shard_receivers
        receivers: int = await self.client.publish(channel, payload)
        return receivers

    async def get(self, key: str) -> str | None:
        value: bytes | str | None = await self.client.get(key)
        return None if value is None else _text(value)

    async def presence(self, user_id: str) -> str | None:
        return await self.get(keys.presence_key(user_id))

    async def wait_presence(self, user_id: str, expected: str | None) -> None:
        deadline = time.monotonic() + WAIT
        while (value := await self.presence(user_id)) != expected:
            if time.monotonic() > deadline:
                raise AssertionError(f"presence:{user_id} is {value!r}, expected {expected!r}")
            await asyncio.sleep(0.02)

    async def numsub(self, channel: str) -> int:
        """How many Redis subscriber connections listen on ``channel``."""
        if self.cluster:
            await self.client.initialize()
            node = self.client.get_node_from_key(channel)
            ((_, shard_count),) = await self.client.pubsub_shardnumsub(channel, target_nodes=node)
            return int(shard_count)
        ((_, count),) = await self.client.pubsub_numsub(channel)
        return int(count)

    async def wait_numsub(self, channel: str, expected: int) -> None:
        deadline = time.monotonic() + WAIT
        while (count := await self.numsub(channel)) != expected:
            if time.monotonic() > deadline:
                raise AssertionError(f"{channel}: {count} subscribers, expected {expected}")
            await asyncio.sleep(0.02)

    async def wait_sessions(self, user_id: str, instance_ids: Sequence[str]) -> None:
        """Wait until the user's live sessions are on exactly these instances (one
        session per entry)."""
        deadline = time.monotonic() + WAIT
        while sorted((sessions := await self.sessions(user_id)).values()) != sorted(
            instance_ids
        ):
            if time.monotonic() > deadline:
                raise AssertionError(f"{user_id}: sessions {sessions}, expected {instance_ids}")
            await asyncio.sleep(0.02)

    async def wait_session_count(self, user_id: str, expected: int) -> None:
        deadline = time.monotonic() + WAIT
        while len(sessions := await self.sessions(user_id)) != expected:
            if time.monotonic() > deadline:
                raise AssertionError(f"{user_id}: sessions {sessions}, expected {expected}")
            await asyncio.sleep(0.02)

    def sessions_key(self, user_id: str) -> str:
        if self.cluster:
            return "{" + keys.presence_key(user_id) + "}:gw:presence:sessions"
        return f"gw:presence:sessions:{user_id}"

    async def sessions(self, user_id: str) -> dict[str, str]:
        raw = await self.client.hgetall(self.sessions_key(user_id))
        return {_text(k): _text(v) for k, v in raw.items()}

    async def assert_no_presence(self, world: World) -> None:
        """Nothing of the world's users is left in Redis: no status, no session."""
        for user_id in world.users:
            await self.wait_presence(user_id, None)
            deadline = time.monotonic() + WAIT
            while sessions := await self.sessions(user_id):
                if time.monotonic() > deadline:
                    raise AssertionError(f"{user_id}: sessions left in Redis: {sessions}")
                await asyncio.sleep(0.02)

    async def forget(self, world: World) -> None:
        """Delete every key of the world's users (after a test that killed a process)."""
        names: list[str] = []
        for user_id in world.users:
            names += [keys.presence_key(user_id), self.sessions_key(user_id)]
        async for key in self.client.scan_iter(match=f"typing:*-{world.tag}:*"):
            names.append(key.decode())
        for name in names:  # one by one: a cluster refuses a DEL across slots
            await self.client.delete(name)

    async def aclose(self) -> None:
        await self.client.aclose()


@pytest.fixture
async def probe(redis_target: RedisTarget) -> AsyncIterator[RedisProbe]:
    p = RedisProbe(redis_target.url, redis_target.cluster)
    try:
        yield p
    finally:
        await p.aclose()


# --- clients ------------------------------------------------------------------------


class LiveClient(Client):
    """A black-box :class:`Client` that can keep itself alive: with
    :meth:`start_heartbeats` it sends HEARTBEAT in the background and the receive
    helpers skip the HEARTBEAT_ACKs (still checked as control frames)."""

    def __init__(self, ws: Any, name: str) -> None:
        super().__init__(ws, name)
        self._beat: asyncio.Task[None] | None = None

    def start_heartbeats(self, interval: float) -> None:
        async def beat() -> None:
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await asyncio.sleep(interval)
                    await self.ws.send(json.dumps({"op": "HEARTBEAT", "d": None}))

        if self._beat is None:
            self._beat = asyncio.create_task(beat())

    def stop_heartbeats(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
            self._beat = None

    def _skip(self, frame: Frame) -> bool:
        return self._beat is not None and frame["op"] == "HEARTBEAT_ACK"

    async def recv_json(self, within: float = WAIT) -> Frame:
        deadline = time.monotonic() + within
        while True:
            frame = await super().recv_json(max(deadline - time.monotonic(), 0.001))
            if not self._skip(frame):
                return frame

    async def assert_no_frame(self, within: float = QUIET) -> None:
        deadline = time.monotonic() + within
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                raw = await asyncio.wait_for(self.ws.recv(), remaining)
            except TimeoutError:
                return
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else None
                raise Closed(self.name, code, "") from None
            frame = self.checker.check(raw)
            if not self._skip(frame):
                raise AssertionError(f"{self.name}: unexpected frame {frame}")

    async def events(self, count: int, within: float = WAIT) -> list[Frame]:
        """The next ``count`` dispatches (whatever their op)."""
        deadline = time.monotonic() + within
        return [
            await self.recv_json(max(deadline - time.monotonic(), 0.001)) for _ in range(count)
        ]

    async def close(self) -> None:
        self.stop_heartbeats()
        await super().close()


async def quiet(*clients: Client, within: float = QUIET) -> None:
    """No frame reaches any of these clients within the window (checked together)."""
    await asyncio.gather(*(c.assert_no_frame(within) for c in clients))


class Endpoint:
    """Where a gateway listens, and the clients connected to it."""

    def __init__(self, name: str, port: int, host: str = "127.0.0.1") -> None:
        self.name = name
        self.host = host
        self.port = port
        self.clients: list[LiveClient] = []
        self._issuer = JwtIssuer(key=TEST_SECRET, algorithm="HS256")
        self._count = 0

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}{WS_PATH}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def mint(self, user_id: str, ttl: float = 3600.0) -> str:
        return self._issuer.issue(user_id, now=time.time(), ttl=ttl)

    async def connect(self, name: str | None = None) -> LiveClient:
        """Open a WebSocket and read HELLO."""
        self._count += 1
        ws = await ws_connect(
            self.ws_url,
            proxy=None,
            ping_interval=None,
            open_timeout=WAIT,
            close_timeout=2,
            max_queue=None,
        )
        client = LiveClient(ws, name or f"{self.name}/client{self._count}")
        self.clients.append(client)
        client.hello = await client.expect("HELLO")
        return client

    async def login(
        self, user_id: str, name: str | None = None, *, heartbeat_every: float | None = None
    ) -> LiveClient:
        """connect + IDENTIFY -> READY, then one HEARTBEAT round trip: the IDENTIFY
        handler (presence broadcast included) is done once its ACK arrives, so a
        later subscriber elsewhere cannot race with this login's broadcast."""
        client = await self.connect(name or f"{self.name}/{user_id.partition('-')[0]}")
        await client.identify(self.mint(user_id))
        await client.heartbeat()
        if heartbeat_every is not None:
            client.start_heartbeats(heartbeat_every)
        return client

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.http_url, trust_env=False, timeout=WAIT)

    async def readyz(self) -> int:
        async with self.http() as http:
            return (await http.get("/readyz")).status_code

    async def wait_readyz(self, status: int, within: float = WAIT) -> float:
        """Poll /readyz until it answers ``status``; return how long that took."""
        started = time.monotonic()
        last: int | str = "none"
        while True:
            try:
                last = await self.readyz()
            except httpx.HTTPError as exc:
                last = repr(exc)
            if last == status:
                return time.monotonic() - started
            if time.monotonic() - started > within:
                raise AssertionError(f"{self.name}: /readyz is {last}, expected {status}")
            await asyncio.sleep(0.05)

    async def close_clients(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients))
        self.clients.clear()


# --- in-process instances --------------------------------------------------------


class Instance(Endpoint):
    """A gateway app served by Hypercorn inside the test's event loop."""

    def __init__(self, name: str, port: int, config: Config) -> None:
        super().__init__(name, port)
        self.config = config
        self.app: Any = None
        self.stop_event = asyncio.Event()

    @property
    def gateway(self) -> Gateway:
        gateway = self.app.state.gateway
        assert isinstance(gateway, Gateway)
        return gateway

    @property
    def broker(self) -> RedisBroker | RedisClusterBroker:
        broker = self.gateway.broker
        assert isinstance(broker, RedisBroker | RedisClusterBroker)
        return broker

    async def assert_clean(self) -> None:
        """PROTOCOL 5.5 on this instance, once its clients are gone."""
        gateway = self.gateway
        await eventually(
            lambda: not gateway.snapshot().connections, what=f"{self.name}: connections end"
        )
        await gateway.resumer.end_all()  # parked sessions (section 13) end, then all is clean
        assert gateway.snapshot().servers == {}, gateway.snapshot().servers
        assert gateway.snapshot().users == {}, gateway.snapshot().users
        assert gateway.snapshot().interest == {}, gateway.snapshot().interest
        broker = gateway.broker
        if isinstance(broker, RedisBroker | RedisClusterBroker):
            # Only the instance's RESUME handoff channels (gw:*) stay subscribed.
            await eventually(
                lambda: all(c.startswith("gw:") for c in broker.subscribed_channels),
                what=f"{self.name}: broker unsubscribed ({broker.subscribed_channels})",
            )


def config_from(env: Mapping[str, str] | None = None) -> Config:
    return Config.from_env({**BASE_ENV, **(env or {})})


def redis_gateway_factory(
    redis_url: str, directory: MemoryDirectory, config: Config, mode: str = "standalone"
) -> GatewayFactory:
    """A factory for one instance: its own Redis broker, typing gate and presence
    store (its own connections and instance id), and the shared ``directory``."""
    redis_mode: RedisMode = "cluster" if mode == "cluster" else "standalone"

    @asynccontextmanager
    async def factory() -> AsyncIterator[Gateway]:
        async with open_redis_backends(redis_url, mode=redis_mode) as (
            broker,
            typing_gate,
            presence,
        ):
            backends = Backends(
                broker, typing_gate, presence, directory, make_verifier(config), SystemClock()
            )
            # Redis-backed: another instance can take the parked sessions of a drain (13),
            # whatever GATEWAY_REDIS_URL says (the URL is given here, not in the env).
            settings = dataclasses.replace(config.gateway, drain_keeps_parked=True)
            yield make_gateway(backends, settings)

    return factory


@asynccontextmanager
async def serve_instance(
    name: str, config: Config, factory: GatewayFactory | None = None
) -> AsyncIterator[Instance]:
    """Serve one app (``build_gateway(config)`` unless ``factory``) on an ephemeral
    loopback port until the block ends; it must be running (and, with Redis, its
    broker live) before the block starts."""
    app = create_app(config, factory or (lambda: build_gateway(config)))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    instance = Instance(name, sock.getsockname()[1], config)
    instance.app = app
    started = asyncio.Event()
    # Hypercorn takes ownership of the descriptor it is given: give it a duplicate.
    fd = os.dup(sock.fileno())
    task = asyncio.create_task(
        serve_app(
            app,
            config,
            bind=f"fd://{fd}",
            stop=instance.stop_event,
            install_signal_handlers=False,
            on_started=started.set,
        )
    )
    try:
        waiter = asyncio.create_task(started.wait())
        done, _ = await asyncio.wait(
            {waiter, task}, timeout=WAIT * 2, return_when=asyncio.FIRST_COMPLETED
        )
        if waiter not in done:
            waiter.cancel()
            if task.done():
                task.result()
            raise AssertionError(f"{name} did not start serving")
        await eventually(
            lambda: getattr(app.state, "gateway", None) is not None
            and instance.gateway.snapshot().running,
            what=f"{name} to run",
        )
        yield instance
    finally:
        await instance.close_clients()
        instance.stop_event.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), 15)
        except TimeoutError:
            task.cancel()
            raise
        finally:
            sock.close()


class Cluster:
    """In-process instances sharing one Redis and one directory."""

    def __init__(self, world: World, probe: RedisProbe) -> None:
        self.world = world
        self.probe = probe
        self.directory = MemoryDirectory(world.data())
        self.instances: list[Instance] = []

    def __getitem__(self, index: int) -> Instance:
        return self.instances[index]

    def __iter__(self) -> Iterator[Instance]:
        return iter(self.instances)

    async def assert_clean(self) -> None:
        for instance in self.instances:
            await instance.close_clients()
        for instance in self.instances:
            await instance.assert_clean()
        await self.probe.assert_no_presence(self.world)


class StartCluster(Protocol):
    async def __call__(self, size: int = 2, env: Mapping[str, str] | None = None) -> Cluster: ...


@pytest.fixture
async def start_cluster(
    redis_target: RedisTarget, world: World, probe: RedisProbe
) -> AsyncIterator[StartCluster]:
    """Start ``size`` instances (A, B, C, ...); at the end of the test every client
    is closed and nothing may be left: no routing, broker subscription or presence
    (on any instance or in Redis)."""
    async with AsyncExitStack() as stack:
        clusters: list[Cluster] = []

        async def start(size: int = 2, env: Mapping[str, str] | None = None) -> Cluster:
            cluster = Cluster(world, probe)
            config = config_from(env)
            for i in range(size):
                name = "ABCDEFGH"[i]
                factory = redis_gateway_factory(
                    redis_target.url, cluster.directory, config, redis_target.mode
                )
                instance = await stack.enter_async_context(serve_instance(name, config, factory))
                await eventually(instance.gateway.broker.is_healthy, what=f"{name} broker live")
                cluster.instances.append(instance)
            clusters.append(cluster)
            return cluster

        yield start
        for cluster in clusters:
            await cluster.assert_clean()


# --- subprocesses ----------------------------------------------------------------


def _socket_inode(local_port: int, remote_port: int) -> str | None:
    """The inode of the server side of a loopback TCP connection (/proc/net/tcp)."""
    wanted_local = f"0100007F:{local_port:04X}"
    wanted_remote = f"0100007F:{remote_port:04X}"
    with open("/proc/net/tcp", encoding="ascii") as fh:
        next(fh)
        for line in fh:
            fields = line.split()
            if fields[1] == wanted_local and fields[2] == wanted_remote:
                return fields[9]
    return None


class GatewayProcess(Endpoint):
    """A ``gateway serve`` subprocess (in its own process group)."""

    def __init__(self, name: str, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
        super().__init__(name, port)
        self.proc = proc
        self.log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    async def wait_ready(self, within: float = 30.0) -> None:
        """Until /readyz answers 200 (Redis and directory reachable, broker live)."""
        deadline = time.monotonic() + within
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if await self.readyz() == 200:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not ready:\n{self.log_text()[-3000:]}")
            await asyncio.sleep(0.1)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def wait_exit(self, within: float = 15.0) -> int:
        return await asyncio.to_thread(self.proc.wait, within)

    def children(self) -> list[int]:
        """Pids of the worker processes (GATEWAY_WORKERS > 1)."""
        path = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        try:
            return [int(p) for p in path.read_text().split()]
        except OSError:
            return []

    def pid_serving(self, client: Client, pids: Sequence[int]) -> int | None:
        """Which of ``pids`` holds the server side of this client's TCP connection."""
        local_port = client.ws.local_address[1]
        inode = _socket_inode(self.port, local_port)
        if inode is None:
            return None
        target = f"socket:[{inode}]"
        for pid in pids:
            fd_dir = Path(f"/proc/{pid}/fd")
            with contextlib.suppress(OSError):
                for fd in fd_dir.iterdir():
                    with contextlib.suppress(OSError):
                        if os.readlink(fd) == target:
                            return pid
        return None


def _clean_environ() -> dict[str, str]:
    """The test process's environment without GATEWAY_* settings (test URLs kept)."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("GATEWAY_") or k.startswith("GATEWAY_TEST_")
    }


def _start_serve(env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``gateway serve`` in its own process group, stdout and stderr to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "entrypoints.cli", "serve"],
            env=dict(env),
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@asynccontextmanager
async def spawn_gateway(
    name: str,
    env: Mapping[str, str],
    log_dir: Path,
    *,
    workers: int = 1,
    wait_ready: bool = True,
) -> AsyncIterator[GatewayProcess]:
    """Run ``gateway serve`` with ``env`` (on top of :data:`BASE_ENV`) until the block
    ends, then SIGKILL its process group if it is still there."""
    port = free_port()
    log = log_dir / f"gateway-{name}-{port}.log"
    full_env = {
        **_clean_environ(),
        **BASE_ENV,
        "GATEWAY_PORT": str(port),
        "GATEWAY_WORKERS": str(workers),
        "PYTHONUNBUFFERED": "1",
        **env,
    }
    proc = _start_serve(full_env, log)
    gw = GatewayProcess(name, port, proc, log)
    try:
        if wait_ready:
            await gw.wait_ready()
        yield gw
    finally:
        await gw.close_clients()
        if workers > 1:
            # The supervisor and the workers it started: the group this test created.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        elif proc.poll() is None:
            proc.kill()
        await asyncio.to_thread(proc.wait, 10)


# --- faults: a TCP proxy ---------------------------------------------------------


def proxied_url(url: str, port: int, *, query: str | None = None) -> str:
    """``url`` with its host and port replaced by 127.0.0.1:``port``."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = (userinfo + "@" if userinfo else "") + f"127.0.0.1:{port}"
    return urlunsplit(
        (parts.scheme, netloc, parts.path, query if query is not None else parts.query, "")
    )


@asynccontextmanager
async def running_proxy(target_url: str, default_port: int) -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy.for_url(target_url, default_port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


@pytest.fixture
async def redis_proxy(redis_url: str) -> AsyncIterator[TcpProxy]:
    async with running_proxy(redis_url, 6379) as proxy:
        yield proxy
