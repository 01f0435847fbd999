"""The checker in a second process (simulation.offload) gives the in-line run's report:
the same digest, trace lines, checks, counters and verdicts; a run whose checker
process finds a violation, or fails, is run again in line and reports exactly what
the in-line run reports."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from adapters.shell.live import LiveSession
from domain.codec import DispatchTemplate
from simulation import offload
from simulation.cli import main
from simulation.faults import STORM, PlannedFault
from simulation.invariants import EXACTLY_ONCE
from simulation.world import SimConfig, SimReport, run_simulation

pytestmark = pytest.mark.skipif(not offload.usable(), reason="needs fork and two cores")

SMALL = SimConfig(seed=11, instances=3, clients=60, minutes=3.0, activity=2.0, publish_rate=1.0)


def same_outcome(a: SimReport, b: SimReport) -> None:
    assert a.digest == b.digest
    assert a.trace_lines == b.trace_lines
    assert a.checks == b.checks
    # Violations at one instant come in the order the loop ran the connections, which
    # follows their addresses (two in-line runs differ there too): compared as sets.
    assert sorted(_verdicts(a)) == sorted(_verdicts(b))
    assert a.published_by_op == b.published_by_op
    assert a.external == b.external
    assert a.failed_publishes == b.failed_publishes
    assert (a.deliveries, a.frames, a.gateway_deliveries) == (
        b.deliveries,
        b.frames,
        b.gateway_deliveries,
    )
    assert a.closes == b.closes
    assert a.faults == b.faults
    assert a.connections == b.connections
    # (Not the loop's callback count: cancelling the root at the end retries anyio's
    # cancellation a number of times that follows the tasks' addresses.)
    assert a.clock_jumps == b.clock_jumps


def _verdicts(report: SimReport) -> list[tuple[float, str, str, tuple[str, ...]]]:
    return [(v.time, v.invariant, v.message, v.subjects) for v in report.violations]


def both(config: SimConfig) -> tuple[SimReport, SimReport]:
    inline = run_simulation(dataclasses.replace(config, checker_process=False))
    elsewhere = run_simulation(dataclasses.replace(config, checker_process=True))
    return inline, elsewhere


@pytest.mark.parametrize("seed", [11, 12, 15])
def test_same_report_with_the_checker_elsewhere(seed: int) -> None:
    inline, elsewhere = both(dataclasses.replace(SMALL, seed=seed))
    assert inline.ok
    same_outcome(inline, elsewhere)
    assert "checker_process_cpu" in elsewhere.extra
    assert "reran_in_line" not in elsewhere.extra  # the checker process's own verdict


def test_same_report_in_a_crash_storm() -> None:
    # The storm picks its victims by the connections the main process keeps open.
    storm = SimConfig(
        seed=21,
        instances=8,
        clients=300,
        minutes=1.5,
        faults=frozenset({STORM}),
        fault_plan=(PlannedFault(30.0, STORM, 20.0),),
    )
    inline, elsewhere = both(storm)
    assert inline.ok
    same_outcome(inline, elsewhere)
    assert "reran_in_line" not in elsewhere.extra


_deliver = LiveSession.deliver


def _deliver_twice(self: LiveSession, template: DispatchTemplate) -> bool:
    _deliver(self, template)
    return _deliver(self, template)


@pytest.mark.parametrize("stop", [True, False])
def test_a_violation_is_reported_as_in_line(monkeypatch: pytest.MonkeyPatch, stop: bool) -> None:
    monkeypatch.setattr(LiveSession, "deliver", _deliver_twice)
    inline, elsewhere = both(dataclasses.replace(SMALL, stop_on_violation=stop))
    assert inline.violations and inline.violations[0].invariant == EXACTLY_ONCE
    same_outcome(inline, elsewhere)
    assert elsewhere.extra.get("reran_in_line") == 1.0
    assert elsewhere.config.checker_process


def test_a_failing_checker_process_means_a_run_in_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> dict[str, Any]:
        raise RuntimeError("planted: the checker process fails")

    monkeypatch.setattr(offload, "_apply_all", broken)  # only the forked process calls it
    inline, elsewhere = both(SMALL)
    assert inline.ok
    same_outcome(inline, elsewhere)
    assert elsewhere.extra.get("reran_in_line") == 1.0


@pytest.mark.parametrize("choice", ["on", "off"])
def test_cli_checker_process_choice(capsys: pytest.CaptureFixture[str], choice: str) -> None:
    args = ["--instances", "2", "--clients", "30", "--minutes", "1", "--seed", "3"]
    assert main([*args, "--checker-process", choice]) == 0
    out = capsys.readouterr().out
    assert ("in the checker process" in out) == (choice == "on")
    assert "OK: every invariant held" in out


def test_a_record_that_cannot_travel_means_a_run_in_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A batch the pipe cannot carry must not be dropped (the checker process would
    # judge a run with a hole in it): the run is made again in line.
    def unmarshallable(self: offload.CheckerLink, user: str) -> None:
        self.record((offload.TRANSITION, self.clock.ticks, object()))

    monkeypatch.setattr(offload.CheckerLink, "intent_done", unmarshallable)
    inline, elsewhere = both(SMALL)
    assert inline.ok
    same_outcome(inline, elsewhere)
    assert elsewhere.extra.get("reran_in_line") == 1.0


def test_a_client_view_that_differs_from_the_checkers_means_a_run_in_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Planted: the main process forgets that a SUBSCRIBE is pending, so its clients
    # would decide on another view than the checker's. The checker process notices at
    # the next command of that connection; the run is made again in line.
    def forgetful(self: offload.CheckerLink, conn: Any, server: str, text: str) -> None:
        self.record(
            (offload.SUBSCRIBE, self.clock.ticks, conn.key, server, text, *offload._view(conn))
        )

    monkeypatch.setattr(offload.CheckerLink, "sent_subscribe", forgetful)
    inline, elsewhere = both(SMALL)
    assert inline.ok
    same_outcome(inline, elsewhere)
    assert elsewhere.extra.get("reran_in_line") == 1.0
    assert "MirrorDiverged" in elsewhere.rerun_reason
