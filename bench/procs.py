"""Child processes of the benchmark: servers under test and load generators.

Every process started here is registered and killed at the end (:func:`kill_all`),
whatever happened; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import HOST

GATEWAY = "gateway"
CEILING = "ceiling"
SOCKETIO = "socketio"
SYSTEMS = (GATEWAY, CEILING, SOCKETIO)

_LIVE: list[asyncio.subprocess.Process] = []
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the benchmark process dies, however
    it dies (Linux), so that no server or load generator outlives it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


async def _spawn(args: list[str], *, env: dict[str, str], log: Path, pipes: bool,
                 cwd: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as log_fh:
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.PIPE if pipes else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if pipes else log_fh,
            stderr=log_fh,
            env=env,
            cwd=str(cwd),
            limit=64 * 1024 * 1024,
            preexec_fn=_die_with_parent,
        )
    _LIVE.append(proc)
    return proc


async def _terminate(proc: asyncio.subprocess.Process, grace: float) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 5.0)
    if proc in _LIVE:
        _LIVE.remove(proc)


async def kill_all() -> None:
    """Stop every child still running (SIGTERM, then SIGKILL after a short grace)."""
    await asyncio.gather(*(_terminate(p, 3.0) for p in list(_LIVE)))


def kill_all_now() -> None:
    """Synchronous last resort (atexit): SIGKILL whatever is left."""
    for proc in list(_LIVE):
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()


@dataclass
class Context:
    """Run-wide settings every child needs."""

    root: Path
    results: Path
    redis_url: str
    jwt_secret: str
    gateway_redis: bool
    redis_pid: int | None = None

    @property
    def python(self) -> str:
        return sys.executable

    @property
    def gateway_bin(self) -> str:
        return str(Path(sys.executable).with_name("gateway"))

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env["PYTHONPATH"] = str(self.root)
        env["PYTHONUNBUFFERED"] = "1"
        return env


class Server:
    """One server process under test."""

    def __init__(self, system: str, port: int, proc: asyncio.subprocess.Process) -> None:
        self.system = system
        self.port = port
        self.proc = proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def ws_url(self) -> str:
        if self.system == GATEWAY:
            return f"ws://{HOST}:{self.port}/ws/gateway"
        if self.system == CEILING:
            return f"ws://{HOST}:{self.port}/ws"
        return f"ws://{HOST}:{self.port}/socket.io/?EIO=4&transport=websocket"

    @classmethod
    async def start(cls, ctx: Context, system: str, *, fixture: Path, room: str,
                    log_name: str, extra_env: dict[str, str] | None = None) -> Server:
        port = free_port()
        env = ctx.base_env()
        if system == GATEWAY:
            args = [ctx.gateway_bin, "serve", "--host", HOST, "--port", str(port)]
            env.update({
                "GATEWAY_FIXTURES": str(fixture),
                "GATEWAY_JWT_SECRET": ctx.jwt_secret,
                # The runs are short; keep the 60 s heartbeat timeout from closing idle
                # benchmark connections that never send HEARTBEAT.
                "GATEWAY_HEARTBEAT_TIMEOUT_MS": "600000",
            })
            if ctx.gateway_redis:
                env["GATEWAY_REDIS_URL"] = ctx.redis_url
        elif system == CEILING:
            args = [ctx.python, "-m", "bench.baselines.ceiling_app", "--host", HOST,
                    "--port", str(port), "--redis-url", ctx.redis_url,
                    "--channel", f"ws:server:{room}"]
        elif system == SOCKETIO:
            args = [ctx.python, "-m", "bench.baselines.socketio_app", "--host", HOST,
                    "--port", str(port), "--redis-url", ctx.redis_url,
                    "--channel", socketio_channel(room)]
        else:
            raise ValueError(system)
        env.update(extra_env or {})
        proc = await _spawn(args, env=env, log=ctx.results / f"{log_name}.log", pipes=False,
                            cwd=ctx.root)
        server = cls(system, port, proc)
        await server._wait_ready(20.0)
        return server

    async def _wait_ready(self, limit_s: float) -> None:
        path = "/readyz" if self.system == GATEWAY else "/healthz"
        deadline = time.monotonic() + limit_s
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                raise RuntimeError(f"{self.system} exited with {self.proc.returncode}")
            try:
                status, _ = await http_get(self.port, path)
            except OSError as exc:
                last = repr(exc)
            else:
                # socket.io answers other paths with an error status: it is up.
                if status == 200 or self.system == SOCKETIO:
                    return
                last = f"HTTP {status}"
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.system} on port {self.port} not ready: {last}")

    async def metrics(self) -> dict[str, float]:
        """The gateway's Prometheus counters (unlabelled samples and label sums)."""
        _, body = await http_get(self.port, "/metrics")
        out: dict[str, float] = {}
        for line in body.decode().splitlines():
            if not line or line.startswith("#"):
                continue
            name_part, _, value = line.rpartition(" ")
            name = name_part.split("{", 1)[0]
            with contextlib.suppress(ValueError):
                out[name] = out.get(name, 0.0) + float(value)
        return out

    async def stop(self) -> None:
        await _terminate(self.proc, 15.0)


def socketio_channel(room: str) -> str:
    return f"bench-socketio:{room}"


async def http_get(port: int, path: str, limit_s: float = 5.0) -> tuple[int, bytes]:
    async def go() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
                         .encode())
            await writer.drain()
            data = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1]) if head else 0
        return status, body

    try:
        return await asyncio.wait_for(go(), limit_s)
    except TimeoutError as exc:
        raise OSError(f"GET {path} timed out") from exc


class LoadClient:
    """One ``bench.loadgen`` process, driven by JSON lines."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    async def start(cls, ctx: Context, log_name: str) -> LoadClient:
        proc = await _spawn([ctx.python, "-m", "bench.loadgen", "--max-seconds", "900"],
                            env=ctx.base_env(), log=ctx.results / f"{log_name}.log",
                            pipes=True, cwd=ctx.root)
        client = cls(proc)
        hello = await client.read(20.0)
        if not hello.get("started"):
            raise RuntimeError(f"loadgen did not start: {hello}")
        return client

    def send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd, separators=(",", ":")).encode() + b"\n")

    async def read(self, limit_s: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), limit_s)
        except TimeoutError as exc:
            raise RuntimeError(f"loadgen {self.pid}: no reply within {limit_s}s") from exc
        if not line:
            raise RuntimeError(f"loadgen {self.pid} exited ({self.proc.returncode})")
        doc: dict[str, Any] = json.loads(line)
        if doc.get("ok") is False:
            raise RuntimeError(f"loadgen {self.pid}: {doc.get('error')}")
        return doc

    async def call(self, cmd: dict[str, Any], limit_s: float) -> dict[str, Any]:
        self.send(cmd)
        assert self.proc.stdin is not None
        await self.proc.stdin.drain()
        return await self.read(limit_s)

    async def stop(self) -> None:
        if self.proc.returncode is None and self.proc.stdin is not None:
            with contextlib.suppress(OSError, RuntimeError):
                self.send({"cmd": "exit"})
                await self.proc.stdin.drain()
                self.proc.stdin.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 5.0)
        await _terminate(self.proc, 3.0)
