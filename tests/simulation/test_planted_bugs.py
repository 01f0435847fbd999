"""Proof that the simulation bites: plant a known bug, expect the right invariant.

Each bug is planted by monkeypatching the real class for one run of a seed that passes
without it (see test_simulation.py), and the run must report the invariant that the
bug breaks, first, and nothing unrelated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest

from adapters.memory import MemoryPresenceStore, MemoryTypingGate
from adapters.shell.live import LiveSession
from adapters.shell.outbound import Outbound
from adapters.shell.routing import Routes
from domain.codec import DispatchTemplate
from domain.model import PresenceChange, ServerId
from simulation.cli import main
from simulation.faults import STORM, PlannedFault
from simulation.invariants import (
    EXACTLY_ONCE,
    IDENTIFY,
    LEAKS,
    OUTBOUND,
    PRESENCE,
    RECIPIENTS,
    REPLIES,
    TYPING,
)
from simulation.world import SimConfig, run_simulation

SEED = 11
CONFIG = SimConfig(
    seed=SEED,
    instances=3,
    clients=60,
    minutes=3.0,
    activity=2.0,
    publish_rate=1.0,
    stop_on_violation=False,
)
ARGS = [
    "--instances",
    "3",
    "--clients",
    "60",
    "--minutes",
    "3",
    "--seed",
    str(SEED),
    "--activity",
    "2",
    "--publish-rate",
    "1",
]


async def _claim_always(self: MemoryTypingGate, key: str, ttl_ms: int) -> bool:
    return True  # typing dedup off: every TYPING_START is "new"


async def _reap_nothing(self: MemoryPresenceStore) -> list[PresenceChange]:
    return []  # a dead instance's sessions are never dropped


_deliver = LiveSession.deliver


def _deliver_twice(self: LiveSession, template: DispatchTemplate) -> bool:
    _deliver(self, template)
    return _deliver(self, template)


def _unroute_nothing(self: Routes, live: LiveSession, server_id: ServerId) -> None:
    return None  # subscriptions are never released


async def _unroute_now_nothing(self: Routes, live: LiveSession, server_id: ServerId) -> None:
    return None  # ... not even when the connection ends


def _leak_subscriptions(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(Routes, "unroute", _unroute_nothing)
    mp.setattr(Routes, "unroute_now", _unroute_now_nothing)


def _flush_keeps_the_mark(self: Outbound) -> None:
    _flush(self)
    self._ready = True  # a lost wake-up: its next frames never ask the flusher again


_flush = Outbound.flush
_send_and_close = Outbound._send_and_close
#: The sender task each connection keeps under the planted "old" design, and its wake.
_wakes: dict[int, anyio.Event] = {}


def _flush_to_a_sender(self: Outbound) -> None:
    self._ready = False
    if not self.ended and self._sender_scope is None:
        self._sender_scope = anyio.CancelScope()
        self._flusher.spawn(self._sender, self._sender_scope)


def _waking(method: Callable[..., None]) -> Callable[..., None]:
    def waking(self: Outbound, *args: Any) -> None:
        method(self, *args)
        wake = _wakes.pop(id(self), None)
        if wake is not None:
            wake.set()

    return waking


async def _sender_for_ever(self: Outbound) -> None:
    while True:  # the old design: a sender task per connection, waiting at rest
        await _send_and_close(self)
        if self.closing or self.ended:
            return
        wake = _wakes[id(self)] = anyio.Event()
        if not self.outbound:
            await wake.wait()


def _a_sender_per_connection(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(Outbound, "flush", _flush_to_a_sender)
    mp.setattr(Outbound, "enqueue", _waking(Outbound.enqueue))
    mp.setattr(Outbound, "_schedule", _waking(Outbound._schedule))
    mp.setattr(Outbound, "_send_and_close", _sender_for_ever)


BUGS: dict[str, tuple[Callable[[pytest.MonkeyPatch], None], str, set[str]]] = {
    "typing dedup off": (
        lambda mp: mp.setattr(MemoryTypingGate, "claim", _claim_always),
        TYPING,
        {TYPING},
    ),
    "no presence cleanup on crash": (
        lambda mp: mp.setattr(MemoryPresenceStore, "reap", _reap_nothing),
        PRESENCE,
        {PRESENCE, LEAKS},
    ),
    "double delivery": (
        lambda mp: mp.setattr(LiveSession, "deliver", _deliver_twice),
        EXACTLY_ONCE,
        {EXACTLY_ONCE},
    ),
    # Visible first as events after UNSUBSCRIBED, then as routes left at the end.
    # Its frames then never leave: the handshakes, replies and presence fail after it.
    "a flushed connection stays marked ready (lost wake-up)": (
        lambda mp: mp.setattr(Outbound, "flush", _flush_keeps_the_mark),
        OUTBOUND,
        {OUTBOUND, IDENTIFY, REPLIES, PRESENCE},
    ),
    "a sender task per connection at rest": (
        _a_sender_per_connection,
        OUTBOUND,
        {OUTBOUND},
    ),
    "subscription leak": (
        _leak_subscriptions,
        RECIPIENTS,
        {RECIPIENTS, LEAKS},
    ),
}


@pytest.mark.parametrize("bug", list(BUGS))
def test_planted_bug_is_reported(monkeypatch: pytest.MonkeyPatch, bug: str) -> None:
    plant, first, names = BUGS[bug]
    plant(monkeypatch)
    report = run_simulation(CONFIG)
    assert report.violations, f"{bug} went unnoticed"
    assert report.violations[0].invariant == first
    assert {v.invariant for v in report.violations} == names
    assert report.violations[0].trace  # a trace to reproduce it


def test_cli_exits_1_with_seed_invariant_and_trace(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(LiveSession, "deliver", _deliver_twice)
    code = main(ARGS)
    out = capsys.readouterr().out
    assert code == 1
    assert f"VIOLATION {EXACTLY_ONCE} at t=" in out
    assert f"seed {SEED}" in out
    command = f"gateway simulate --instances 3 --clients 60 --minutes 3 --seed {SEED}"
    assert f"reproduce: {command}" in out
    assert "trace (time in µs" in out


def test_heartbeats_held_while_queued_for_admission_are_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PROTOCOL 15, our reading: a HEARTBEAT sent while the IDENTIFY waits for admission
    is ACKed at once. Planted: the connection no longer recognises a HEARTBEAT while a
    handshake runs, so it is held with the other frames until READY. In a storm the
    survivors' user lookups are slow (simulation.faults.STORM_LOOKUP_S), handshakes
    queue across virtual time, and the held ACKs show as late replies."""
    import adapters.shell.connection as connection

    # 2 instances, one crashes: its 200 clients queue on the other (16 at a time).
    storm = SimConfig(
        seed=21,
        instances=2,
        clients=400,
        minutes=1.5,
        faults=frozenset({STORM}),
        fault_plan=(PlannedFault(30.0, STORM, 20.0),),
        stop_on_violation=False,
    )
    assert run_simulation(storm).ok  # without the bug
    monkeypatch.setattr(connection, "decode_command", lambda raw: None)
    report = run_simulation(storm)
    assert report.violations, "held HEARTBEAT_ACKs went unnoticed"
    assert {v.invariant for v in report.violations} == {REPLIES}
    assert "HEARTBEAT_ACK" in report.violations[0].message
