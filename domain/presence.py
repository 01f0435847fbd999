"""Presence: one status per user, backed by the user's live sessions on any instance.

The rules (PROTOCOL section 7 and 7a) as one pure function. The memory store calls
it directly; the Redis store implements the same table in Lua so that it runs
atomically, and the shared contract tests hold both to it.

    event            sessions before  stored status after
    ---------------  ---------------  ----------------------------------------
    opened           0                online
    opened           >= 1             unchanged (a new tab changes nothing)
    closed           1 (this one)     offline (key deleted)
    closed           >= 2             unchanged
    set(status)      >= 1             status
    set(status)      0                unchanged (no live session: ignored)
    reaped           (like closed, for every session of a dead instance)

A change is broadcast only when the *visible* status changed (invisible shows as
offline): see :attr:`domain.model.PresenceChange.visible_changed`.
"""

from __future__ import annotations

from enum import Enum

from domain.model import Status


class PresenceEvent(Enum):
    OPENED = "opened"
    CLOSED = "closed"
    SET = "set"


def transition(
    stored: Status,
    sessions_before: int,
    sessions_after: int,
    event: PresenceEvent,
    requested: Status | None = None,
) -> Status:
    """The stored status after ``event``; ``stored`` is OFFLINE when no key exists."""
    if event is PresenceEvent.OPENED:
        return Status.ONLINE if sessions_before == 0 else stored
    if event is PresenceEvent.CLOSED:
        return Status.OFFLINE if sessions_after == 0 else stored
    if requested is None or requested is Status.OFFLINE:
        raise ValueError("SET needs a settable status")
    return requested if sessions_before > 0 else stored
