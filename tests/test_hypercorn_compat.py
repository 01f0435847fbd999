"""The batched send of ``entrypoints.hypercorn_compat`` over a real Hypercorn: one
write for a whole batch, the same frames in the same order, and the close after."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from hypercorn.asyncio import serve
from hypercorn.config import Config
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from adapters.websocket import StarletteTransport
from entrypoints import hypercorn_compat


@contextlib.asynccontextmanager
async def served(app: Starlette) -> AsyncIterator[int]:
    hypercorn_compat.apply()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    sock.close()
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    stop = asyncio.Event()
    task = asyncio.create_task(serve(app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
    for _ in range(200):
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            break
        await asyncio.sleep(0.02)
    try:
        yield port
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_a_batch_is_one_write_with_the_same_frames_and_then_the_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    writes: list[int] = []
    original = hypercorn_compat._send_texts

    async def counting(stream: Any, texts: Sequence[str]) -> None:
        writes.append(len(texts))
        await original(stream, texts)

    monkeypatch.setattr(hypercorn_compat, "_send_texts", counting)
    texts = [f'{{"op":"E","d":{{"i":{i},"pad":"{"é" * (i % 200)}"}}}}' for i in range(300)]

    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        transport = StarletteTransport(websocket, 65536)
        await transport.send_many(texts)
        await transport.close(4321, "done")
        with contextlib.suppress(Exception):
            while True:
                await transport.receive()

    app = Starlette(routes=[WebSocketRoute("/ws", endpoint)])
    async with served(app) as port, connect(f"ws://127.0.0.1:{port}/ws") as ws:
        got = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                got.append(await asyncio.wait_for(ws.recv(), 5))
        assert got == texts
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4321
    assert writes == [300]


async def test_the_batched_send_refuses_after_the_close() -> None:
    refused: list[BaseException] = []

    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        transport = StarletteTransport(websocket, 65536)
        await transport.close(1000)
        try:
            await transport.send_many(["late"])
        except Exception as exc:
            refused.append(exc)

    app = Starlette(routes=[WebSocketRoute("/ws", endpoint)])
    async with served(app) as port, connect(f"ws://127.0.0.1:{port}/ws") as ws:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
    assert len(refused) == 1 and type(refused[0]).__name__ == "TransportClosed"
