"""What passes between the session and the shell (see :mod:`domain.session`).

*Effects* are what the session asks the shell to do; *outcomes* are what the shell
reports back once it did it (or a timer fired), through ``Session.report``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from domain.codec import ErrorCode
from domain.model import ChannelId, Server, ServerId, Status, User, UserId

# --- effects: what the shell must do ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Queue this frame (already encoded, ``s`` already stamped) for the client.
    ``error`` names the ERROR code when the frame is an ERROR (for metrics)."""

    text: str
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Close:
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Authenticate:
    """Verify the token, load the user, then call ``identified`` or ``identify_failed``."""

    token: str


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Check membership, route the server's events here, then ``subscribe_confirmed``."""

    server_id: ServerId


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """Stop routing the server's events here (before the UNSUBSCRIBED that follows)."""

    server_id: ServerId


@dataclass(frozen=True, slots=True)
class StartTyping:
    channel_id: ChannelId


@dataclass(frozen=True, slots=True)
class SetPresence:
    status: Status


@dataclass(frozen=True, slots=True)
class Reclaim:
    """RESUME: verify the token, find the session and take it over, then report
    :class:`Adopted` (and attach the connection to it) or :class:`ResumeRefused`."""

    token: str
    session_id: str
    seq: int


@dataclass(frozen=True, slots=True)
class WatchPresence:
    """SUBSCRIBE_PRESENCE (PROTOCOL section 14): replace the connection's presence
    interest for the server and read the listed members' statuses, then report a
    :class:`PresenceSnapshot`. ``subscribed`` is the session's verdict; the shell
    answers NOT_FOUND for an unknown server first, then NOT_SUBSCRIBED."""

    server_id: ServerId
    user_ids: tuple[UserId, ...]
    subscribed: bool


Effect = (
    Send
    | Close
    | Authenticate
    | Subscribe
    | Unsubscribe
    | StartTyping
    | SetPresence
    | Reclaim
    | WatchPresence
)


# --- inputs the shell reports back (outcomes of effects, timers) ---------------------


@dataclass(frozen=True, slots=True)
class Identified:
    """:class:`Authenticate` succeeded: the user, their servers and current status."""

    user: User
    servers: Sequence[Server]
    status: Status


@dataclass(frozen=True, slots=True)
class IdentifyFailed:
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class SubscribeConfirmed:
    """:class:`Subscribe` succeeded: the server's events are routed here."""

    server_id: ServerId


@dataclass(frozen=True, slots=True)
class Refused:
    """An effect the shell could not carry out for the client (FORBIDDEN, NOT_FOUND)."""

    code: ErrorCode
    message: str
    op: str | None


@dataclass(frozen=True, slots=True)
class Removed:
    """The session leaves a server: UNSUBSCRIBE_SERVER, or SERVER_MEMBER_REMOVE."""

    server_id: ServerId


@dataclass(frozen=True, slots=True)
class TimerFired:
    """The identify timer or the heartbeat sweep ran at ``now``."""

    now: float


@dataclass(frozen=True, slots=True)
class ResumeRefused:
    """A RESUME that cannot be honoured: INVALID_SESSION, then IDENTIFY or RESUME again."""

    now: float


@dataclass(frozen=True, slots=True)
class Adopted:
    """A RESUME succeeded: this connection's own (fresh) session is dropped for it."""


@dataclass(frozen=True, slots=True)
class Dropped:
    """The session's connection ended with ``code``, closed by the client or not."""

    code: int | None
    by_client: bool
    now: float


@dataclass(frozen=True, slots=True)
class Reattach:
    """A connection takes the session over from ``seq``; ``rate`` is the stamps of the
    frames that connection sent before (its rate window carries over, 13)."""

    seq: int
    now: float
    rate: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class PresenceSnapshot:
    """:class:`WatchPresence` done: the listed members' visible statuses, in order."""

    server_id: ServerId
    presences: tuple[tuple[UserId, Status], ...]


Outcome = (
    Identified
    | IdentifyFailed
    | SubscribeConfirmed
    | Refused
    | Removed
    | TimerFired
    | ResumeRefused
    | Adopted
    | Dropped
    | Reattach
    | PresenceSnapshot
)
