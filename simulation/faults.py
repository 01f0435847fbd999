"""Fault injection: names, the plan, and the adapters that make faults possible.

Infrastructure faults (scheduled by the world from the plan below):

``crash``          an instance dies without cleanup: its broker connection drops
                   (``MemoryBroker.close``), its ports stop answering, its tasks and
                   connections are cancelled; the presence registry keeps its sessions
                   until their liveness expires and a surviving instance reaps them.
``broker-outage``  ``MemoryBrokerNetwork.down`` for a while: publishes and new
                   subscriptions fail, delayed deliveries due in the outage are lost.
``delay``          each instance's broker link gets a latency for a while (FIFO per
                   link, as a TCP connection to Redis would): cross-instance skew.
``directory``      ``MemoryDirectory.failing`` for a while.

Client faults (behaviours of the virtual clients): ``drop`` (vanish without a close),
``silent`` (stop heartbeating), ``slow`` (stop reading).
"""

from __future__ import annotations

import asyncio
import random
import types
from collections import deque
from collections.abc import Callable, Collection, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from adapters.memory import MemoryBroker, MemoryBrokerNetwork
from domain.model import (
    Channel,
    ChannelId,
    DirectoryData,
    InstanceId,
    Member,
    PresenceChange,
    Server,
    ServerContext,
    ServerId,
    SessionId,
    Status,
    User,
    UserId,
)
from domain.ports import (
    BackendUnavailable,
    Directory,
    MessageHandler,
    PresenceStore,
    TypingGate,
)

CRASH = "crash"
BROKER_OUTAGE = "broker-outage"
DELAY = "delay"
DROP = "drop"
SILENT = "silent"
SLOW = "slow"
DIRECTORY = "directory"
#: A quarter of the instances (the busiest; at least one, never all) crash at once:
#: their clients reconnect together, an IDENTIFY storm on the survivors (PROTOCOL 15).
STORM = "storm"
#: During a storm the survivors' directory answers each user lookup this much later
#: (the backends are loaded too): the handshakes queue for admission across virtual
#: time, long enough for their clients' HEARTBEATs to arrive while queued.
STORM_LOOKUP_S = 1.5

INFRA_FAULTS = (CRASH, BROKER_OUTAGE, DELAY, DIRECTORY, STORM)
CLIENT_FAULTS = (DROP, SILENT, SLOW)
ALL_FAULTS: tuple[str, ...] = (
    CRASH, BROKER_OUTAGE, DELAY, DROP, SILENT, SLOW, DIRECTORY, STORM
)

#: Largest latency a delay fault gives a broker link.
MAX_DELAY = 0.8


def parse_faults(text: str) -> frozenset[str]:
    """``"crash,delay"`` -> names; ``"all"`` / ``""`` / ``"none"`` as expected."""
    text = text.strip()
    if text in ("", "none"):
        return frozenset()
    if text == "all":
        return frozenset(ALL_FAULTS)
    names = {n.strip() for n in text.split(",") if n.strip()}
    unknown = names - set(ALL_FAULTS)
    if unknown:
        raise ValueError(
            f"unknown fault(s): {', '.join(sorted(unknown))} (known: {', '.join(ALL_FAULTS)})"
        )
    return frozenset(names)


# --- the record of what was injected, for the invariants -----------------------------


#: FaultLog.windows(): outages, directory failures, delays, storms, latency horizon.
FaultWindows = tuple[
    list[list[float]], list[list[float]], list[list[float]], list[list[float]], float
]


