"""Presence transitions (PROTOCOL section 7 and 7a): every row of the table in
``domain.presence``, and properties over random sequences of session events."""

from __future__ import annotations

from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.model import PresenceChange, Status
from domain.presence import PresenceEvent, transition

ALL_STATUSES = list(Status)
SETTABLE = [Status.ONLINE, Status.IDLE, Status.DND, Status.INVISIBLE]

# --- the table, row by row -------------------------------------------------------------


@pytest.mark.parametrize("stored", ALL_STATUSES)
def test_opened_first_session_goes_online(stored: Status) -> None:
    assert transition(stored, 0, 1, PresenceEvent.OPENED) is Status.ONLINE


@pytest.mark.parametrize("stored", ALL_STATUSES)
@pytest.mark.parametrize("before", [1, 2, 7])
def test_opened_another_session_changes_nothing(stored: Status, before: int) -> None:
    """A new tab of a dnd or invisible user changes nothing (7a)."""
    assert transition(stored, before, before + 1, PresenceEvent.OPENED) is stored


@pytest.mark.parametrize("stored", ALL_STATUSES)
def test_closed_last_session_goes_offline(stored: Status) -> None:
    assert transition(stored, 1, 0, PresenceEvent.CLOSED) is Status.OFFLINE


@pytest.mark.parametrize("stored", ALL_STATUSES)
@pytest.mark.parametrize("before", [2, 3, 9])
def test_closed_one_of_several_sessions_changes_nothing(stored: Status, before: int) -> None:
    assert transition(stored, before, before - 1, PresenceEvent.CLOSED) is stored


def test_reaped_is_like_closed_for_every_session_of_a_dead_instance() -> None:
    """An instance holding 3 of the user's 5 sessions dies: the first two reaps leave
    the status alone; once the user's other sessions close too, offline."""
    status = Status.DND
    sessions = 5
    for _ in range(3):
        status = transition(status, sessions, sessions - 1, PresenceEvent.CLOSED)
        sessions -= 1
    assert status is Status.DND
    status = transition(status, 2, 1, PresenceEvent.CLOSED)
    assert status is Status.DND
    assert transition(status, 1, 0, PresenceEvent.CLOSED) is Status.OFFLINE


@pytest.mark.parametrize("stored", ALL_STATUSES)
@pytest.mark.parametrize("requested", SETTABLE)
@pytest.mark.parametrize("sessions", [1, 2, 5])
def test_set_with_live_sessions_stores_the_status(
    stored: Status, requested: Status, sessions: int
) -> None:
    assert transition(stored, sessions, sessions, PresenceEvent.SET, requested) is requested


@pytest.mark.parametrize("stored", ALL_STATUSES)
@pytest.mark.parametrize("requested", SETTABLE)
def test_set_without_a_live_session_is_ignored(stored: Status, requested: Status) -> None:
    assert transition(stored, 0, 0, PresenceEvent.SET, requested) is stored


@pytest.mark.parametrize("requested", [None, Status.OFFLINE])
def test_set_needs_a_settable_status(requested: Status | None) -> None:
    with pytest.raises(ValueError):
        transition(Status.ONLINE, 1, 1, PresenceEvent.SET, requested)


# --- visibility ------------------------------------------------------------------------


def test_visible_status() -> None:
    assert {s: s.visible for s in Status} == {
        Status.ONLINE: Status.ONLINE,
        Status.IDLE: Status.IDLE,
        Status.DND: Status.DND,
        Status.INVISIBLE: Status.OFFLINE,
        Status.OFFLINE: Status.OFFLINE,
    }


@pytest.mark.parametrize(
    ("before", "after", "changed"),
    [
        (Status.OFFLINE, Status.ONLINE, True),
        (Status.ONLINE, Status.OFFLINE, True),
        (Status.ONLINE, Status.IDLE, True),
        (Status.IDLE, Status.DND, True),
        (Status.ONLINE, Status.INVISIBLE, True),  # others see the user go offline
        (Status.INVISIBLE, Status.ONLINE, True),
        (Status.INVISIBLE, Status.OFFLINE, False),  # an invisible user leaving: no news
        (Status.OFFLINE, Status.INVISIBLE, False),
        (Status.DND, Status.DND, False),  # a repeat update
        (Status.INVISIBLE, Status.INVISIBLE, False),
    ],
)
def test_visible_changed(before: Status, after: Status, changed: bool) -> None:
    assert PresenceChange("u1", before, after).visible_changed is changed


@given(st.sampled_from(ALL_STATUSES), st.sampled_from(ALL_STATUSES))
def test_visible_changed_is_a_change_of_what_others_see(before: Status, after: Status) -> None:
    seen = {Status.INVISIBLE: "offline"}
    assert PresenceChange("u1", before, after).visible_changed == (
        seen.get(before, before.value) != seen.get(after, after.value)
    )


# --- properties over sequences of events -------------------------------------------------

Step = tuple[Literal["open", "close", "set"], Status]
steps = st.lists(
    st.tuples(st.sampled_from(["open", "close", "set"]), st.sampled_from(SETTABLE)),
    max_size=40,
)


@given(steps)
def test_others_see_offline_iff_no_session_or_invisible(events: list[Step]) -> None:
    """Replay open/close/set events of one user through the table and check, after
    each, what others see; and that a broadcast-worthy change happens exactly when the
    visible status moved."""
    stored = Status.OFFLINE
    sessions = 0
    last_set: Status | None = None
    for kind, status in events:
        before = stored
        if kind == "open":
            stored = transition(stored, sessions, sessions + 1, PresenceEvent.OPENED)
            sessions += 1
            if sessions > 1:
                assert stored is before  # a second tab changes nothing
                assert not PresenceChange("u", before, stored).visible_changed
            else:
                last_set = None
        elif kind == "close":
            if sessions == 0:
                continue
            stored = transition(stored, sessions, sessions - 1, PresenceEvent.CLOSED)
            sessions -= 1
        else:
            stored = transition(stored, sessions, sessions, PresenceEvent.SET, status)
            if sessions:
                if last_set is status:  # a repeat update
                    assert not PresenceChange("u", before, stored).visible_changed
                last_set = status
        assert (stored is Status.OFFLINE) == (sessions == 0)
        assert (stored.visible is Status.OFFLINE) == (
            sessions == 0 or stored is Status.INVISIBLE
        )
        if sessions:
            assert stored is (last_set or Status.ONLINE)
        change = PresenceChange("u", before, stored)
        assert change.visible_changed == (before.visible is not stored.visible)
