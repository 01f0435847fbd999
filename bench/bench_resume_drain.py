"""A drain under load, RESUME on against RESUME off, side by side (issue 14).

VIRTUAL TIME, in process: two instances on one memory broker network (the handoff
runs through it as through Redis), N clients on instance A subscribed to s1, a
publisher at R events/s on B; A drains at t = 2 s. With RESUME on the clients RESUME
on B; with it off (GATEWAY_RESUME_TTL_MS=0) they IDENTIFY and SUBSCRIBE again. It
counts what the protocol loses or repeats and how long (virtual) until every client
is live again; it says nothing about CPU cost (no real time passes).

    python bench/bench_resume_drain.py [--clients 1000] [--rate 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json

import anyio
import anyio.abc

from adapters.memory import (
    MemoryBrokerNetwork,
    MemoryDirectory,
    MemoryPresenceStore,
    MemoryTypingGate,
)
from adapters.shell import Backends, Gateway, GatewaySettings, make_gateway
from domain.model import UserId
from domain.ports import InvalidToken
from domain.session import SessionConfig
from entrypoints.config import demo_data
from simulation.clock import VirtualClock
from simulation.transport import MemoryTransport
from simulation.world import new_virtual_loop

USERS = ("u1", "u2", "u3")


class Tokens:
    def verify(self, token: str, now: float) -> UserId:
        if not token.startswith("t:"):
            raise InvalidToken("bad")
        return token[2:]


class Client:
    def __init__(self, run: Run, user: str) -> None:
        self.run, self.user = run, user
        self.sid, self.s = "", 0
        self.events: list[int] = []
        self.transport: MemoryTransport | None = None
        self.live_again_at: float | None = None
        self.resumed = False
        self.presence = 0

    def open(self, gateway: Gateway) -> None:
        self.transport = MemoryTransport(asyncio.get_running_loop(), self, capacity=100_000)
        self.run.group.start_soon(gateway.serve, self.transport)

    def send(self, op: str, d: object) -> None:
        assert self.transport is not None
        self.transport.client_send(json.dumps({"op": op, "d": d}))

    def on_frame(self, text: str) -> None:
        frame = json.loads(text)
        op = frame["op"]
        if op == "HELLO" and not self.sid:
            self.sid = frame["d"]["sessionId"]
        elif op == "MSG":
            self.events.append(frame["d"]["i"])
        elif op == "PRESENCE_UPDATE":
            self.presence += 1
        elif op == "RESUMED":
            self.resumed = True
            self.live_again_at = self.run.clock.monotonic()
        elif op == "SUBSCRIBED" and self.run.drained:
            self.live_again_at = self.run.clock.monotonic()
        if "s" in frame:
            self.s = frame["s"]

    def on_server_close(self, code: int) -> None:
        if code == 1001:
            self.open(self.run.b)
            if self.run.resume:
                self.send("RESUME", {"token": "t:" + self.user, "sessionId": self.sid,
                                     "seq": self.s})
            else:
                self.sid = ""
                self.send("IDENTIFY", {"token": "t:" + self.user})
                self.send("SUBSCRIBE_SERVER", {"serverId": "s1"})


class Run:
    def __init__(self, resume: bool, clients: int, rate: float) -> None:
        self.resume, self.n, self.rate = resume, clients, rate
        self.drained = False
        self.group: anyio.abc.TaskGroup
        self.clock = VirtualClock()

    async def main(self) -> dict[str, float]:
        network, directory = MemoryBrokerNetwork(), MemoryDirectory(demo_data())
        presence = MemoryPresenceStore(self.clock)
        settings = GatewaySettings(
            session=SessionConfig(resume_ttl=120.0 if self.resume else 0.0,
                                  heartbeat_timeout=1e6),
            drain_timeout_ms=10_000,
        )

        def gateway(name: str) -> Gateway:
            backends = Backends(network.client(), MemoryTypingGate(self.clock), presence,
                                directory, Tokens(), self.clock)
            return make_gateway(backends, settings, instance_id=name)

        self.a, self.b = gateway("A"), gateway("B")
        clients = [Client(self, USERS[i % 3]) for i in range(self.n)]
        async with anyio.create_task_group() as group:
            self.group = group
            await group.start(self.a.run)
            await group.start(self.b.run)
            await anyio.sleep(0.1)
            for client in clients:
                client.open(self.a)
                client.send("IDENTIFY", {"token": "t:" + client.user})
                client.send("SUBSCRIBE_SERVER", {"serverId": "s1"})
            await anyio.sleep(1.0)
            for client in clients:
                client.presence = 0
            total = int(self.rate * 6)
            drain_at = int(self.rate * 2)
            started = 0.0
            for i in range(total):
                if i == drain_at:
                    self.drained, started = True, self.clock.monotonic()
                    group.start_soon(self.a.drain)
                await self.b.publish_to_server("s1", {"op": "MSG", "d": {"i": i}})
                await anyio.sleep(1.0 / self.rate)
            await anyio.sleep(3.0)
            group.cancel_scope.cancel()
        expected = set(range(total))
        lost = sum(len(expected - set(c.events)) for c in clients)
        dup = sum(len(c.events) - len(set(c.events)) for c in clients)
        live = [c.live_again_at - started for c in clients if c.live_again_at is not None]
        return {
            "resumed %": 100.0 * sum(c.resumed for c in clients) / len(clients),
            "lost": lost,
            "duplicated": dup,
            "presence frames": sum(c.presence for c in clients),
            "all live again (virtual s)": max(live) if len(live) == len(clients) else -1.0,
        }


def run(resume: bool, clients: int, rate: float) -> dict[str, float]:
    loop = new_virtual_loop()
    r = Run(resume, clients, rate)
    r.clock.bind(loop)
    try:
        return loop.run_until_complete(r.main())
    finally:
        loop.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200.0)
    args = parser.parse_args()
    on = run(True, args.clients, args.rate)
    off = run(False, args.clients, args.rate)
    print(f"drain of A, {args.clients} clients, {args.rate:g} events/s (virtual time)")
    print(f"{'':28} {'RESUME on':>12} {'RESUME off':>12}")
    for key in on:
        print(f"{key:28} {on[key]:>12g} {off[key]:>12g}")


if __name__ == "__main__":
    main()
