"""RESUME in simulation (PROTOCOL section 13): seeded, virtual time, several instances.

Instances share one memory broker network, presence store and directory. Clients
(users u1-u3, all subscribed to s1) read every frame; a publisher sends numbered
events to s1 from random instances all along. Faults, from the seed: a client's TCP
connection drops (it RESUMEs on a random instance after a short delay), a client
opens a second connection and RESUMEs there while the first still lives (a zombie
takeover, the first must close 4014), and one instance drains (its clients get
RECONNECT and 1001 and RESUME elsewhere). Some clients drop and never come back.

Invariants, checked on every frame and at the end:

- ``exact``: the dispatches a session sees across all its connections are exactly what
  one connection that never dropped would have seen: ``s`` continues by one (nothing
  missing, nothing twice), and the events are every event published since it
  subscribed, once, in publish order;
- ``invalid-session``: INVALID_SESSION never comes (every RESUME here is allowed by
  section 13: within the TTL, right user and ``seq``, its owner alive);
- ``no-flap``: a watcher that never drops sees no PRESENCE_UPDATE once everyone is in;
- ``no-leak``: once the TTL has passed after the last drop, no instance holds a parked
  session and the abandoned users are offline.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass, field

import anyio

from adapters.memory import (
    MemoryBrokerNetwork,
    MemoryDirectory,
    MemoryPresenceStore,
    MemoryTypingGate,
)
from adapters.shell import Backends, Gateway, GatewaySettings, make_gateway
from domain.fixtures import parse_directory
from domain.model import Status, UserId
from domain.ports import InvalidToken
from domain.session import SessionConfig
from simulation.clock import VirtualClock
from simulation.transport import MemoryTransport
from simulation.world import new_virtual_loop

USERS = ("u1", "u2", "u3")
TTL = 20.0
_DIRECTORY = {
    "users": [{"id": u, "username": u, "displayName": u, "avatarUrl": None} for u in USERS],
    "servers": [{"id": "s1", "name": "Home", "ownerId": "u1", "iconUrl": None}],
    "roles": [],
    "members": [{"serverId": "s1", "userId": u, "roleIds": []} for u in USERS],
    "channels": [],
}


class _Tokens:
    def verify(self, token: str, now: float) -> UserId:
        if not token.startswith("t:"):
            raise InvalidToken("not a simulation token")
        return token[2:]


@dataclass
class ResumeReport:
    seed: int
    violations: list[str] = field(default_factory=list)
    resumes: int = 0
    takeovers: int = 0
    drained: int = 0
    events: int = 0

    @property
    def ok(self) -> bool:
        return not self.violations


class _Conn:
    """One connection of a simulated client (the Peer of its MemoryTransport)."""

    def __init__(self, client: _Client) -> None:
        self.client = client
        self.closed_with: int | None = None

    def on_frame(self, text: str) -> None:
        self.client.frame(self, json.loads(text))

    def on_server_close(self, code: int) -> None:
        self.closed_with = code
        self.client.server_closed(self, code)


class _Client:
    def __init__(self, sim: ResumeSim, user: str, name: str) -> None:
        self.sim, self.user, self.name = sim, user, name
        self.sid = ""
        self.s = 0
        self.events: list[int] = []
        self.conn: _Conn | None = None
        self.transport: MemoryTransport | None = None
        self.subscribed = False
        self.abandoned = False

    def fail(self, what: str) -> None:
        self.sim.report.violations.append(f"{self.name}: {what}")

    def open(self, gateway: Gateway) -> _Conn:
        conn = _Conn(self)
        transport = MemoryTransport(asyncio.get_running_loop(), conn, capacity=10_000)
        self.sim.group.start_soon(gateway.serve, transport)
        self.conn, self.transport = conn, transport
        return conn

    def frame(self, conn: _Conn, frame: dict[str, object]) -> None:
        op, s = frame["op"], frame.get("s")
        if conn is not self.conn:
            return  # a zombie's late frames: the new connection replays them
        if op == "HELLO" and not self.sid:
            self.sid = str(frame["d"]["sessionId"])  # type: ignore[index]
        if op == "INVALID_SESSION":
            self.fail("INVALID_SESSION for a RESUME section 13 allows")
        if s is None:
            return
        if s != self.s + 1:
            self.fail(f"s {s} after {self.s}: a gap or a duplicate")
        self.s = int(s)  # type: ignore[call-overload]
        if op == "SUBSCRIBED":
            self.subscribed = True
        elif op == "MSG":
            i = int(frame["d"]["i"])  # type: ignore[index]
            if self.events and i != self.events[-1] + 1:
                self.fail(f"event {i} after {self.events[-1]}: not exactly once in order")
            self.events.append(i)
        elif op == "RESUMED":
            self.sim.report.resumes += 1

    def server_closed(self, conn: _Conn, code: int) -> None:
        if conn is self.conn and code == 1001:  # a drain: RESUME elsewhere
            self.sim.report.drained += 1
            self.sim.later(self.sim.rng.uniform(0.05, 0.5), self.resume)
        elif conn is self.conn and code not in (1000,):
            self.fail(f"closed {code}")

    def send(self, op: str, d: object) -> None:
        if self.transport is not None:
            self.transport.client_send(json.dumps({"op": op, "d": d}))

    def resume(self) -> None:
        self.open(self.sim.pick())
        self.send("RESUME", {"token": "t:" + self.user, "sessionId": self.sid, "seq": self.s})

    def drop(self, come_back: bool) -> None:
        if self.transport is not None:
            self.transport.client_close(1006)  # TCP loss: no close frame
        self.conn = None
        if come_back:
            self.sim.later(self.sim.rng.uniform(0.1, 3.0), self.resume)
        else:
            self.abandoned = True

    def take_over(self) -> None:
        old = self.conn
        self.resume()
        self.sim.later(2.5, self._check_zombie, old)
        self.sim.report.takeovers += 1

    def _check_zombie(self, old: _Conn | None) -> None:
        if old is not None and old.closed_with not in (4014, 1001):
            self.fail(f"the zombie connection was not closed 4014 ({old.closed_with})")


class _Watcher(_Client):
    """Never drops; records every PRESENCE_UPDATE it sees."""

    def __init__(self, sim: ResumeSim, user: str, name: str) -> None:
        super().__init__(sim, user, name)
        self.flaps: list[str] = []

    def frame(self, conn: _Conn, frame: dict[str, object]) -> None:
        if frame["op"] == "PRESENCE_UPDATE":
            self.flaps.append(str(frame["d"]))


class ResumeSim:
    def __init__(self, seed: int, instances: int = 3, clients: int = 12) -> None:
        self.rng = random.Random(seed)
        self.report = ResumeReport(seed)
        self.n_instances, self.n_clients = instances, clients
        self.gateways: list[Gateway] = []
        self.draining: set[int] = set()
        self.group: anyio.abc.TaskGroup

    def pick(self) -> Gateway:
        choices = [i for i in range(len(self.gateways)) if i not in self.draining]
        return self.gateways[self.rng.choice(choices)]

    def later(self, delay: float, callback: object, *args: object) -> None:
        asyncio.get_running_loop().call_later(delay, callback, *args)  # type: ignore[arg-type]

    async def run(self, clock: VirtualClock) -> ResumeReport:
        network, directory = MemoryBrokerNetwork(), MemoryDirectory(parse_directory(_DIRECTORY))
        presence = MemoryPresenceStore(clock)
        settings = GatewaySettings(
            session=SessionConfig(resume_ttl=TTL), drain_timeout_ms=10_000
        )
        for i in range(self.n_instances):
            backends = Backends(
                network.client(), MemoryTypingGate(clock), presence, directory, _Tokens(), clock
            )
            self.gateways.append(make_gateway(backends, settings, instance_id=f"i{i}"))
        async with anyio.create_task_group() as group:
            self.group = group
            for gateway in self.gateways:
                await group.start(gateway.run)
            await anyio.sleep(0.1)
            await self._scenario(presence)
            group.cancel_scope.cancel()
        return self.report

    async def _scenario(self, presence: MemoryPresenceStore) -> None:
        rng, report = self.rng, self.report
        watcher = _Watcher(self, "u2", "watcher")
        flaps = watcher.flaps
        clients = [_Client(self, USERS[i % 3], f"c{i}") for i in range(self.n_clients)]
        for client in [*clients, watcher]:
            gateway = self.gateways[0] if client is watcher else self.pick()
            client.open(gateway)
            await anyio.sleep(0.01)
            client.send("IDENTIFY", {"token": "t:" + client.user})
            client.send("SUBSCRIBE_SERVER", {"serverId": "s1"})
            await anyio.sleep(0.05)
        await anyio.sleep(1.0)
        flaps.clear()  # everyone is in: from now on no presence may move
        published = 0
        drain_at = rng.uniform(5.0, 15.0)
        for step in range(600):  # 30 s at 20 events/s
            await self.gateways[rng.randrange(len(self.gateways))].publish_to_server(
                "s1", {"op": "MSG", "d": {"i": published}}
            )
            published += 1
            t = step * 0.05
            if rng.random() < 0.02:
                victim = rng.choice([c for c in clients if c.conn and not c.abandoned])
                victim.drop(come_back=rng.random() < 0.9)
            elif rng.random() < 0.01:
                victim = rng.choice([c for c in clients if c.conn and not c.abandoned])
                victim.take_over()
            if t >= drain_at and not self.draining:
                self.draining.add(len(self.gateways) - 1)
                self.group.start_soon(self.gateways[-1].drain)
            await anyio.sleep(0.05)
        report.events = published
        await anyio.sleep(5.0)  # every resume done, every event delivered
        for client in clients:
            if client.abandoned or not client.subscribed:
                continue
            if not client.events or client.events[-1] != published - 1:
                client.fail(f"missed the last events (saw up to {client.events[-1:]})")
        if flaps:
            report.violations.append(f"no-flap: the watcher saw presence move: {flaps[:3]}")
        await anyio.sleep(TTL + 2.0)
        for i, gateway in enumerate(self.gateways):
            if gateway.snapshot().parked:
                report.violations.append(f"no-leak: i{i} still parks past the TTL")
        everyone = [*clients, watcher]
        for user in USERS:  # a user all of whose connections were abandoned is offline
            gone = all(c.abandoned for c in everyone if c.user == user)
            if gone and await presence.get_status(user) is not Status.OFFLINE:
                report.violations.append(f"no-leak: {user} still online")


def run_resume_simulation(seed: int, instances: int = 3, clients: int = 12) -> ResumeReport:
    loop = new_virtual_loop()
    clock = VirtualClock()
    clock.bind(loop)
    try:
        return loop.run_until_complete(ResumeSim(seed, instances, clients).run(clock))
    finally:
        loop.close()