class FaultLog:
    """Windows of declared faults (end = +inf while ongoing) and counters."""

    def __init__(self) -> None:
        self.outages: list[list[float]] = []
        self.directory: list[list[float]] = []
        #: [start, end, largest link latency]
        self.delays: list[list[float]] = []
        #: [start, end] of the storms' slow directory
        self.storms: list[list[float]] = []
        self.counts: dict[str, int] = {}
        self._latency_until = -1.0

    def count(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1

    def windows(self) -> FaultWindows:
        """A copy of what the invariants read (every window; not the counters)."""
        return (
            [list(w) for w in self.outages],
            [list(w) for w in self.directory],
            [list(w) for w in self.delays],
            [list(w) for w in self.storms],
            self._latency_until,
        )

    def restore(self, windows: FaultWindows) -> None:
        """Take the windows of another log (:meth:`windows`)."""
        self.outages, self.directory, self.delays, self.storms, self._latency_until = windows

    @staticmethod
    def _during(windows: list[list[float]], a: float, b: float) -> bool:
        return any(w[0] <= b and w[1] >= a for w in windows)

    def broker_down_during(self, a: float, b: float) -> bool:
        return self._during(self.outages, a, b)

    def directory_failing_during(self, a: float, b: float) -> bool:
        return self._during(self.directory, a, b)

    def backend_fault_during(self, a: float, b: float) -> bool:
        return self.broker_down_during(a, b) or self.directory_failing_during(a, b)

    def storm_wait(self, identify_at: float) -> float:
        """How long an IDENTIFY sent at ``identify_at`` may queue for admission: 0, or
        up to a minute after the storm it met (PROTOCOL 15: READY however long)."""
        ends = [w[1] for w in self.storms if w[0] - 1.0 <= identify_at <= w[1]]
        return max(ends, default=identify_at) - identify_at + (60.0 if ends else 0.0)

    def delay_started(self, now: float, latency: float) -> None:
        self.delays.append([now, float("inf"), latency])
        self._latency_until = float("inf")

    def delay_ended(self, now: float) -> None:
        self.delays[-1][1] = now
        self._latency_until = max((w[1] + w[2] for w in self.delays), default=-1.0)

    def latency_bound(self, p: float) -> float:
        """How late a message published at ``p`` may reach an instance (0 without delay)."""
        if p > self._latency_until:
            return 0.0
        return max((w[2] for w in self.delays if w[0] <= p <= w[1] + w[2]), default=0.0)


# --- the broker: a delay hook and a crash switch ---------------------------------------


@types.coroutine
def _one_pass() -> Generator[None, None, None]:
    """One pass through the loop: what ``asyncio.sleep(0)`` does, without the coroutine
    it makes on every call (one per broker message and instance)."""
    yield


class BrokerHooks(Protocol):
    def published(self, channel: str, payload: bytes) -> None: ...

    def publish_failed(self, channel: str, payload: bytes) -> None: ...


class SimBroker(MemoryBroker):
    """One instance's broker connection with a link latency (FIFO) and crash semantics.

    The network's semantics are unchanged: at most once, per-channel fan-out, publishes
    fail during an outage. A delayed message that comes due during an outage, or after
    the instance crashed, is lost (as unread bytes on a dropped Redis connection).

    Messages reach the reader (:meth:`run`) through a plain FIFO and one future, with
    the memory stream's schedule: one pass through the loop before each message, none
    after a wait (the anyio stream's ``receive`` spends most of its cost finding the
    async backend, on every message)."""

    def __init__(
        self, network: MemoryBrokerNetwork, hooks: BrokerHooks, loop: asyncio.AbstractEventLoop
    ) -> None:
        super().__init__(network)
        self._hooks = hooks
        self._loop = loop
        self.latency = 0.0
        self._backlog: deque[tuple[float, str, bytes]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self.dropped = 0
        self._inbox: deque[tuple[str, bytes]] = deque()
        self._waiter: asyncio.Future[None] | None = None

    @property
    def network(self) -> MemoryBrokerNetwork:
        return self._network

    async def publish(self, channel: str, payload: bytes) -> None:
        if self.closed:
            raise BackendUnavailable("instance crashed")
        try:
            self._network.publish(channel, payload)
        except BackendUnavailable:
            self._hooks.publish_failed(channel, payload)
            raise
        # Deliveries are only queued so far: nothing was fanned out yet.
        self._hooks.published(channel, payload)

    async def subscribe(self, channel: str) -> None:
        if self.closed:
            raise BackendUnavailable("instance crashed")
        await super().subscribe(channel)

    def _push(self, channel: str, payload: bytes) -> None:
        """A message reaches this instance's reader."""
        if self.closed:
            return
        self._inbox.append((channel, payload))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def run(self, handler: MessageHandler) -> None:
        inbox = self._inbox
        while True:
            await _one_pass()  # the stream's checkpoint before each receive
            if not inbox:
                if self.closed:
                    return
                waiter = self._waiter = self._loop.create_future()
                try:
                    await waiter
                finally:
                    self._waiter = None
                if not inbox:  # closed while waiting
                    return
            channel, payload = inbox.popleft()
            await handler(channel, payload)

    def _deliver(self, channel: str, payload: bytes) -> None:
        if self.closed:
            return
        backlog = self._backlog
        if self.latency <= 0.0 and not backlog:
            self._push(channel, payload)
            return
        due = self._loop.time() + self.latency
        if backlog and backlog[-1][0] > due:
            due = backlog[-1][0]
        backlog.append((due, channel, payload))
        if self._timer is None:
            self._timer = self._loop.call_at(backlog[0][0], self._release)

    def _release(self) -> None:
        self._timer = None
        backlog = self._backlog
        now = self._loop.time() + 1e-9
        while backlog and backlog[0][0] <= now:
            _, channel, payload = backlog.popleft()
            if self.closed or self._network.down:
                self.dropped += 1
            else:
                self._push(channel, payload)
        if backlog:
            self._timer = self._loop.call_at(backlog[0][0], self._release)

    def close(self) -> None:
        super().close()
        self._backlog.clear()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


# --- ports of one instance: a crashed process talks to nobody --------------------------


class Life:
    __slots__ = ("dead", "slow")

    def __init__(self) -> None:
        self.dead = False
        #: Seconds a user lookup takes (a storm's loaded directory; 0: at once).
        self.slow = 0.0

    def check(self) -> None:
        if self.dead:
            raise BackendUnavailable("instance crashed")


class InstancePresence:
    """The shared presence store as seen from one instance; every transition it returns
    is also reported to ``observe`` (the checker counts visible changes)."""

    def __init__(
        self, inner: PresenceStore, life: Life, observe: Callable[[PresenceChange], None]
    ) -> None:
        self._inner = inner
        self._life = life
        self._observe = observe

    async def session_opened(
        self, instance_id: InstanceId, user_id: UserId, session_id: SessionId
    ) -> PresenceChange:
        self._life.check()
        change = await self._inner.session_opened(instance_id, user_id, session_id)
        self._observe(change)
        return change

    async def session_closed(
        self, instance_id: InstanceId, user_id: UserId, session_id: SessionId
    ) -> PresenceChange:
        self._life.check()
        change = await self._inner.session_closed(instance_id, user_id, session_id)
        self._observe(change)
        return change

    async def set_status(self, user_id: UserId, status: Status) -> PresenceChange:
        self._life.check()
        change = await self._inner.set_status(user_id, status)
        self._observe(change)
        return change

    async def get_status(self, user_id: UserId) -> Status:
        self._life.check()
        return await self._inner.get_status(user_id)

    async def get_statuses(self, user_ids: Sequence[UserId]) -> list[Status]:
        self._life.check()
        return await self._inner.get_statuses(user_ids)

    async def keep_alive(self, instance_id: InstanceId, ttl_ms: int) -> bool:
        self._life.check()
        return await self._inner.keep_alive(instance_id, ttl_ms)

    async def reap(self) -> list[PresenceChange]:
        self._life.check()
        changes = await self._inner.reap()
        for change in changes:
            self._observe(change)
        return changes

    async def ping(self) -> None:
        self._life.check()
        await self._inner.ping()


class InstanceTypingGate:
    def __init__(self, inner: TypingGate, life: Life) -> None:
        self._inner = inner
        self._life = life

    async def claim(self, key: str, ttl_ms: int) -> bool:
        self._life.check()
        return await self._inner.claim(key, ttl_ms)


class InstanceDirectory:
    def __init__(self, inner: Directory, life: Life) -> None:
        self._inner = inner
        self._life = life

    async def get_user(self, user_id: UserId) -> User | None:
        self._life.check()
        if self._life.slow:
            await asyncio.sleep(self._life.slow)
            self._life.check()
        return await self._inner.get_user(user_id)

    async def find_user(self, id_or_username: str) -> User | None:
        self._life.check()
        return await self._inner.find_user(id_or_username)

    async def get_user_servers(self, user_id: UserId) -> list[Server]:
        self._life.check()
        return await self._inner.get_user_servers(user_id)

    async def get_server_context(self, server_id: ServerId) -> ServerContext | None:
        self._life.check()
        return await self._inner.get_server_context(server_id)

    async def get_channel(self, channel_id: ChannelId) -> Channel | None:
        self._life.check()
        return await self._inner.get_channel(channel_id)

    async def get_members(
        self, server_id: ServerId, user_ids: Collection[UserId]
    ) -> Mapping[UserId, Member]:
        self._life.check()
        return await self._inner.get_members(server_id, user_ids)

    async def set_user_status(self, user_id: UserId, status: Status) -> None:
        self._life.check()
        await self._inner.set_user_status(user_id, status)

    async def load(self, data: DirectoryData) -> None:
        self._life.check()
        await self._inner.load(data)

    async def ping(self) -> None:
        self._life.check()
        await self._inner.ping()


# --- the plan of infrastructure faults ---------------------------------------------


@dataclass(frozen=True, slots=True)
class PlannedFault:
    at: float
    kind: str
    duration: float


def plan(
    rng: random.Random, faults: frozenset[str], active: float, instances: int
) -> list[PlannedFault]:
    """Infrastructure faults spread over ``[20 s, active - 45 s]``; every one is over
    (instances restarted, outages ended) before the clients leave at ``active``."""
    start, end = 20.0, max(25.0, active - 45.0)
    span = end - start
    minutes = active / 60.0
    planned: list[PlannedFault] = []

    def spread(kind: str, per_minute: float, lo: float, hi: float) -> None:
        count = max(1, round(minutes * per_minute))
        for i in range(count):
            slot_end = start + span * (i + 1) / count
            at = start + span * (i + rng.random() * 0.7) / count
            # Windows of one kind never overlap, and all end before ``end``.
            duration = max(0.5, min(rng.uniform(lo, hi), slot_end - at - 0.1))
            planned.append(PlannedFault(round(at, 6), kind, round(duration, 6)))

    if CRASH in faults and instances >= 2:
        spread(CRASH, 0.25, 15.0, 40.0)
    if BROKER_OUTAGE in faults:
        spread(BROKER_OUTAGE, 0.3, 2.0, 12.0)
    if DELAY in faults:
        spread(DELAY, 0.3, 10.0, 40.0)
    if DIRECTORY in faults:
        spread(DIRECTORY, 0.3, 2.0, 10.0)
    if STORM in faults and instances >= 2:
        spread(STORM, 0.15, 15.0, 40.0)
    planned.sort(key=lambda f: (f.at, f.kind))
    return planned
