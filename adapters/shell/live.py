"""What belongs to a session, apart from the socket it is attached to.

A :class:`LiveSession` is the shell's half of one client session: the pure
:class:`domain.session.Session` (state, subscriptions, ``s``, rate window, timers)
plus what the shell learnt for it (the user, their servers, whether it is routed and
holds a presence session). The routing indexes, the fan-out and presence keeping
speak of live sessions, never of sockets.

The socket side (transport, sender, outbound queue) is an :class:`Outlet`, attached
with :meth:`LiveSession.attach`. A READY session whose connection drops may be
*parked* (PROTOCOL section 13): it keeps its routes and presence with no outlet, and
:meth:`LiveSession.deliver` keeps what it would have sent until a RESUME attaches it
to another connection (:class:`Adopt`, see :mod:`adapters.shell.resume`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from domain.codec import DispatchTemplate
from domain.effects import Effect
from domain.model import PresenceChange, Server, SessionId, User, UserId
from domain.session import Session, State


@dataclass(frozen=True, slots=True)
class Announce:
    """Shell effect: broadcast a presence change (after the READY queued before it)."""

    change: PresenceChange
    servers: tuple[Server, ...]


@dataclass(frozen=True, slots=True)
class Adopt:
    """Shell effect: the connection takes over ``live`` (a RESUME succeeded) from ``seq``."""

    live: LiveSession
    seq: int


#: What a connection's interpreter runs: the session's effects and the shell's own.
Work = Effect | Announce | Adopt


class Outlet(Protocol):
    """The socket side of a session, as the rest of the shell sees it."""

    #: True once the socket side decided to close (nothing more is queued).
    closing: bool
    #: The code of that close (the server's), or the client's once it closed.
    close_code: int | None

    def enqueue(self, text: str) -> None: ...

    def request_close(self, code: int, reason: str) -> None: ...

    async def perform(self, effects: Sequence[Work]) -> None: ...

    def let_go(self, code: int, reason: str) -> None:
        """Give up the session (taken over elsewhere) and close with ``code``."""
        ...


_READY = State.READY
_PARKED = State.PARKED
_CLOSED = State.CLOSED


class LiveSession:
    __slots__ = (
        "on_overflow",
        "outlet",
        "presence_open",
        "servers",
        "session",
        "user",
        "user_routed",
    )

    def __init__(self, session: Session) -> None:
        self.session = session
        self.outlet: Outlet | None = None
        self.user: User | None = None
        #: The servers the user was a member of at READY (for presence broadcasts).
        self.servers: tuple[Server, ...] = ()
        #: Set once the shell routed ``ws:user:{id}`` here / opened a presence session.
        self.user_routed = False
        self.presence_open = False
        #: Called when a parked session kept more than its bounds (it then ends).
        self.on_overflow: Callable[[LiveSession], None] | None = None

    @property
    def session_id(self) -> SessionId:
        return self.session.session_id

    @property
    def user_id(self) -> UserId | None:
        """The user once READY, or once IDENTIFY found them (routing starts before)."""
        if self.user is not None:
            return self.user.id
        return self.session.user_id

    def attach(self, outlet: Outlet) -> None:
        self.outlet = outlet

    def detach(self) -> None:
        self.outlet = None

    def deliver(self, template: DispatchTemplate) -> bool:
        """Stamp and queue a dispatch (READY sessions with a live outlet only)."""
        outlet = self.outlet
        session = self.session
        if outlet is None:
            parked = session.state is _PARKED
            if parked and not session.keep(template) and self.on_overflow is not None:
                self.on_overflow(self)
            return False
        if outlet.closing or session.state is not _READY:
            if session.was_ready and session.state is _CLOSED:
                # Its socket is closing and it may park (section 13): keep it.
                session.keep(template)
            return False
        outlet.enqueue(session.stamp(template))
        return True
