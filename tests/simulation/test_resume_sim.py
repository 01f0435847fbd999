"""The RESUME simulation (simulation/resume_sim.py): seeds pass, and planted bugs in
the handoff's seam and the replay are reported."""

from __future__ import annotations

from typing import Any

import pytest

import adapters.shell.handoff as handoff
from domain.replay import ReplayBuffer
from simulation.resume_sim import run_resume_simulation


@pytest.mark.parametrize("seed", [1, 2])
def test_seed_passes(seed: int) -> None:
    report = run_resume_simulation(seed)
    assert report.ok, report.violations[:5]
    # It exercised what it checks: resumes after drops, takeovers and a drain.
    assert report.resumes >= 10 and report.takeovers >= 1 and report.drained >= 1


def _no_route_at_the_cut(self: handoff.Handoff, incoming: Any, channel: str) -> None:
    incoming.waiting.discard(channel)  # B sees its marker but its route never starts


def _no_renumbering(
    session: Any, earlier: Any, next_s: int, parked_from: int | None, rate: Any = ()
) -> None:
    session.replay.hand_in(earlier, next_s - 1, parked_from)  # s not moved past A's
    session.rate.merge(rate)


def _replay_one_too_many(self: ReplayBuffer, seq: int) -> Any:
    for s, template in self.items():
        if s >= seq:  # the frame the client already has, again
            yield template.frame(s)


@pytest.mark.parametrize(
    ("target", "name", "bug", "expected"),
    [
        (handoff.Handoff, "_marker_here", _no_route_at_the_cut, "missed the last events"),
        (handoff, "hand_in", _no_renumbering, "INVALID_SESSION"),
        (ReplayBuffer, "after", _replay_one_too_many, "a gap or a duplicate"),
    ],
    ids=["seam: no route at the marker", "seam: no renumbering", "replay: off by one"],
)
def test_planted_bug_is_reported(
    monkeypatch: pytest.MonkeyPatch, target: object, name: str, bug: object, expected: str
) -> None:
    monkeypatch.setattr(target, name, bug)
    report = run_resume_simulation(1)
    assert not report.ok
    assert any(expected in v for v in report.violations), report.violations[:5]
