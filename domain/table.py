"""The session table's vocabulary: states, configuration and the typed row.

The tables themselves (and every rule) live in :mod:`domain.session`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from domain.codec import ErrorCode

if TYPE_CHECKING:
    from domain.effects import Effect
    from domain.session import Session


class State(Enum):
    AWAITING_IDENTIFY = "awaiting_identify"
    IDENTIFYING = "identifying"
    READY = "ready"
    #: READY, its connection gone, kept for RESUME (section 13).
    PARKED = "parked"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class SessionConfig:
    identify_timeout: float = 5.0
    heartbeat_interval_ms: int = 30_000
    heartbeat_timeout: float = 60.0
    rate_limit_count: int = 120
    rate_limit_window: float = 60.0
    max_subscriptions: int = 200
    large_server_members: int = 250  # more members: a large server (PROTOCOL 14)
    #: Section 13: how long a parked session is kept (0: resume off), how many sent
    #: dispatches are kept for a resume, and the bounds on what a parked session keeps.
    resume_ttl: float = 120.0
    resume_buffer_frames: int = 1024
    replay_max_frames: int = 2048
    replay_max_bytes: int = 1 << 20


# --- the tables ----------------------------------------------------------------------
#
# Two tables, read like h11's: state -> input type -> Row(action, next state). An
# action is a function of (session, input[, now]) returning effects, or an ErrorCode to
# answer with. ``next_state`` None keeps the state. An input absent from a state's row
# is ignored there. Code is written only for what a row cannot hold (the rate limit,
# malformed frames, which timer fired).

C = TypeVar("C")


@dataclass(frozen=True, slots=True)
class Row(Generic[C]):
    action: Callable[[Session, C, float], list[Effect]] | ErrorCode
    next_state: State | None = None


def row(
    kind: type[C],
    action: Callable[[Session, C, float], list[Effect]] | ErrorCode,
    next_state: State | None = None,
) -> tuple[type, Row[Any]]:
    """A typed row: mypy checks that ``action`` takes a ``kind``."""
    return kind, Row(action, next_state)


def rows(*rows: tuple[type, Row[Any]]) -> dict[type, Row[Any]]:
    return dict(rows)
