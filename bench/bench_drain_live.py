"""A drain under load in REAL time: RESUME on against RESUME off, side by side (issue 14).

Two ``gateway serve`` processes, A and B, on one Redis. N clients (real WebSockets,
one process) IDENTIFY on A and subscribe to their server (servers of ``--group``
members); a publisher PUBLISHes R events/s in all, round robin over the servers,
straight into Redis (PROTOCOL 8). At t = 2 s A gets SIGTERM and drains: RECONNECT,
then 1001. Each client then connects to B and sends RESUME (RESUME on) or IDENTIFY
and SUBSCRIBE_SERVER again (off: ``GATEWAY_RESUME_TTL_MS=0``). Measured per client:
events lost and repeated (each published event must reach every member of its server
exactly once), and the time from the SIGTERM until it is live again (RESUMED, or
SUBSCRIBED after a new READY). The clients' own CPU shares the machine with both
gateways, so the times are an upper bound for the gateway.

    python -m bench.bench_drain_live [--clients 1000] [--rate 200] [--group 10]
                                   [--redis redis://127.0.0.1:6379/15]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import jwt
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bench.common import cpu_seconds, grouped_plan, percentile, write_json
from bench.procs import GATEWAY, Context, Server, kill_all

ROOT = Path(__file__).resolve().parents[1]
DRAIN_AT_S = 2.0
PUBLISH_S = 6.0
SETTLE_S = 3.0


class Client:
    def __init__(self, run: Run, user: str, room: str) -> None:
        self.run, self.user, self.room = run, user, room
        self.token = jwt.encode({"sub": user, "exp": int(time.time()) + 3600},
                                run.secret, algorithm="HS256")
        self.sid, self.s = "", 0
        self.events: list[int] = []
        self.subscribed = asyncio.Event()
        self.live_again_at: float | None = None
        self.resumed = False
        self.refused = 0

    async def send(self, ws: ClientConnection, op: str, d: object) -> None:
        await ws.send(json.dumps({"op": op, "d": d}))

    async def session(self, url: str, *, again: bool) -> None:
        async with connect(url, max_size=None, compression=None, open_timeout=30) as ws:
            hello = json.loads(await ws.recv())
            if again and self.run.resume:
                await self.send(ws, "RESUME", {"token": self.token, "sessionId": self.sid,
                                               "seq": self.s})
            else:
                self.sid = hello["d"]["sessionId"]
                await self.send(ws, "IDENTIFY", {"token": self.token})
                await self.send(ws, "SUBSCRIBE_SERVER", {"serverId": self.room})
            try:
                async for raw in ws:
                    self.on_frame(json.loads(raw), again)
            except ConnectionClosed:
                pass

    def on_frame(self, frame: dict[str, Any], again: bool) -> None:
        op = frame["op"]
        if "s" in frame:
            self.s = frame["s"]
        if op == "MSG":
            self.events.append(frame["d"]["i"])
        elif op == "READY":
            self.sid = frame["d"].get("sessionId", self.sid)
        elif op == "SUBSCRIBED":
            self.subscribed.set()
            if again:
                self.live_again_at = time.monotonic()
        elif op == "RESUMED":
            self.resumed = True
            self.live_again_at = time.monotonic()
        elif op == "INVALID_SESSION":
            self.refused += 1

    async def main(self) -> None:
        await self.session(self.run.a.ws_url, again=False)
        await self.session(self.run.b.ws_url, again=True)


class Run:
    def __init__(self, ctx: Context, resume: bool | int, n: int, rate: float, group: int) -> None:
        self.ctx, self.resume, self.n, self.rate, self.group = ctx, resume, n, rate, group
        self.secret = ctx.jwt_secret
        self.extra_env: dict[str, str] = {}
        self.profile: str | None = None
        self.spy: asyncio.subprocess.Process | None = None

    async def main(self) -> dict[str, float]:
        plan = grouped_plan("d", self.n, self.group)
        fixture = self.ctx.results / "drain-fixture.json"
        write_json(str(fixture), plan.fixture)
        env = {"GATEWAY_RESUME_TTL_MS": "120000" if self.resume else "0",
               "GATEWAY_DRAIN_TIMEOUT_MS": "10000", "GATEWAY_PRESENCE_GRACE_MS": "15000"}
        tag = "on" if self.resume else "off"
        self.a = await Server.start(self.ctx, GATEWAY, fixture=fixture, room="", extra_env=env,
                                    log_name=f"drain-{tag}-A")
        self.b = await Server.start(self.ctx, GATEWAY, fixture=fixture, room="", extra_env=env,
                                    log_name=f"drain-{tag}-B")
        clients = [Client(self, u, r) for u, r in zip(plan.users, plan.rooms, strict=True)]
        rooms = sorted(set(plan.rooms))
        members = {r: sum(1 for c in clients if c.room == r) for r in rooms}
        published: dict[str, list[int]] = {r: [] for r in rooms}
        r = aioredis.from_url(self.ctx.redis_url)
        try:
            tasks = [asyncio.create_task(c.main()) for c in clients]
            await asyncio.wait_for(asyncio.gather(*(c.subscribed.wait() for c in clients)), 120)
            for c in clients:
                c.subscribed.clear()
            total = int(self.rate * PUBLISH_S)
            start = time.monotonic()
            drained_at = 0.0
            for i in range(total):
                if not drained_at and i >= int(self.rate * DRAIN_AT_S):
                    drained_at = time.monotonic()
                    cpu_b = cpu_seconds(self.b.pid)
                    cpu_me = time.process_time()
                    if self.profile:
                        self.spy = await asyncio.create_subprocess_exec(
                            str(Path(self.ctx.python).with_name("py-spy")), "record",
                            "-p", str(self.b.pid), "-r", "250", "-d", str(int(PUBLISH_S)),
                            "--format", "raw", "-o", f"{self.profile}/b-resume-{self.resume}.txt",
                            stdout=asyncio.subprocess.DEVNULL,
                            stderr=asyncio.subprocess.DEVNULL,
                        )
                    os.kill(self.a.pid, signal.SIGTERM)
                room = rooms[i % len(rooms)]
                envelope = {"event": {"op": "MSG", "d": {"i": i}}, "channelId": None,
                            "excludeUserId": None}
                await r.publish(f"ws:server:{room}", json.dumps(envelope))
                published[room].append(i)
                await asyncio.sleep(max(0.0, start + (i + 1) / self.rate - time.monotonic()))
            await asyncio.sleep(SETTLE_S)
            cpu_b = cpu_seconds(self.b.pid) - cpu_b
            cpu_me = time.process_time() - cpu_me
            if self.spy is not None:
                await self.spy.wait()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await r.aclose()
            await self.b.stop()
            await self.a.stop()
        lost = dup = 0
        for c in clients:
            got = set(c.events)
            lost += len(set(published[c.room]) - got)
            dup += len(c.events) - len(got)
        live = sorted(c.live_again_at - drained_at for c in clients if c.live_again_at)
        every = len(live) == len(clients)
        return {
            "deliveries expected": float(sum(len(published[r]) * members[r] for r in rooms)),
            "resumed %": 100.0 * sum(c.resumed for c in clients) / len(clients),
            "INVALID_SESSION": float(sum(c.refused for c in clients)),
            "lost": float(lost),
            "duplicated": float(dup),
            "live again p50 (s)": percentile(live, 50) if live else -1.0,
            "live again p99 (s)": percentile(live, 99) if live else -1.0,
            "all live again (s)": live[-1] if every else -1.0,
            "B CPU from drain (s)": cpu_b,
            "clients' CPU (s)": cpu_me,
        }


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(root=ROOT, results=Path(args.logs or tmp), redis_url=args.redis,
                      jwt_secret=secrets.token_hex(32), gateway_redis=True)
        try:
            runs = [Run(ctx, resume, args.clients, args.rate, args.group) for resume in (1, 0)]
            for run in runs:
                run.extra_env = dict(kv.split("=", 1) for kv in args.env)
                run.profile = args.py_spy
            on = await runs[0].main()
            off = await runs[1].main()
        finally:
            await kill_all()
    print(f"drain of A, {args.clients} clients in servers of {args.group}, "
          f"{args.rate:g} events/s in all (real time; -1 = not every client)")
    print(f"{'':24} {'RESUME on':>12} {'RESUME off':>12}")
    for key in on:
        print(f"{key:24} {on[key]:>12.3f} {off[key]:>12.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--group", type=int, default=10)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--env", action="append", default=[], metavar="GATEWAY_X=V",
                        help="an extra setting for both gateways (repeatable)")
    parser.add_argument("--py-spy", metavar="DIR",
                        help="py-spy B from the drain on, collapsed stacks into DIR")
    parser.add_argument("--logs", help="keep the servers' logs in this folder")
    args = parser.parse_args()
    for folder in (args.logs, args.py_spy):
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
