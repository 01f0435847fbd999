"""The black-box harness: the real app, served by Hypercorn on an ephemeral loopback
port inside the test's event loop, driven by real WebSocket clients.

Fixtures:

* ``harness``: one gateway with memory backends, configured from ``gateway_env``
  (``GATEWAY_*`` overrides; parametrize ``gateway_env`` to change them per test).
* ``start_gateway``: a factory for tests that need their own configuration or a hook
  on the Gateway object before it serves (``customize``).

Every frame a :class:`Client` receives is checked against PROTOCOL section 2: a JSON
object with exactly ``op`` and ``d`` (plus ``s`` for dispatches), control frames with
no ``s`` key at all, and dispatch ``s`` gapless from 1. At teardown every client is
closed and the gateway must be left with no connection, routing entry, broker
subscription or presence session (PROTOCOL 5.5).

Timeouts: frames that must arrive are awaited generously (:data:`WAIT`); only the
"nothing arrives" checks use a short window (:data:`QUIET`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Protocol

import httpx
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from adapters.jwt import JwtIssuer
from adapters.memory import MemoryBroker, MemoryDirectory, MemoryPresenceStore
from adapters.shell import Gateway
from entrypoints.app import create_app
from entrypoints.bootstrap import build_gateway
from entrypoints.config import Config
from entrypoints.serve import serve_app

Frame = dict[str, Any]

#: Generous bound for anything that must happen.
WAIT = 5.0
#: Window for "no frame arrives" checks.
QUIET = 0.3

TEST_SECRET = "blackbox-test-secret-" + "0123456789abcdef" * 4
BASE_ENV: dict[str, str] = {
    "GATEWAY_JWT_SECRET": TEST_SECRET,
    "GATEWAY_DRAIN_TIMEOUT_MS": "2000",
}
CONTROL_OPS = frozenset({"HELLO", "HEARTBEAT_ACK", "ERROR", "RECONNECT", "INVALID_SESSION"})
WS_PATH = "/ws/gateway"


class Closed(AssertionError):
    """The connection closed while a frame was expected."""

    def __init__(self, who: str, code: int | None, reason: str) -> None:
        super().__init__(f"{who}: connection closed (code={code}, reason={reason!r})")
        self.code = code
        self.reason = reason


async def assert_quiet(*clients: Client, within: float = QUIET) -> None:
    """No frame reaches any of these clients within the window (checked together)."""
    await asyncio.gather(*(client.assert_no_frame(within) for client in clients))


async def eventually(
    predicate: Callable[[], bool], *, within: float = WAIT, what: str = "condition"
) -> None:
    """Poll ``predicate`` until it holds (failing after ``within`` seconds)."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.01)


def _close_code(exc: ConnectionClosed) -> tuple[int | None, str]:
    if exc.rcvd is None:
        return None, ""
    return exc.rcvd.code, exc.rcvd.reason


class FrameChecker:
    """PROTOCOL section 2 on every frame received by one connection."""

    def __init__(self, who: str) -> None:
        self.who = who
        self.seq = 0

    def check(self, raw: str | bytes) -> Frame:
        assert isinstance(raw, str), f"{self.who}: server sent a binary frame: {raw!r}"
        frame = json.loads(raw)
        assert isinstance(frame, dict), f"{self.who}: frame is not an object: {raw}"
        op = frame.get("op")
        assert isinstance(op, str), f"{self.who}: frame without a string op: {raw}"
        assert "d" in frame, f"{self.who}: frame without d: {raw}"
        if op in CONTROL_OPS:
            assert set(frame) == {"op", "d"}, f"{self.who}: control frame with extra keys: {raw}"
        else:
            assert set(frame) == {"op", "d", "s"}, f"{self.who}: dispatch keys wrong: {raw}"
            s = frame["s"]
            assert isinstance(s, int) and not isinstance(s, bool), f"{self.who}: bad s: {raw}"
            assert s == self.seq + 1, f"{self.who}: sequence gap: got s={s} after {self.seq}"
            self.seq = s
        return frame


