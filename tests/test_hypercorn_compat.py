"""The batched sends of ``entrypoints.hypercorn_compat`` over a real Hypercorn: one
write for a whole batch, the same frames in the same order, and the close after; the
write that never waits refuses once the peer stops reading."""

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
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection as WsProtoConnection
from wsproto.events import CloseConnection as WsCloseConnection
from wsproto.events import Request as WsRequest
from wsproto.events import TextMessage as WsTextMessage

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


async def test_the_write_that_cannot_wait_refuses_once_the_peer_stops_reading() -> None:
    """``gateway.write_texts`` writes at once while the socket takes it and returns
    False (writing nothing) once it would have to wait; the awaited send then
    delivers the rest: every frame once, in order."""
    texts = [f"{i:06d}:" + "x" * 1000 for i in range(20_000)]  # far over any socket buffer
    written: list[int] = []
    refused = asyncio.Event()

    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        transport = StarletteTransport(websocket, 65536)
        done = 0
        while done < len(texts) and transport.try_send_many(texts[done : done + 10]):
            done += 10
        written.append(done)
        refused.set()
        await transport.send_many(texts[done:])
        await transport.close(1000)
        with contextlib.suppress(Exception):
            while True:
                await transport.receive()

    app = Starlette(routes=[WebSocketRoute("/ws", endpoint)])
    async with served(app) as port:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        ws = WSConnection(ConnectionType.CLIENT)
        writer.write(ws.send(WsRequest(host="127.0.0.1", target="/ws")))
        # The client reads nothing until the server's write has been refused.
        await asyncio.wait_for(refused.wait(), 10)
        got: list[str] = []
        partial = ""
        closed = False
        while not closed:
            data = await asyncio.wait_for(reader.read(1 << 16), 10)
            assert data, "the server hung up before its close"
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, WsTextMessage):  # wsproto hands over pieces
                    partial += event.data
                    if event.message_finished:
                        got.append(partial)
                        partial = ""
                elif isinstance(event, WsCloseConnection):
                    closed = True
        writer.close()
    (done,) = written
    assert 0 < done < len(texts)
    assert got == texts


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_the_batch_is_framed_byte_for_byte_as_wsproto_frames_it(size: int) -> None:
    """The batch's own framing (no wsproto per frame) against wsproto's, at every
    length encoding's edges and with multi-byte text."""

    class Stream:
        connection = WsProtoConnection(ConnectionType.SERVER)

    texts = ["a" * size, "é" * (size // 2), "x", "€" * (size // 3)]
    server = WsProtoConnection(ConnectionType.SERVER)
    expected = b"".join(server.send(WsTextMessage(data=t)) for t in texts)
    assert hypercorn_compat._frames(Stream(), texts) == expected
