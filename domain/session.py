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

The op table :data:`OP_TABLE` maps (state, command) to what happens; code is written
only for what a table cannot hold. Work that needs the outside world (verifying the
token, checking membership, claiming a typing key, changing presence) is returned as
an effect; the shell reports the outcome back through ``identified``,
``identify_failed``, ``subscribe_confirmed``, ``refuse`` and friends.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from domain.codec import (
    HEARTBEAT_ACK_FRAME,
    CloseCode,
    Command,
    DispatchTemplate,
    ErrorCode,
    Heartbeat,
    Identify,
    PresenceUpdate,
    ProtocolError,
    SubscribeServer,
    TypingStart,
    UnsubscribeServer,
    decode_command,
    dispatch_template,
    encode_control,
    encode_error,
)
from domain.model import ChannelId, Server, ServerId, SessionId, Status, User, UserId


class State(Enum):
    AWAITING_IDENTIFY = "awaiting_identify"
    IDENTIFYING = "identifying"
    READY = "ready"
    CLOSED = "closed"


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


Effect = Send | Close | Authenticate | Subscribe | Unsubscribe | StartTyping | SetPresence


@dataclass(frozen=True, slots=True)
class SessionConfig:
    identify_timeout: float = 5.0
    heartbeat_interval_ms: int = 30_000
    heartbeat_timeout: float = 60.0
    rate_limit_count: int = 120
    rate_limit_window: float = 60.0
    max_subscriptions: int = 200


# --- the op table --------------------------------------------------------------------
#
# state -> command type -> action. An action is a method name of Session (leading "_")
# or an ErrorCode to answer with. Ops absent from a state's row cannot occur there.

_ACK = "_ack"
OP_TABLE: dict[State, dict[type, str | ErrorCode]] = {
    State.AWAITING_IDENTIFY: {
        Identify: "_identify",
        Heartbeat: _ACK,
        SubscribeServer: ErrorCode.NOT_AUTHENTICATED,
        UnsubscribeServer: ErrorCode.NOT_AUTHENTICATED,
        TypingStart: ErrorCode.NOT_AUTHENTICATED,
        PresenceUpdate: ErrorCode.NOT_AUTHENTICATED,
    },
    State.IDENTIFYING: {
        Identify: ErrorCode.ALREADY_AUTHENTICATED,
        Heartbeat: _ACK,
        SubscribeServer: ErrorCode.NOT_AUTHENTICATED,
        UnsubscribeServer: ErrorCode.NOT_AUTHENTICATED,
        TypingStart: ErrorCode.NOT_AUTHENTICATED,
        PresenceUpdate: ErrorCode.NOT_AUTHENTICATED,
    },
    State.READY: {
        Identify: ErrorCode.ALREADY_AUTHENTICATED,
        Heartbeat: _ACK,
        SubscribeServer: "_subscribe",
        UnsubscribeServer: "_unsubscribe",
        TypingStart: "_typing",
        PresenceUpdate: "_presence",
    },
    State.CLOSED: {},
}

#: Op names (as sent) of commands that need READY, for checks made before validation.
_READY_OPS = {"SUBSCRIBE_SERVER", "UNSUBSCRIBE_SERVER", "TYPING_START", "PRESENCE_UPDATE"}

_ERROR_TEXT = {
    ErrorCode.NOT_AUTHENTICATED: "identify first",
    ErrorCode.ALREADY_AUTHENTICATED: "this connection is already identified",
}


class SlidingWindow:
    """At most ``count`` events within any span of ``window`` seconds (7a): the
    timestamps of the last ``count`` accepted events, oldest first."""

    __slots__ = ("_stamps", "count", "window")

    def __init__(self, count: int, window: float) -> None:
        self.count = count
        self.window = window
        self._stamps: deque[float] = deque(maxlen=count)

    def admit(self, now: float) -> bool:
        stamps = self._stamps
        if len(stamps) == self.count and now - stamps[0] < self.window:
            return False
        stamps.append(now)
        return True