class Client:
    """One WebSocket client (``websockets``) with protocol-checking helpers."""

    def __init__(self, ws: ClientConnection, name: str) -> None:
        self.ws = ws
        self.name = name
        self.checker = FrameChecker(name)
        self.hello: Frame = {}
        self.ready: Frame = {}
        self.user_id: str | None = None

    @property
    def session_id(self) -> str:
        value = self.hello["d"]["sessionId"]
        assert isinstance(value, str)
        return value

    @property
    def seq(self) -> int:
        return self.checker.seq

    # --- sending ------------------------------------------------------------------

    async def send_json(self, value: Any) -> None:
        await self.send_raw(json.dumps(value))

    async def send_op(self, op: str, d: Any = None) -> None:
        await self.send_json({"op": op, "d": d})

    async def send_raw(self, message: str | bytes | Iterable[str] | Iterable[bytes]) -> None:
        try:
            await self.ws.send(message)
        except ConnectionClosed as exc:
            code, reason = _close_code(exc)
            raise Closed(self.name, code, reason) from None

    # --- receiving ----------------------------------------------------------------

    async def recv_json(self, within: float = WAIT) -> Frame:
        try:
            raw = await asyncio.wait_for(self.ws.recv(), within)
        except TimeoutError:
            raise AssertionError(f"{self.name}: no frame within {within}s") from None
        except ConnectionClosed as exc:
            code, reason = _close_code(exc)
            raise Closed(self.name, code, reason) from None
        return self.checker.check(raw)

    async def expect(self, op: str, within: float = WAIT) -> Frame:
        """The next frame, which must have this op."""
        frame = await self.recv_json(within)
        assert frame["op"] == op, f"{self.name}: expected {op}, got {frame}"
        return frame

    async def expect_event(self, op: str, d: Any, within: float = WAIT) -> Frame:
        frame = await self.expect(op, within)
        assert frame["d"] == d, f"{self.name}: {op} with d={frame['d']!r}, expected {d!r}"
        return frame

    async def expect_error(self, code: str, op: str | None, within: float = WAIT) -> Frame:
        frame = await self.expect("ERROR", within)
        d = frame["d"]
        assert isinstance(d, dict) and set(d) == {"code", "message", "op"}, frame
        assert d["code"] == code, f"{self.name}: expected ERROR {code}, got {frame}"
        assert d["op"] == op, f"{self.name}: ERROR op {d['op']!r}, expected {op!r}"
        assert isinstance(d["message"], str) and d["message"], frame
        return frame

    async def assert_no_frame(self, within: float = QUIET) -> None:
        try:
            raw = await asyncio.wait_for(self.ws.recv(), within)
        except TimeoutError:
            return
        except ConnectionClosed as exc:
            code, reason = _close_code(exc)
            raise Closed(self.name, code, reason) from None
        raise AssertionError(f"{self.name}: unexpected frame {raw!r}")

    async def expect_close(self, code: int | None, within: float = WAIT) -> list[Frame]:
        """Read until the server closes; check the close code; return the frames
        received before the close."""
        frames: list[Frame] = []
        deadline = time.monotonic() + within
        while True:
            remaining = deadline - time.monotonic()
            try:
                raw = await asyncio.wait_for(self.ws.recv(), max(remaining, 0.001))
            except TimeoutError:
                raise AssertionError(
                    f"{self.name}: not closed within {within}s (frames: {frames})") from None
            except ConnectionClosed as exc:
                got, reason = _close_code(exc)
                assert got == code, (
                    f"{self.name}: closed with {got} ({reason!r}), expected {code}; "
                    f"frames before: {frames}")
                return frames
            frames.append(self.checker.check(raw))

    # --- protocol conveniences ----------------------------------------------------

    async def heartbeat(self, d: Any = None) -> None:
        """HEARTBEAT -> HEARTBEAT_ACK: also proves the connection still serves."""
        await self.send_op("HEARTBEAT", d)
        ack = await self.expect("HEARTBEAT_ACK")
        assert ack["d"] in (None, {}), ack

    async def identify(self, token: str) -> Frame:
        """IDENTIFY, and the READY it must get (returned)."""
        await self.send_op("IDENTIFY", {"token": token})
        ready = await self.expect("READY")
        assert ready["s"] == 1, ready
        assert ready["d"]["sessionId"] == self.session_id, ready
        self.ready = ready
        self.user_id = ready["d"]["user"]["id"]
        return ready

    async def subscribe(self, server_id: str) -> Frame:
        await self.send_op("SUBSCRIBE_SERVER", {"serverId": server_id})
        return await self.expect_event("SUBSCRIBED", {"serverId": server_id})

    async def unsubscribe(self, server_id: str) -> Frame:
        await self.send_op("UNSUBSCRIBE_SERVER", {"serverId": server_id})
        return await self.expect_event("UNSUBSCRIBED", {"serverId": server_id})

    async def close(self) -> None:
        with contextlib.suppress(TimeoutError, OSError):
            await asyncio.wait_for(self.ws.close(), WAIT)


