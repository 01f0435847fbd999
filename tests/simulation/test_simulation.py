"""The seeded simulation: several seeds pass with every fault, runs are reproducible.

Each run is 3 instances x 60 clients x 3 virtual minutes (plus the tail in which the
last timers run out), at twice the default activity and one event from other services
per virtual second so that a small world still sees every fault and every close code:
about a second of wall time.
"""

from __future__ import annotations

from functools import cache

import pytest

from simulation.cli import main
from simulation.faults import (
    ALL_FAULTS,
    CLIENT_FAULTS,
    CRASH,
    DIRECTORY,
    INFRA_FAULTS,
    STORM,
    PlannedFault,
)
from simulation.invariants import INVARIANTS, NO_CRASH
from simulation.world import SimConfig, SimReport, run_simulation

SEEDS = (11, 12, 13, 14, 15)  # 15: a slow consumer (4010) with this fault plan


def config(
    seed: int,
    *,
    instances: int = 3,
    clients: int = 60,
    faults: frozenset[str] = frozenset(ALL_FAULTS),
) -> SimConfig:
    return SimConfig(
        seed=seed,
        instances=instances,
        clients=clients,
        minutes=3.0,
        faults=faults,
        activity=2.0,
        publish_rate=1.0,
    )


@cache
def run(seed: int) -> SimReport:
    return run_simulation(config(seed))


def explain(report: SimReport) -> str:
    lines = [f"seed {report.config.seed}: reproduce with {report.config.command()}"]
    for violation in report.violations[:5]:
        lines.append(f"{violation.invariant} at t={violation.time:.6f}: {violation.message}")
        lines.extend("    " + line[:300] for line in violation.trace[-20:])
    return "\n".join(lines)


@pytest.mark.parametrize("seed", SEEDS)
def test_seed_passes_with_every_fault(seed: int) -> None:
    report = run(seed)
    assert report.ok, explain(report)
    assert report.virtual_seconds >= report.config.active_seconds + report.config.tail_seconds - 1
    assert report.deliveries > 1000
    assert report.events_published > 200


def test_the_runs_exercise_every_fault_and_invariant() -> None:
    reports = [run(seed) for seed in SEEDS]
    faults: set[str] = set()
    checks = dict.fromkeys(INVARIANTS, 0)
    for report in reports:
        faults |= {name for name, count in report.faults.items() if count}
        for name, count in report.checks.items():
            checks[name] += count
    assert faults == set(INFRA_FAULTS) | set(CLIENT_FAULTS)
    unchecked = [name for name, count in checks.items() if not count and name != NO_CRASH]
    assert not unchecked
    closes = {code for report in reports for code in report.closes}
    # Heartbeat timeouts, slow consumers, directory/broker refusals, crashes and drops.
    assert {"4009 server", "4000 server", "1006 crash", "1006 client"} <= closes
    assert any("4010 server" in report.closes for report in reports)


def test_same_seed_same_digest() -> None:
    again = run_simulation(config(SEEDS[0]))
    assert again.ok
    assert again.digest == run(SEEDS[0]).digest
    assert again.trace_lines == run(SEEDS[0]).trace_lines


def test_different_seeds_different_digests() -> None:
    digests = {run(seed).digest for seed in SEEDS}
    assert len(digests) == len(SEEDS)


def test_without_faults() -> None:
    report = run_simulation(config(5, faults=frozenset(), instances=2, clients=40))
    assert report.ok, explain(report)
    assert not report.faults
    assert report.failed_publishes == 0


def test_cli_prints_the_figures(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "--instances",
            "2",
            "--clients",
            "30",
            "--minutes",
            "2",
            "--seed",
            "3",
            "--faults",
            "crash,drop,silent",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    for label in (
        "events published",
        "deliveries",
        "faults injected",
        "invariants checked",
        "trace digest       sha256:",
        "OK: every invariant held",
    ):
        assert label in out
    assert "--seed 3 --faults crash,drop,silent" in out


def test_cli_refuses_unknown_faults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--faults", "crash,meteor"]) == 2
    assert "meteor" in capsys.readouterr().err


def test_presence_converges_when_the_directory_fails_during_a_reap() -> None:
    # Regression: the reap path used to drop the broadcast when the directory failed.
    # Crash an instance at 30 s; the survivor reaps its sessions at 80-120 s, while the
    # directory fails (70-130 s): the users who went offline must still be shown offline.
    fault_plan = (PlannedFault(30.0, CRASH, 30.0), PlannedFault(70.0, DIRECTORY, 60.0))
    report = run_simulation(
        SimConfig(
            seed=1,
            instances=2,
            clients=40,
            minutes=4.0,
            faults=frozenset(),
            fault_plan=fault_plan,
            activity=2.0,
            publish_rate=1.0,
        )
    )
    assert report.ok, explain(report)


def test_a_crash_storm_reconnects_everyone_with_large_servers() -> None:
    """PROTOCOL 15 in the simulation: the busiest instances (a quarter) crash at once
    and their clients reconnect together to the survivors, with large servers
    (PROTOCOL 14) in the population; every invariant holds: each IDENTIFY is answered
    READY within its bound, the server closes only with documented codes, presence
    converges, and nothing leaks."""
    storm = SimConfig(
        seed=21,
        instances=8,
        clients=800,
        minutes=2.0,
        faults=frozenset({STORM}),
        fault_plan=(PlannedFault(30.0, STORM, 20.0),),
    )
    report = run_simulation(storm)
    assert report.ok, explain(report)
    assert report.faults.get(STORM) == 1
    # The storm's clients came back: far more connections than clients.
    assert report.closes.get("1006 crash", 0) >= storm.clients // 8  # two instances' worth
    assert not any(k.startswith("4000") for k in report.closes), report.closes