class Session:
    __slots__ = (
        "config",
        "connected_at",
        "last_heartbeat",
        "last_op",
        "rate",
        "seq",
        "session_id",
        "state",
        "subscriptions",
        "user_id",
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

    # --- connect and frames -------------------------------------------------------

    def hello(self) -> list[Effect]:
        return [
            Send(
                encode_control(
                    "HELLO",
                    {
                        "heartbeatInterval": self.config.heartbeat_interval_ms,
                        "sessionId": self.session_id,
                    },
                )
            )
        ]

    def receive(self, raw: str | bytes, now: float) -> list[Effect]:
        """One whole client message."""
        if self.state is State.CLOSED:
            return []
        if not self.rate.admit(now):
            return self.close(CloseCode.RATE_LIMITED, "rate limited")
        decoded = decode_command(raw)
        if isinstance(decoded, ProtocolError):
            self.last_op = decoded.op if decoded.op in _OP_NAMES_SET else "invalid"
            return self._invalid(decoded)
        self.last_op = _OP_NAMES[type(decoded)]
        return self.handle(decoded, now)

    def handle(self, command: Command, now: float) -> list[Effect]:
        """A command already decoded (the rate limit was applied by ``receive``)."""
        action = OP_TABLE[self.state].get(type(command))
        if action is None:
            return []
        if isinstance(action, ErrorCode):
            return self.refuse(action, _ERROR_TEXT[action], _op_name(command))
        method = getattr(self, action)
        effects: list[Effect] = method(command, now)
        return effects

    def _invalid(self, error: ProtocolError) -> list[Effect]:
        # Ordering of checks for a malformed frame of a known op: a second IDENTIFY
        # is ALREADY_AUTHENTICATED whatever it holds, and an op that needs READY is
        # NOT_AUTHENTICATED before READY whatever it holds (state before payload).
        if error.code is ErrorCode.INVALID_PAYLOAD and error.op is not None:
            if error.op == "IDENTIFY" and self.state is not State.AWAITING_IDENTIFY:
                code = ErrorCode.ALREADY_AUTHENTICATED
                return self.refuse(code, _ERROR_TEXT[code], error.op)
            if error.op in _READY_OPS and self.state is not State.READY:
                code = ErrorCode.NOT_AUTHENTICATED
                return self.refuse(code, _ERROR_TEXT[code], error.op)
        return [Send(encode_error(error), error.code.value)]

    # --- actions of the op table --------------------------------------------------

    def _ack(self, command: Heartbeat, now: float) -> list[Effect]:
        self.last_heartbeat = now
        return [Send(HEARTBEAT_ACK_FRAME)]

    def _identify(self, command: Identify, now: float) -> list[Effect]:
        self.state = State.IDENTIFYING
        return [Authenticate(command.token)]

    def _subscribe(self, command: SubscribeServer, now: float) -> list[Effect]:
        sid = command.server_id
        if sid in self.subscriptions:  # idempotent, and never counts toward the cap
            return [Send(self._dispatch("SUBSCRIBED", {"serverId": sid}))]
        if len(self.subscriptions) >= self.config.max_subscriptions:
            return self.refuse(
                ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                f"at most {self.config.max_subscriptions} subscriptions per connection",
                "SUBSCRIBE_SERVER",
            )
        return [Subscribe(sid)]

    def _unsubscribe(self, command: UnsubscribeServer, now: float) -> list[Effect]:
        return self.unsubscribe(command.server_id)

    def _typing(self, command: TypingStart, now: float) -> list[Effect]:
        return [StartTyping(command.channel_id)]

    def _presence(self, command: PresenceUpdate, now: float) -> list[Effect]:
        return [SetPresence(command.status)]

    # --- outcomes reported by the shell -------------------------------------------

    def identified(self, user: User, servers: Sequence[Server], status: Status) -> list[Effect]:
        if self.state is not State.IDENTIFYING:
            return []
        self.state = State.READY
        self.user_id = user.id
        ready = {
            "sessionId": self.session_id,
            "user": user.to_wire(status),
            "servers": [s.to_wire() for s in servers],
        }
        return [Send(self._dispatch("READY", ready))]

    def identify_failed(self, code: int, reason: str) -> list[Effect]:
        return self.close(code, reason)

    def subscribe_confirmed(self, server_id: ServerId) -> list[Effect]:
        if self.state is not State.READY:
            return []
        self.subscriptions.add(server_id)
        return [Send(self._dispatch("SUBSCRIBED", {"serverId": server_id}))]

    def unsubscribe(self, server_id: ServerId) -> list[Effect]:
        """UNSUBSCRIBE_SERVER, or a removal decided elsewhere (SERVER_MEMBER_REMOVE).
        Always answered UNSUBSCRIBED, subscribed or not (7a)."""
        if self.state is not State.READY:
            return []
        effects: list[Effect] = []
        if server_id in self.subscriptions:
            self.subscriptions.discard(server_id)
            effects.append(Unsubscribe(server_id))
        effects.append(Send(self._dispatch("UNSUBSCRIBED", {"serverId": server_id})))
        return effects

    def refuse(self, code: ErrorCode, message: str, op: str | None) -> list[Effect]:
        if self.state is State.CLOSED:
            return []
        return [Send(encode_error(ProtocolError(code, message, op)), code.value)]

    # --- timers and teardown ------------------------------------------------------

    @property
    def identify_deadline(self) -> float:
        return self.connected_at + self.config.identify_timeout

    @property
    def heartbeat_deadline(self) -> float:
        return self.last_heartbeat + self.config.heartbeat_timeout

    def check_timers(self, now: float) -> list[Effect]:
        """Called by the identify timer and the heartbeat sweep."""
        if self.state is State.AWAITING_IDENTIFY and now >= self.identify_deadline:
            return self.close(CloseCode.NOT_AUTHENTICATED, "not authenticated in time")
        if self.state is not State.CLOSED and now > self.heartbeat_deadline:
            return self.close(CloseCode.SESSION_TIMED_OUT, "session timed out")
        return []

    def close(self, code: int, reason: str) -> list[Effect]:
        if self.state is State.CLOSED:
            return []
        self.state = State.CLOSED
        return [Close(code, reason)]

    # --- dispatch sequence --------------------------------------------------------

    def stamp(self, template: DispatchTemplate) -> str:
        """The next dispatch frame of this connection: ``s`` is gapless from 1."""
        self.seq += 1
        return template.frame(self.seq)

    def _dispatch(self, op: str, d: object) -> str:
        return self.stamp(dispatch_template(op, d))


def _op_name(command: Command) -> str:
    return _OP_NAMES[type(command)]


_OP_NAMES: dict[type, str] = {
    Identify: "IDENTIFY",
    Heartbeat: "HEARTBEAT",
    SubscribeServer: "SUBSCRIBE_SERVER",
    UnsubscribeServer: "UNSUBSCRIBE_SERVER",
    TypingStart: "TYPING_START",
    PresenceUpdate: "PRESENCE_UPDATE",
}
_OP_NAMES_SET = frozenset(_OP_NAMES.values())
