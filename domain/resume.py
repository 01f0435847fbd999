"""The session table's resume rows (PROTOCOL section 13), kept apart from
:mod:`domain.session` so that file stays readable in one sitting.

Two sessions take part in a RESUME. The *new connection's own* session (fresh, in
AWAITING_IDENTIFY) sends RESUME (:func:`resume`, a :class:`Reclaim` effect) and then
either learns :class:`ResumeRefused` (INVALID_SESSION; back to AWAITING_IDENTIFY, the
identify deadline restarting) or :class:`Adopted` (it is dropped: the connection now
serves the resumed session). The *resumed* session, PARKED or READY (a zombie whose
connection is closed 4014), takes :class:`Reattach`: every kept dispatch with
``s > seq`` with its original ``s``, then RESUMED. A READY session whose connection
closed reports :class:`Dropped` and parks when :func:`domain.replay.parks` says so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from domain.codec import INVALID_SESSION_FRAME, DispatchTemplate, Resume
from domain.effects import (
    Adopted,
    Dropped,
    Effect,
    Reattach,
    Reclaim,
    ResumeRefused,
    Send,
    TimerFired,
)
from domain.replay import parks
from domain.table import State

if TYPE_CHECKING:
    from domain.session import Session


def resume(session: Session, command: Resume, now: float) -> list[Effect]:
    return [Reclaim(command.token, command.session_id, command.seq)]


def resume_refused(session: Session, outcome: ResumeRefused, now: float) -> list[Effect]:
    # "as if it had just connected": IDENTIFY within the timeout of the INVALID_SESSION.
    session.connected_at = outcome.now
    return [Send(INVALID_SESSION_FRAME)]


def adopted(session: Session, outcome: Adopted, now: float) -> list[Effect]:
    return []


def drop(session: Session, outcome: Dropped, now: float) -> list[Effect]:
    if (
        session.was_ready
        and session.config.resume_ttl > 0
        and parks(outcome.code, outcome.by_client)
    ):
        session.state = State.PARKED
        session.parked_at = outcome.now
        session.replay.park(session.seq + 1)
    return []


def reattach(session: Session, outcome: Reattach, now: float) -> list[Effect]:
    assert session.replay.covers(outcome.seq, session.seq), "checked by can_resume"
    effects: list[Effect] = [Send(frame) for frame in session.replay.after(outcome.seq)]
    session.replay.attach()
    session.last_heartbeat = outcome.now
    session.rate.merge(outcome.rate)
    body = {"sessionId": session.session_id, "replayed": len(effects)}
    effects.append(Send(session.dispatch("RESUMED", body)))
    return effects


def parked_timer(session: Session, outcome: TimerFired, now: float) -> list[Effect]:
    """The TTL of a parked session ran out: it ends (the shell releases it)."""
    if outcome.now >= session.parked_at + session.config.resume_ttl:
        session.state = State.CLOSED
    return []


# --- a session handed in from another instance (not table rows: no input drives them) --


def arrive(session: Session, user_id: str, subscriptions: list[str], now: float) -> None:
    """A session parked on another instance is coming here: it is PARKED at once (it
    keeps, from ``s`` 1, what reaches it here) until its owner's frames arrive."""
    session.user_id = user_id
    session.subscriptions = set(subscriptions)
    session.was_ready = True
    session.state = State.PARKED
    session.parked_at = now
    session.replay.park(1)


def hand_in(
    session: Session,
    earlier: list[tuple[int, DispatchTemplate]],
    next_s: int,
    parked_from: int | None,
    rate: tuple[float, ...] = (),
) -> None:
    """The owner's kept frames (``s`` < ``next_s``): ours continue after them; ``rate``
    is the owner's rate window in this instance's time (it carries over, PROTOCOL 13)."""
    session.replay.hand_in(earlier, next_s - 1, parked_from)
    session.rate.merge(rate)
    session.seq += next_s - 1