class RawClient:
    """A WebSocket client on a bare TCP socket: it reads only when asked, so it can
    play a consumer that stopped reading (its receive buffer is kept tiny)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.checker = FrameChecker("raw")

    @classmethod
    async def open(cls, host: str, port: int, *, rcvbuf: int = 4096) -> RawClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock, limit=16 * 1024)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET {WS_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    async def send_frame(self, opcode: int, payload: bytes, *, fin: bool = True) -> None:
        """One masked client frame (opcode 0x1 text, 0x0 continuation, 0x8 close)."""
        mask = os.urandom(4)
        n = len(payload)
        b0 = (0x80 if fin else 0) | opcode
        if n < 126:
            header = struct.pack("!BB", b0, 0x80 | n)
        elif n < 1 << 16:
            header = struct.pack("!BBH", b0, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", b0, 0x80 | 127, n)
        key = (mask * (n // 4 + 1))[:n]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
        self.writer.write(header + mask + masked)
        await self.writer.drain()

    async def send_text(self, text: str) -> None:
        await self.send_frame(0x1, text.encode())

    async def send_op(self, op: str, d: Any = None) -> None:
        await self.send_text(json.dumps({"op": op, "d": d}))

    async def read_frame(self, within: float = WAIT) -> tuple[int, bytes]:
        """One server frame (unmasked): (opcode, payload)."""

        async def read() -> tuple[int, bytes]:
            b0, b1 = await self.reader.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
            return b0 & 0x0F, await self.reader.readexactly(n)

        return await asyncio.wait_for(read(), within)

    async def recv_json(self, within: float = WAIT) -> Frame:
        while True:
            opcode, payload = await self.read_frame(within)
            if opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                raise Closed("raw", code, payload[2:].decode(errors="replace"))
            if opcode in (0x1, 0x0):
                return self.checker.check(payload.decode())

    async def expect(self, op: str, within: float = WAIT) -> Frame:
        frame = await self.recv_json(within)
        assert frame["op"] == op, f"raw: expected {op}, got {frame}"
        return frame

    async def read_close_code(self, within: float = WAIT) -> int | None:
        """Read (and discard) everything until the close frame: its code, or None
        when the stream ended without one."""
        deadline = time.monotonic() + within
        while True:
            remaining = max(deadline - time.monotonic(), 0.001)
            try:
                opcode, payload = await self.read_frame(remaining)
            except asyncio.IncompleteReadError:
                return None
            if opcode == 0x8:
                return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None

    def close(self) -> None:
        self.writer.close()


class GatewayServer:
    """A running app: its port, its Gateway object and client factories."""

    def __init__(self, config: Config, port: int) -> None:
        self.config = config
        self.port = port
        self.host = "127.0.0.1"
        self.app: Any = None
        self.clients: list[Client] = []
        self.raw_clients: list[RawClient] = []
        #: Set to False in a test that deliberately leaves state behind.
        self.check_leaks = True
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        secret = config.effective_jwt_secret()
        assert secret is not None, "the harness mints HS256 tokens"
        self._issuer = JwtIssuer(key=secret, algorithm="HS256")
        self._count = 0

    # --- handles ------------------------------------------------------------------

    @property
    def gateway(self) -> Gateway:
        gateway = self.app.state.gateway
        assert isinstance(gateway, Gateway)
        return gateway

    @property
    def directory(self) -> MemoryDirectory:
        directory = self.gateway.directory
        assert isinstance(directory, MemoryDirectory)
        return directory

    @property
    def presence(self) -> MemoryPresenceStore:
        presence = self.gateway.presence
        assert isinstance(presence, MemoryPresenceStore)
        return presence

    @property
    def broker(self) -> MemoryBroker:
        broker = self.gateway.broker
        assert isinstance(broker, MemoryBroker)
        return broker

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}{WS_PATH}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # --- clients ------------------------------------------------------------------

    def mint(self, user_id: str, ttl: float = 3600.0) -> str:
        """A valid HS256 token signed with the configured secret (``ttl`` < 0: expired)."""
        return self._issuer.issue(user_id, now=time.time(), ttl=ttl)

    async def connect(self, name: str | None = None, **kwargs: Any) -> Client:
        """Open a WebSocket and read HELLO (``kwargs`` go to ``websockets.connect``)."""
        self._count += 1
        options: dict[str, Any] = {
            "proxy": None,
            "ping_interval": None,
            "open_timeout": WAIT,
            "close_timeout": 2,
            # Read everything the server sends (no client-side backpressure): a test
            # that leaves frames unread must not stall the server or the close.
            "max_queue": None,
        }
        options.update(kwargs)
        ws = await ws_connect(self.ws_url, **options)
        client = Client(ws, name or f"client{self._count}")
        self.clients.append(client)
        client.hello = await client.expect("HELLO")
        return client

    async def login(self, user_id: str, name: str | None = None) -> Client:
        """connect() + identify() with a fresh token for ``user_id``."""
        client = await self.connect(name or f"{user_id}#{self._count + 1}")
        await client.identify(self.mint(user_id))
        return client

    async def raw_connect(self) -> RawClient:
        raw = await RawClient.open(self.host, self.port)
        self.raw_clients.append(raw)
        return raw

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.http_url, trust_env=False, timeout=WAIT)

    async def metric(self, name: str) -> float:
        """The value of one sample line of /metrics (0 when absent)."""
        async with self.http() as http:
            text = (await http.get("/metrics")).text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0

    # --- lifecycle ----------------------------------------------------------------

    async def close_clients(self) -> None:
        for raw in self.raw_clients:
            raw.close()
        await asyncio.gather(*(client.close() for client in self.clients))

    async def assert_clean(self) -> None:
        """PROTOCOL 5.5: once every client is gone nothing it held remains."""
        gateway = self.gateway
        await eventually(lambda: not gateway.snapshot().connections, what="all connections to end")
        # Sessions parked for RESUME (section 13: TCP loss, 4009...) hold their routes and
        # presence until they end: end them, then nothing may remain.
        await gateway.resumer.end_all()
        assert gateway.snapshot().parked == frozenset()
        assert gateway.snapshot().servers == {}, gateway.snapshot().servers
        assert gateway.snapshot().users == {}, gateway.snapshot().users
        assert gateway.snapshot().interest == {}, gateway.snapshot().interest
        assert gateway.interest.size() == (0, 0), "presence interest left behind (PROTOCOL 14)"
        # Only the instance's own RESUME handoff channels (section 13) stay subscribed.
        handoff = {"gw:resume", "gw:instance:" + gateway.instance_id}
        if not gateway.resumer.enabled:
            handoff = set()
        assert self.broker.subscribed_channels == handoff, self.broker.subscribed_channels
        assert self.presence.live_sessions() == {}, self.presence.live_sessions()
        assert self.presence.stored_statuses() == {}, self.presence.stored_statuses()

    async def stop(self) -> None:
        """Stop serving (the gateway drains: RECONNECT and 1001 to remaining clients)."""
        self._stop.set()
        task = self._task
        if task is None:
            return
        if task.done():
            task.result()  # surface a serve error
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), 15)
        except TimeoutError:
            task.cancel()
            raise


GatewayHook = Callable[[Gateway], None]


@asynccontextmanager
async def serve_gateway(
    env: Mapping[str, str] | None = None,
    *,
    customize: GatewayHook | None = None,
    port: int = 0,
) -> AsyncIterator[GatewayServer]:
    """Serve the app with memory backends on 127.0.0.1:<ephemeral> until the block ends
    (on ``port`` when given, e.g. to restart a gateway where its clients expect it)."""
    config = Config.from_env({**BASE_ENV, **(env or {})})

    @asynccontextmanager
    async def gateway_factory() -> AsyncIterator[Gateway]:
        async with build_gateway(config) as gateway:
            if customize is not None:
                customize(gateway)
            yield gateway

    app = create_app(config, gateway_factory)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    sock.setblocking(False)
    server = GatewayServer(config, sock.getsockname()[1])
    server.app = app
    started = asyncio.Event()
    # Hypercorn takes ownership of the descriptor it is given (and closes it), so it
    # gets its own duplicate; ours is closed at the end.
    fd = os.dup(sock.fileno())
    task = asyncio.create_task(
        serve_app(app, config, bind=f"fd://{fd}", stop=server._stop,
                  install_signal_handlers=False, on_started=started.set)
    )
    server._task = task
    try:
        waiter = asyncio.create_task(started.wait())
        done, _ = await asyncio.wait({waiter, task}, timeout=WAIT * 2,
                                     return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            waiter.cancel()
            if task.done():
                task.result()  # raise the serve error
            raise AssertionError("the gateway did not start serving")
        await eventually(lambda: server.gateway.snapshot().running, what="the gateway to run")
        check = False
        try:
            yield server
            check = server.check_leaks
        finally:
            await server.close_clients()
            if check:
                await server.assert_clean()
    finally:
        await server.stop()
        sock.close()


class StartGateway(Protocol):
    def __call__(
        self, env: Mapping[str, str] | None = None, *, customize: GatewayHook | None = None
    ) -> Awaitable[GatewayServer]: ...


@pytest.fixture
def gateway_env() -> dict[str, str]:
    """``GATEWAY_*`` overrides for ``harness`` (parametrize this to change them)."""
    return {}


@pytest.fixture
async def harness(gateway_env: dict[str, str]) -> AsyncIterator[GatewayServer]:
    async with serve_gateway(gateway_env) as server:
        yield server


@pytest.fixture
async def start_gateway() -> AsyncIterator[StartGateway]:
    async with AsyncExitStack() as stack:

        async def start(
            env: Mapping[str, str] | None = None, *, customize: GatewayHook | None = None
        ) -> GatewayServer:
            return await stack.enter_async_context(serve_gateway(env, customize=customize))

        yield start
