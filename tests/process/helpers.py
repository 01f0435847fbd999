"""Helpers to run ``gateway serve`` as a real process and talk to it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection

from adapters.jwt import JwtIssuer
from tests.support.net import free_port

SECRET = "process-test-secret-0123456789abcdef"


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited early with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"gateway did not listen on {port}")


@dataclass
class ServedGateway:
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/gateway"

    def token(self, user_id: str, ttl: float = 600.0) -> str:
        return JwtIssuer(key=SECRET).issue(user_id, now=time.time(), ttl=ttl)

    def terminate(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)


@contextlib.contextmanager
def served(env: Mapping[str, str] | None = None, *, workers: int = 1) -> Iterator[ServedGateway]:
    port = free_port()
    full_env = {
        **os.environ,
        "GATEWAY_PORT": str(port),
        "GATEWAY_JWT_SECRET": SECRET,
        "GATEWAY_WORKERS": str(workers),
        **(env or {}),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "entrypoints.cli", "serve"],
        env=full_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_port(port, proc)
        yield ServedGateway(proc, port)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()


async def recv_json(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    import asyncio

    raw = await asyncio.wait_for(ws.recv(), timeout)
    frame: dict[str, Any] = json.loads(raw)
    return frame


async def expect(ws: ClientConnection, op: str, timeout: float = 5.0) -> dict[str, Any]:
    frame = await recv_json(ws, timeout)
    assert frame["op"] == op, frame
    return frame


async def identified(url: str, token: str) -> tuple[ClientConnection, dict[str, Any]]:
    ws = await websockets.connect(url)
    await expect(ws, "HELLO")
    await ws.send(json.dumps({"op": "IDENTIFY", "d": {"token": token}}))
    ready = await expect(ws, "READY")
    return ws, ready
