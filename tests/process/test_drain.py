"""SIGTERM on a served process: every client gets RECONNECT then close 1001."""

from __future__ import annotations

import asyncio
import json
import signal

import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from tests.process.helpers import expect, identified, served


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_drains_every_connection(sig: signal.Signals) -> None:
    with served() as gw:
        clients = []
        for user in ("u1", "u2", "u3"):
            ws, _ = await identified(gw.url, gw.token(user))
            await ws.send(json.dumps({"op": "SUBSCRIBE_SERVER", "d": {"serverId": "s2"}}))
            clients.append(ws)
        fresh = await websockets.connect(gw.url)  # not identified yet
        await expect(fresh, "HELLO")
        clients.append(fresh)
        await asyncio.sleep(0.2)
        gw.terminate(sig)
        for ws in clients:
            ops = []
            with pytest.raises(ConnectionClosed):
                while True:
                    frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    ops.append(frame["op"])
            assert ops[-1] == "RECONNECT", ops
            assert ws.close_code == 1001
        assert await asyncio.to_thread(gw.proc.wait, 15) == 0
