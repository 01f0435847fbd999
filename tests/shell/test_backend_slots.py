"""PROTOCOL 15 in process (virtual time): a shell-wide bound on the backend calls that
client operations make (``GatewaySettings.backend_concurrency``). An operation waits
for a slot with no timer running, and while it waits its connection's reader takes
no frame: the rest of that client's frames wait in its socket. A storm of operations
against a backend whose pool is small is slowed, never answered ERROR UNAVAILABLE."""

from __future__ import annotations

from dataclasses import replace

import anyio

from adapters.shell import GatewaySettings
from domain.effects import StartTyping
from tests.shell.fakes import FakeTransport, World, run_virtual

SETTINGS = GatewaySettings(backend_timeout_ms=1_000, backend_concurrency=2)


class SlowGate:
    """A typing gate behind a pool of ``size`` connections, ``latency`` per call."""

    def __init__(self, size: int, latency: float) -> None:
        self._pool = anyio.CapacityLimiter(size)
        self.latency = latency
        self.in_flight = 0
        self.most_in_flight = 0
        self.done = 0
        self.claimed: set[str] = set()

    async def claim(self, key: str, ttl_ms: int) -> bool:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            async with self._pool:
                await anyio.sleep(self.latency)
        finally:
            self.in_flight -= 1
            self.done += 1
        fresh = key not in self.claimed
        self.claimed.add(key)
        return fresh


def _slow_typing(world: World, gate: SlowGate) -> None:
    typing = world.gateway.handlers.table[StartTyping].__self__  # type: ignore[attr-defined]
    typing._gate = gate


def test_a_typing_storm_on_a_small_pool_is_slowed_not_refused() -> None:
    """40 TYPING_STARTs at once, a pool of 2 at 0.4 s a call: 8 s of work, each call
    bounded by 1 s. Unbounded, most would wait past 1 s in the pool and be answered
    ERROR UNAVAILABLE (and their events lost); two at a time, every one is carried out
    and the typing events reach the watcher."""
    gate = SlowGate(size=2, latency=0.4)

    async def storm(world: World) -> None:
        _slow_typing(world, gate)
        watcher = await world.login("u3", "s1")
        typists: list[FakeTransport] = []
        for i in range(40):
            typist = await world.login(f"u{1 + i % 2}")
            typists.append(typist)
        for i, typist in enumerate(typists):
            await typist.send_op("TYPING_START", {"channelId": "c1" if (i // 2) % 2 else "c2"})
        await world.until(lambda: gate.done == 40, "every claim carried out")
        assert gate.most_in_flight <= 2
        for typist in typists:
            assert [f for f in typist.pending() if f["op"] == "ERROR"] == []
            assert typist.close_code is None
        # 2 users x 2 channels: 4 fresh claims, 4 events to the watcher.
        await anyio.sleep(0.1)
        typing = [f for f in watcher.pending() if f["op"] == "TYPING_START"]
        assert len(typing) == 4, typing
        slots = world.gateway.backend_slots
        assert slots.waiting == 0 and slots.admitted == 0
        assert world.gateway.metrics.backend_failures.labels("typing")._value.get() == 0

    run_virtual(storm, SETTINGS)


def test_frames_behind_a_waiting_operation_wait_in_the_socket() -> None:
    """One slot, held 3 s by alice's TYPING_START: bob's TYPING_START waits for it, and
    bob's HEARTBEAT behind it is not read (no ACK) until bob's operation ran; then
    it is answered, in order. A client that leaves while waiting leaves the wait."""
    gate = SlowGate(size=1, latency=3.0)
    settings = replace(SETTINGS, backend_concurrency=1, backend_timeout_ms=5_000)

    async def scenario(world: World) -> None:
        _slow_typing(world, gate)
        slots = world.gateway.backend_slots
        alice = await world.login("u1")
        bob = await world.login("u2")
        carol = await world.login("u3")
        await alice.send_op("TYPING_START", {"channelId": "c1"})
        await world.until(lambda: slots.admitted == 1, "alice holds the slot")
        await bob.send_op("TYPING_START", {"channelId": "c1"})
        await bob.send_op("HEARTBEAT")
        await carol.send_op("TYPING_START", {"channelId": "c1"})
        await world.until(lambda: slots.waiting == 2, "bob and carol wait")
        carol.drop()
        await world.until(lambda: slots.waiting == 1, "carol left the wait")
        await anyio.sleep(2.0)
        assert bob.pending() == []  # the HEARTBEAT is still in bob's socket
        assert (await bob.event())["op"] == "HEARTBEAT_ACK"  # once bob's typing ran
        assert gate.done >= 2 and gate.most_in_flight == 1
        await world.until(lambda: slots.admitted == 0 and slots.waiting == 0, "all done")
        assert world.gateway.metrics.backend_failures.labels("typing")._value.get() == 0

    run_virtual(scenario, settings)
