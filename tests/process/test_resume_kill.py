"""SIGKILL of the instance that holds a parked session: a RESUME on another
instance is INVALID_SESSION (never a partial replay), and IDENTIFY still works.
Two real gateway processes on one real Redis (PROTOCOL 13)."""

from __future__ import annotations

import asyncio
import json
import signal

import pytest
import websockets

from tests.process.helpers import expect, identified, recv_json, served

pytestmark = pytest.mark.redis


async def test_sigkill_of_the_owner_means_invalid_session_elsewhere(redis_url: str) -> None:
    env = {"GATEWAY_REDIS_URL": redis_url}
    with served(env) as owner, served(env) as other:
        ws, ready = await identified(owner.url, owner.token("u1"))
        sid = ready["d"]["sessionId"]
        await ws.send(json.dumps({"op": "SUBSCRIBE_SERVER", "d": {"serverId": "s1"}}))
        subscribed = await expect(ws, "SUBSCRIBED")
        ws.transport.abort()  # TCP loss: parked on the owner
        await asyncio.sleep(0.3)
        owner.terminate(signal.SIGKILL)
        await asyncio.to_thread(owner.proc.wait, 10)
        client = await websockets.connect(other.url)
        await expect(client, "HELLO")
        resume = {"token": other.token("u1"), "sessionId": sid, "seq": subscribed["s"]}
        await client.send(json.dumps({"op": "RESUME", "d": resume}))
        assert await recv_json(client, 10) == {"op": "INVALID_SESSION", "d": {"resumable": False}}
        await client.send(json.dumps({"op": "IDENTIFY", "d": {"token": other.token("u1")}}))
        assert (await expect(client, "READY"))["s"] == 1
        await client.close()
