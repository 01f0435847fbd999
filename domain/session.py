"""The per-connection session state machine (PROTOCOL sections 3-7a).

Everything that decides how one connection behaves lives in this file: which client
op is allowed in which state, the identify deadline, heartbeat bookkeeping, the
sliding-window rate limit, the subscription set and its cap, and the dispatch
sequence numbers. It is a sans-IO machine in the style of h11: the :class:`Session`
owns no socket, reads no clock and performs no I/O. Each method takes the current
time where time matters, updates the session's own state and returns the
:data:`Effect` values the shell must carry out, in order.

Theory of operation::

    connect ──► AWAITING_IDENTIFY ──IDENTIFY──► IDENTIFYING ──identified()──► READY
                     │  deadline (4003)               │ identify_failed() (4004/4000)
                     ▼                                ▼
                   CLOSED ◄───────────── close() / rate limit / heartbeat ───────
    RESUME (section 13): READY ─close, Dropped─► PARKED ─Reattach─► READY; PARKED ─TTL,
    kept too much─► CLOSED; the RESUME's own connection: see :mod:`domain.resume`.

Two tables hold the transitions: :data:`OP_TABLE` maps (state, client command) and
:data:`OUTCOME_TABLE` maps (state, shell outcome) to a :class:`Row` of (action, next
state); code is written only for what a table cannot hold. Work that needs the outside
world (verifying the token, checking membership, claiming a typing key, changing
presence) is returned as an effect; the shell carries it out and reports the outcome
back with :meth:`Session.report` (:class:`Identified`, :class:`IdentifyFailed`,
:class:`SubscribeConfirmed`, :class:`Refused`, :class:`Removed`, :class:`TimerFired`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from domain.codec import (
    CLIENT_OPS,
    HEARTBEAT_ACK_FRAME,
    CloseCode,
    Command,
    DispatchTemplate,
    ErrorCode,
    Heartbeat,
    Identify,
    PresenceUpdate,
    ProtocolError,
    Resume,
    SubscribeServer,
    TypingStart,
    UnsubscribeServer,
    decode_command,
    dispatch_template,
    encode_control,
    encode_error,
    op_name,
)
from domain.effects import (
    Adopted,
    Authenticate,
    Close,
    Dropped,
    Effect,
    Identified,
    IdentifyFailed,
    Outcome,
    Reattach,
    Refused,
    Removed,
    ResumeRefused,
    Send,
    SetPresence,
    StartTyping,
    Subscribe,
    SubscribeConfirmed,
    TimerFired,
    Unsubscribe,
)
from domain.interest_rows import PRESENCE_OP, PRESENCE_OUTCOME
from domain.model import Server, ServerId, SessionId, Status, User, UserId
from domain.rate_limit import SlidingWindow
from domain.replay import ReplayBuffer
from domain.resume import adopted, drop, parked_timer, reattach, resume, resume_refused
from domain.table import Row, SessionConfig, State
from domain.table import row as _row
from domain.table import rows as _rows

__all__ = ["OP_TABLE", "OUTCOME_TABLE", "Row", "Session", "SessionConfig", "State"]


def _ack(session: Session, command: Heartbeat, now: float) -> list[Effect]:
    session.last_heartbeat = now
    return [Send(HEARTBEAT_ACK_FRAME)]


def _identify(session: Session, command: Identify, now: float) -> list[Effect]:
    return [Authenticate(command.token)]


def _subscribe(session: Session, command: SubscribeServer, now: float) -> list[Effect]:
    sid = command.server_id
    if sid in session.subscriptions:  # idempotent, and never counts toward the cap
        return [Send(session.dispatch("SUBSCRIBED", {"serverId": sid}))]
    cap = session.config.max_subscriptions
    if len(session.subscriptions) >= cap:
        return session.refuse(
            ErrorCode.TOO_MANY_SUBSCRIPTIONS,
            f"at most {cap} subscriptions per connection",
            "SUBSCRIBE_SERVER",
        )
    return [Subscribe(sid)]


def _unsubscribe(session: Session, command: UnsubscribeServer, now: float) -> list[Effect]:
    return session.report(Removed(command.server_id))


def _typing(session: Session, command: TypingStart, now: float) -> list[Effect]:
    return [StartTyping(command.channel_id)]


def _presence(session: Session, command: PresenceUpdate, now: float) -> list[Effect]:
    return [SetPresence(command.status)]


_NOT_AUTHENTICATED = ErrorCode.NOT_AUTHENTICATED
_ALREADY_AUTHENTICATED = ErrorCode.ALREADY_AUTHENTICATED

#: Client commands: state -> command type -> row.
OP_TABLE: dict[State, dict[type, Row[Any]]] = {
    State.AWAITING_IDENTIFY: _rows(
        _row(Identify, _identify, State.IDENTIFYING),
        _row(Resume, resume, State.IDENTIFYING),
        _row(Heartbeat, _ack),
        _row(SubscribeServer, _NOT_AUTHENTICATED),
        _row(UnsubscribeServer, _NOT_AUTHENTICATED),
        _row(TypingStart, _NOT_AUTHENTICATED),
        _row(PresenceUpdate, _NOT_AUTHENTICATED),
        _row(PRESENCE_OP[0], _NOT_AUTHENTICATED),
    ),
    State.IDENTIFYING: _rows(
        _row(Identify, _ALREADY_AUTHENTICATED),
        _row(Resume, _ALREADY_AUTHENTICATED),
        _row(Heartbeat, _ack),
        _row(SubscribeServer, _NOT_AUTHENTICATED),
        _row(UnsubscribeServer, _NOT_AUTHENTICATED),
        _row(TypingStart, _NOT_AUTHENTICATED),
        _row(PresenceUpdate, _NOT_AUTHENTICATED),
        _row(PRESENCE_OP[0], _NOT_AUTHENTICATED),
    ),
    State.READY: _rows(
        _row(Identify, _ALREADY_AUTHENTICATED),
        _row(Resume, _ALREADY_AUTHENTICATED),
        _row(Heartbeat, _ack),
        _row(SubscribeServer, _subscribe),
        _row(UnsubscribeServer, _unsubscribe),
        _row(TypingStart, _typing),
        _row(PresenceUpdate, _presence),
        _row(*PRESENCE_OP),
    ),
    State.PARKED: {},  # no connection, no frames
    State.CLOSED: {},
}


def _identified(session: Session, outcome: Identified, now: float) -> list[Effect]:
    session.user_id, large = outcome.user.id, session.config.large_server_members
    ready = {
        "sessionId": session.session_id,
        "user": outcome.user.to_wire(outcome.status),
        "servers": [s.to_ready(large) for s in outcome.servers],
    }
    return [Send(session.dispatch("READY", ready))]


def _identify_failed(session: Session, outcome: IdentifyFailed, now: float) -> list[Effect]:
    return [Close(outcome.code, outcome.reason)]


def _subscribe_confirmed(session: Session, outcome: SubscribeConfirmed, now: float) -> list[Effect]:
    session.subscriptions.add(outcome.server_id)
    return [Send(session.dispatch("SUBSCRIBED", {"serverId": outcome.server_id}))]


def _refused(session: Session, outcome: Refused, now: float) -> list[Effect]:
    error = ProtocolError(outcome.code, outcome.message, outcome.op)
    return [Send(encode_error(error), outcome.code.value)]


def _removed(session: Session, outcome: Removed, now: float) -> list[Effect]:
    # Always answered UNSUBSCRIBED, subscribed or not (7a); the route goes first.
    effects: list[Effect] = []
    if outcome.server_id in session.subscriptions:
        session.subscriptions.discard(outcome.server_id)
        effects.append(Unsubscribe(outcome.server_id))
    effects.append(Send(session.dispatch("UNSUBSCRIBED", {"serverId": outcome.server_id})))
    return effects


def _timer(session: Session, outcome: TimerFired, now: float) -> list[Effect]:
    if session.state is State.AWAITING_IDENTIFY and now >= session.identify_deadline:
        return session.close(CloseCode.NOT_AUTHENTICATED, "not authenticated in time")
    if now > session.heartbeat_deadline:
        return session.close(CloseCode.SESSION_TIMED_OUT, "session timed out")
    return []


_TIMER = _row(TimerFired, _timer)
_REFUSED = _row(Refused, _refused)

#: What the shell reports back: state -> outcome type -> row.
OUTCOME_TABLE: dict[State, dict[type, Row[Any]]] = {
    State.AWAITING_IDENTIFY: _rows(_TIMER, _REFUSED),
    State.IDENTIFYING: _rows(
        _row(Identified, _identified, State.READY),
        _row(IdentifyFailed, _identify_failed, State.CLOSED),
        _row(ResumeRefused, resume_refused, State.AWAITING_IDENTIFY),
        _row(Adopted, adopted, State.CLOSED),
        _TIMER,
        _REFUSED,
    ),
    State.READY: _rows(
        _row(SubscribeConfirmed, _subscribe_confirmed),
        _row(Removed, _removed),
        _row(Reattach, reattach),  # a zombie's takeover: the old connection closes 4014
        _row(*PRESENCE_OUTCOME),
        _TIMER,
        _REFUSED,
    ),
    State.PARKED: _rows(
        _row(Reattach, reattach, State.READY),
        _row(Removed, _removed),  # SERVER_MEMBER_REMOVE while parked: kept, replayed
        _row(TimerFired, parked_timer),
    ),
    # Dropped parks a session that was READY when it closed (the action says PARKED).
    State.CLOSED: _rows(_row(Dropped, drop)),
}

_ERROR_TEXT = {
    ErrorCode.NOT_AUTHENTICATED: "identify first",
    ErrorCode.ALREADY_AUTHENTICATED: "this connection is already identified",
}


class Session:
    __slots__ = (
        "config",
        "connected_at",
        "last_heartbeat",
        "last_op",
        "parked_at",
        "rate",
        "replay",
        "seq",
        "session_id",
        "state",
        "subscriptions",
        "user_id",
        "was_ready",
    )

    def __init__(self, session_id: SessionId, config: SessionConfig, now: float) -> None:
        self.session_id = session_id
        self.config = config
        self.state = State.AWAITING_IDENTIFY
        self.connected_at = now
        self.last_heartbeat = now
        self.seq = 0
        #: The op of the last client frame (a client op name, or "invalid"): metrics.
        self.last_op = ""
        self.user_id: UserId | None = None
        self.subscriptions: set[ServerId] = set()
        self.rate = SlidingWindow(config.rate_limit_count, config.rate_limit_window)
        self.replay = ReplayBuffer(
            config.resume_buffer_frames if config.resume_ttl > 0 else 0,
            config.replay_max_frames,
            config.replay_max_bytes,
        )
        self.parked_at = 0.0
        #: True once a close ended a READY session (it may then park).
        self.was_ready = False

    # --- connect and frames -------------------------------------------------------

    def hello(self) -> list[Effect]:
        d = {"heartbeatInterval": self.config.heartbeat_interval_ms, "sessionId": self.session_id}
        return [Send(encode_control("HELLO", d))]

    def receive(self, raw: str | bytes, now: float) -> list[Effect]:
        """One whole client message."""
        if self.state is State.CLOSED:
            return []
        if not self.rate.admit(now):
            return self.close(CloseCode.RATE_LIMITED, "rate limited")
        decoded = decode_command(raw)
        if isinstance(decoded, ProtocolError):
            self.last_op = decoded.op if decoded.op in CLIENT_OPS else "invalid"
            return self._invalid(decoded)
        self.last_op = op_name(decoded)
        return self.handle(decoded, now)

    def handle(self, command: Command, now: float) -> list[Effect]:
        """A command already decoded (the rate limit was applied by ``receive``)."""
        return self._run(OP_TABLE, command, now, op_name(command))

    def report(self, outcome: Outcome, now: float = 0.0) -> list[Effect]:
        """What the shell learnt carrying out an effect, or a timer that fired."""
        return self._run(OUTCOME_TABLE, outcome, now, None)

    def _run(
        self, table: dict[State, dict[type, Row[Any]]], item: object, now: float, op: str | None
    ) -> list[Effect]:
        row = table[self.state].get(type(item))
        if row is None:
            return []
        if isinstance(row.action, ErrorCode):
            return self.refuse(row.action, _ERROR_TEXT[row.action], op)
        effects = row.action(self, item, now)
        if row.next_state is not None:
            self.state = row.next_state
        return effects

    def _invalid(self, error: ProtocolError) -> list[Effect]:
        # A malformed frame of a known op: when the op's row in this state is an error
        # (a second IDENTIFY, an op that needs READY), the state answers before the
        # payload (7a). Otherwise the payload error itself.
        client_op = CLIENT_OPS.get(error.op) if error.op is not None else None
        if error.code is ErrorCode.INVALID_PAYLOAD and client_op is not None:
            row = OP_TABLE[self.state].get(client_op.command)
            if row is not None and isinstance(row.action, ErrorCode):
                return self.refuse(row.action, _ERROR_TEXT[row.action], error.op)
        return [Send(encode_error(error), error.code.value)]

    # --- outcomes (named shortcuts of ``report``) ---------------------------------

    def identified(self, user: User, servers: Sequence[Server], status: Status) -> list[Effect]:
        return self.report(Identified(user, servers, status))

    def identify_failed(self, code: int, reason: str) -> list[Effect]:
        return self.report(IdentifyFailed(code, reason))

    def subscribe_confirmed(self, server_id: ServerId) -> list[Effect]:
        return self.report(SubscribeConfirmed(server_id))

    def unsubscribe(self, server_id: ServerId) -> list[Effect]:
        """UNSUBSCRIBE_SERVER, or a removal decided elsewhere (SERVER_MEMBER_REMOVE)."""
        return self.report(Removed(server_id))

    def refuse(self, code: ErrorCode, message: str, op: str | None) -> list[Effect]:
        return self.report(Refused(code, message, op))

    # --- timers and teardown ------------------------------------------------------

    @property
    def identify_deadline(self) -> float:
        return self.connected_at + self.config.identify_timeout

    @property
    def heartbeat_deadline(self) -> float:
        return self.last_heartbeat + self.config.heartbeat_timeout

    def check_timers(self, now: float) -> list[Effect]:
        """Called by the identify timer and the heartbeat sweep."""
        return self.report(TimerFired(now), now)

    def close(self, code: int, reason: str) -> list[Effect]:
        if self.state is State.CLOSED:
            return []
        self.was_ready = self.state is State.READY
        self.state = State.CLOSED
        if self.was_ready:  # it may park: keep what comes while the socket closes
            self.replay.park(self.seq + 1)
        return [Close(code, reason)]

    # --- resume (section 13; the rows' actions live in domain.resume) --------------

    def can_resume(self, seq: int) -> bool:  # parked, or a zombie's takeover
        return self.state in (State.PARKED, State.READY) and self.replay.covers(seq, self.seq)

    def keep(self, template: DispatchTemplate) -> bool:
        """A dispatch for a parked (or closing) session; False when over a bound."""
        self.seq += 1
        kept = self.replay.record(self.seq, template)
        if not kept:  # it kept too much: it ends, and may not park any more
            self.state, self.was_ready = State.CLOSED, False
        return kept

    # --- dispatch sequence --------------------------------------------------------

    def stamp(self, template: DispatchTemplate) -> str:
        """The next dispatch frame of this connection: ``s`` is gapless from 1."""
        self.seq += 1
        frame = template.frame(self.seq)
        self.replay.record(self.seq, template, len(frame))  # attached: never over a bound
        return frame

    def dispatch(self, op: str, d: object) -> str:
        """A dispatch of the session itself (READY, SUBSCRIBED...), stamped."""
        return self.stamp(dispatch_template(op, d))
