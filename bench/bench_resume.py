"""Server time to RESUME with N replayed frames (issue 14 target: p99 <= 20 ms at 100).

In process, memory backends, real time: a session is parked with N events kept, then
a new connection sends RESUME; the time measured runs from the moment the gateway
reads the RESUME frame to the moment its sender writes RESUMED (token check, lookup,
takeover, the N replayed frames and RESUMED through the send queue).

    python bench/bench_resume.py [--frames 100] [--rounds 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Sequence

import anyio

from adapters.memory import (
    MemoryBrokerNetwork,
    MemoryDirectory,
    MemoryPresenceStore,
    MemoryTypingGate,
)
from adapters.shell import Backends, Gateway, make_gateway
from domain.model import UserId
from domain.ports import InvalidToken, TransportClosed
from entrypoints.config import demo_data
from simulation.clock import VirtualClock


class Tokens:
    def verify(self, token: str, now: float) -> UserId:
        if not token.startswith("t:"):
            raise InvalidToken("bad")
        return token[2:]


class Transport:
    def __init__(self) -> None:
        self.inbox: asyncio.Queue[str | None] = asyncio.Queue()
        self.frames: list[dict[str, object]] = []
        self.got = asyncio.Event()
        self.resume_read_at = 0.0
        self.resumed_at = 0.0
        self.waiting_for = ""

    async def receive(self) -> str:
        item = await self.inbox.get()
        if item is None:
            raise TransportClosed(None)
        if '"RESUME"' in item:
            self.resume_read_at = time.perf_counter()
        return item

    async def send(self, text: str) -> None:
        if text.startswith('{"op":"RESUMED"'):
            self.resumed_at = time.perf_counter()
        frame = json.loads(text)
        self.frames.append(frame)
        if frame["op"] == self.waiting_for:
            self.got.set()

    async def send_many(self, texts: Sequence[str]) -> None:
        for text in texts:
            await self.send(text)

    def try_send_many(self, texts: Sequence[str]) -> bool:
        return False  # always through send_many (which never blocks here)

    async def close(self, code: int, reason: str = "") -> None:
        self.inbox.put_nowait(None)

    def abort(self) -> None:
        self.inbox.put_nowait(None)

    async def expect(self, op: str) -> None:
        self.waiting_for = op
        self.got = asyncio.Event()
        if not any(f["op"] == op for f in self.frames):
            await asyncio.wait_for(self.got.wait(), 5)

    def send_op(self, op: str, d: object) -> None:
        self.inbox.put_nowait(json.dumps({"op": op, "d": d}))


async def one_round(gateway: Gateway, group: anyio.abc.TaskGroup, frames: int) -> float:
    first = Transport()
    group.start_soon(gateway.serve, first)
    await first.expect("HELLO")
    sid = str(first.frames[0]["d"]["sessionId"])  # type: ignore[index]
    first.send_op("IDENTIFY", {"token": "t:u1"})
    await first.expect("READY")
    first.send_op("SUBSCRIBE_SERVER", {"serverId": "s1"})
    await first.expect("SUBSCRIBED")
    seq = max(int(f["s"]) for f in first.frames if "s" in f)  # type: ignore[call-overload]
    first.inbox.put_nowait(None)  # TCP loss: parked
    while sid not in gateway.snapshot().parked:  # noqa: ASYNC110 (a bench: polling is fine)
        await asyncio.sleep(0)
    for i in range(frames):
        await gateway.publish_to_server("s1", {"op": "MSG", "d": {"i": i, "pad": "x" * 64}})
    parked = gateway.resumer.sessions[sid].session
    while parked.seq < seq + frames:  # noqa: ASYNC110 (the fan-out kept them all)
        await asyncio.sleep(0.001)
    second = Transport()
    group.start_soon(gateway.serve, second)
    await second.expect("HELLO")
    second.send_op("RESUME", {"token": "t:u1", "sessionId": sid, "seq": seq})
    await second.expect("RESUMED")
    replayed = sum(1 for f in second.frames if f["op"] == "MSG")
    assert replayed == frames, replayed
    elapsed = second.resumed_at - second.resume_read_at
    second.send_op("HEARTBEAT", None)
    second.inbox.put_nowait(None)
    await gateway.resumer.end_all()
    return elapsed


async def main_async(frames: int, rounds: int) -> None:
    clock = VirtualClock()
    clock.bind(asyncio.get_running_loop())
    backends = Backends(
        MemoryBrokerNetwork().client(),
        MemoryTypingGate(clock),
        MemoryPresenceStore(clock),
        MemoryDirectory(demo_data()),
        Tokens(),
        clock,
    )
    gateway = make_gateway(backends)
    times: list[float] = []
    async with anyio.create_task_group() as group:
        await group.start(gateway.run)
        for _ in range(rounds):
            times.append(await one_round(gateway, group, frames))
        group.cancel_scope.cancel()
    times.sort()

    def p(q: float) -> float:
        return times[min(len(times) - 1, int(q * len(times)))] * 1000

    print(
        f"RESUME with {frames} replayed frames, {rounds} rounds: "
        f"p50 {p(0.5):.2f} ms, p99 {p(0.99):.2f} ms, max {times[-1] * 1000:.2f} ms, "
        f"mean {statistics.fmean(times) * 1000:.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    asyncio.run(main_async(args.frames, args.rounds))


if __name__ == "__main__":
    main()
