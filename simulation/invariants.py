"""The invariants, checked continuously against the model (PROTOCOL sections 2-7a).

Every published message is seen by the broker hook at publish time; the checker then
computes from the model who should receive it (``must``: a READY connection whose
client saw SUBSCRIBED and has not sent UNSUBSCRIBE; ``may``: a subscription or an
unsubscription in flight) and appends it to those connections' expectation queues.
Frames received by clients are matched against the queues in order. Time bounds use
the declared faults only (:class:`simulation.faults.FaultLog`).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from adapters.shell import Gateway, GatewaySettings
from domain.model import InstanceId, PresenceChange, SessionId, Status, UserId
from simulation.faults import FaultLog
from simulation.model import (
    CLOSED,
    CONNECTING,
    IDENTIFYING,
    NONE,
    PENDING_SUB,
    PENDING_UNSUB,
    READY,
    SUBSCRIBED,
    Conn,
    Record,
)
from simulation.population import Population
from simulation.trace import SEQ_MARK, Trace

#: Slack for "at the same virtual instant" comparisons (seconds).
EPS = 0.001

SEQ = "seq-gapless"
EXACTLY_ONCE = "exactly-once"
IN_ORDER = "in-order"
RECIPIENTS = "recipients"
TYPING = "typing-dedup"
PRESENCE = "presence-converges"
PRESENCE_ONCE = "presence-once"
HEARTBEAT = "heartbeat-timeout"
SLOW = "slow-consumer"
IDENTIFY = "identify-progress"
REPLIES = "replies"
CLOSE_CODES = "close-codes"
LEAKS = "no-leaks"
NO_CRASH = "no-crash"
OUTBOUND = "lean-outbound"

INVARIANTS: dict[str, str] = {
    SEQ: "dispatches of a connection carry s = 1, 2, 3, ... (READY first); control frames none",
    EXACTLY_ONCE: "no event reaches a connection twice",
    IN_ORDER: "a connection receives events in publish order",
    RECIPIENTS: "each published event reaches exactly the connections that should get it "
    "(subscribed READY connections of the server, minus excludeUserId, channel "
    "readers only for channel-scoped events; every READY connection of the user "
    "for user events), within the declared link latency",
    TYPING: "at most one TYPING_START per (channel, user) per TTL window, with the right "
    "server, username and a virtual-wall timestamp",
    PRESENCE: "once settled, the presence store holds exactly the live READY sessions, "
    "shows a user online iff one exists, and the last PRESENCE_UPDATE every "
    "server was sent equals the stored visible status (bound: at once, or 2 "
    "heartbeat timeouts after an instance crash)",
    PRESENCE_ONCE: "a PRESENCE_UPDATE is broadcast only when the visible status changed",
    HEARTBEAT: "a connection is closed 4009 within [timeout, timeout + sweep] of its last "
    "heartbeat, never earlier",
    SLOW: "4010 only for a client that stopped reading, and such a client is closed once "
    "its backlog exceeds transport buffer + outbound bound",
    IDENTIFY: "HELLO at once with a session id; IDENTIFY with a valid token is answered "
    "READY (same session id, right user, servers and status) within 1 s, a minute "
    "after a storm it met (the admission queue), or closed 4000 during a backend fault",
    REPLIES: "each command gets its reply in order: HEARTBEAT_ACK, SUBSCRIBED, UNSUBSCRIBED, "
    "ERROR FORBIDDEN / NOT_FOUND; HEARTBEAT_ACK at once, also while queued for admission",
    CLOSE_CODES: "the server closes only with a justified code (4000 during backend faults)",
    LEAKS: "after all clients left and timers ran out: no connection, route, broker "
    "channel, presence session or typing key remains",
    NO_CRASH: "no gateway task raises",
    OUTBOUND: "a connection's queued frames are on the flusher's ready list or owned by a "
    "sender task (none is forgotten); a connection with nothing queued, no close under "
    "way and a client that reads holds no sender task (none at rest)",
}

_CONTROL = frozenset({"HELLO", "HEARTBEAT_ACK", "ERROR", "RECONNECT"})
_ACK_FRAME = '{"op":"HEARTBEAT_ACK","d":null}'
_VISIBLE = frozenset({"online", "idle", "dnd", "offline"})
_SETTABLE = frozenset({"online", "idle", "dnd", "invisible"})
_MAX_VIOLATIONS = 200


@dataclass(frozen=True, slots=True)
class Violation:
    invariant: str
    time: float
    message: str
    subjects: tuple[str, ...]
    trace: tuple[str, ...]


class PresenceView(Protocol):
    """What the checker reads of the presence store (``MemoryPresenceStore``)."""

    def live_sessions(self) -> dict[UserId, dict[SessionId, InstanceId]]: ...

    def stored_statuses(self) -> dict[UserId, Status]: ...


#: An intent of another service's publish: (kind, target, channel, excludeUserId).
Intent = tuple[str, str, str | None, str | None]
#: What :func:`outlet_problems` found: (the client's connection or None, the message).
OutletProblem = tuple[Conn | None, str]


class UserState:
    __slots__ = ("conns", "crash_until", "last_close_at", "settle_at")

    def __init__(self) -> None:
        #: open connections that sent IDENTIFY (identifying or READY)
        self.conns: dict[Conn, None] = {}
        self.settle_at = 0.0
        self.crash_until = 0.0
        self.last_close_at = -1.0


#: Built once: json.dumps with options builds a new encoder on every call (the same
#: output: json.dumps(value, separators=(",", ":"))).
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def _dumps(value: Any) -> str:
    return _ENCODER.encode(value)


def expected_head(op: str, d: Any) -> str:
    """A dispatch frame up to its ``s``, written independently of domain.codec."""
    return '{"op":' + _dumps(op) + ',"d":' + _dumps(d) + SEQ_MARK


class Checker:
    def __init__(
        self,
        *,
        population: Population,
        settings: GatewaySettings,
        faults: FaultLog,
        trace: Trace,
        now: Callable[[], float],
        wall_ms: Callable[[], int],
        presence: PresenceView,
        transport_capacity: int,
        stop_on_violation: bool,
    ) -> None:
        self.pop = population
        self.settings = settings
        self.faults = faults
        self.trace = trace
        self.now = now
        self.wall_ms = wall_ms
        self.presence = presence
        self.stop_on_violation = stop_on_violation
        self.on_stop: Callable[[], None] | None = None
        self.timeout = settings.session.heartbeat_timeout
        self.sweep = settings.heartbeat_sweep_ms / 1000
        self.typing_ttl_ms = settings.typing_ttl_ms
        self.slow_threshold = transport_capacity + settings.outbound_max_frames + 2
        self.member_of = {u: frozenset(s) for u, s in population.servers_of.items()}
        self.known_servers = frozenset(population.servers)

        self.open_conns: dict[Conn, None] = {}
        self.server_index: dict[str, dict[Conn, None]] = {}
        self.users: dict[UserId, UserState] = {}
        self.dirty: dict[UserId, None] = {}
        self.closed_on: dict[str, dict[UserId, float]] = {}
        self.intents: dict[str, Intent] = {}
        self.presence_last: dict[tuple[UserId, str], str] = {}
        #: user -> visible transitions the store reported; (user, server) -> that count
        #: when its last PRESENCE_UPDATE was published
        self.transitions: dict[UserId, int] = {}
        self.presence_seen: dict[tuple[UserId, str], int] = {}
        self.presence_lost: set[tuple[UserId, str]] = set()
        self.typing_last: dict[tuple[str, UserId], int] = {}
        #: head -> the latest record published with it (tells a duplicate of one event
        #: from a second event with the same content)
        self.latest_by_head: dict[str, Record] = {}
        #: "s:<server>" / "u:<user>" -> records that may still be on their way
        self.inflight: dict[str, deque[tuple[Record, str | None, str | None]]] = {}

        self.checks: dict[str, int] = dict.fromkeys(INVARIANTS, 0)
        self.violations: list[Violation] = []
        self.records = 0
        self.published_by_op: dict[str, int] = {}
        self.failed_publishes = 0
        self.deliveries = 0
        self.frames = 0
        self.closes: dict[str, int] = {}

    # --- reporting ------------------------------------------------------------------

    def violation(self, invariant: str, message: str, *subjects: str) -> None:
        if len(self.violations) >= _MAX_VIOLATIONS:
            return
        self.trace.event("VIOLATION", f"{invariant}: {message}")
        self.violations.append(
            Violation(
                invariant,
                self.now(),
                message,
                tuple(subjects),
                tuple(self.trace.relevant(subjects)),
            )
        )
        if self.stop_on_violation and self.on_stop is not None:
            self.on_stop()

    def _conn_violation(self, conn: Conn, invariant: str, message: str, *more: str) -> None:
        """Report at most once per connection and invariant."""
        if invariant in conn.flagged:
            return
        conn.flagged.add(invariant)
        self.violation(
            invariant, f"{conn.cid} ({conn.user}@{conn.instance_id}): {message}", conn.cid, *more
        )

    def _user(self, user: UserId) -> UserState:
        state = self.users.get(user)
        if state is None:
            state = self.users[user] = UserState()
        return state

    def _touch(self, user: UserId, settle_at: float) -> None:
        state = self._user(user)
        state.settle_at = max(state.settle_at, settle_at)
        self.dirty[user] = None

    # --- the world's own reports -------------------------------------------------------

    def intend(self, eid: str, intent: Intent) -> None:
        """Another service is about to publish event ``eid`` with this intent."""
        self.intents[eid] = intent

    def intent_done(self, eid: str) -> None:
        self.intents.pop(eid, None)

    def faults_changed(self, faults: FaultLog) -> None:
        """The world changed the fault log (this checker reads the same object)."""

    def leaks(self, checks: int, problems: list[str]) -> None:
        """The end-of-run leak checks the world made (``checks`` of them)."""
        self.checks[LEAKS] += checks
        if problems:
            self.violation(LEAKS, "left behind: " + "; ".join(problems))

    def finish(self) -> None:
        """The run is over (the counters and verdicts above are final)."""

    # --- connections ------------------------------------------------------------------

    def conn_opened(self, conn: Conn) -> None:
        self.open_conns[conn] = None
        self.trace.event(conn.cid, f"CONNECT {conn.instance_id} {conn.user}")

    def sent_identify(self, conn: Conn, text: str) -> None:
        self.trace.sent(conn.cid, text)
        now = self.now()
        conn.state = IDENTIFYING
        conn.identify_at = now
        self._user(conn.user).conns[conn] = None
        self._touch(conn.user, now + EPS)
        self._catch_up(conn, "u:" + conn.user)

    def sent_heartbeat(self, conn: Conn, text: str) -> None:
        self.trace.sent(conn.cid, text)
        conn.last_hb = self.now()
        conn.replies.append(("HEARTBEAT_ACK", False, conn.last_hb))

    def sent_subscribe(self, conn: Conn, server: str, text: str) -> None:
        self.trace.sent(conn.cid, text)
        now = self.now()
        # PROTOCOL 15: during a backend fault the answer may be ERROR UNAVAILABLE (the
        # subscription then stays pending: its events are allowed, never owed).
        fault = self.faults.backend_fault_during(now - EPS, now + EPS)
        if server in self.member_of[conn.user]:
            if conn.subs.get(server, NONE) == NONE:
                conn.subs[server] = PENDING_SUB
                self.server_index.setdefault(server, {})[conn] = None
                self._catch_up(conn, "s:" + server)
            conn.replies.append((f"SUBSCRIBED:{server}", fault, now))
        elif server in self.known_servers:
            conn.replies.append(("ERROR:FORBIDDEN:SUBSCRIBE_SERVER", fault, now))
        else:
            conn.replies.append(("ERROR:NOT_FOUND:SUBSCRIBE_SERVER", fault, now))
        if fault:
            conn.replies.append(("ERROR:UNAVAILABLE:SUBSCRIBE_SERVER", True, now))

    def sent_unsubscribe(self, conn: Conn, server: str, text: str) -> None:
        self.trace.sent(conn.cid, text)
        if conn.subs.get(server, NONE) == SUBSCRIBED:
            conn.subs[server] = PENDING_UNSUB
            # Events already in flight may or may not arrive now.
            limit = self.now() - EPS
            conn.expected = deque(
                (rec, must and not (rec.server == server and rec.horizon >= limit))
                for rec, must in conn.expected
            )
        conn.replies.append((f"UNSUBSCRIBED:{server}", False, self.now()))

    def sent_typing(self, conn: Conn, channel: str, text: str) -> None:
        self.trace.sent(conn.cid, text)
        server = self.pop.channel_server.get(channel)
        now = self.now()
        optional = self.faults.directory_failing_during(now - EPS, now + EPS)
        if server is None:
            conn.replies.append(("ERROR:NOT_FOUND:TYPING_START", optional, now))
        elif conn.user not in self.pop.readers[channel]:
            conn.replies.append(("ERROR:FORBIDDEN:TYPING_START", optional, now))
        if self.faults.backend_fault_during(now - EPS, now + EPS):
            # PROTOCOL 15: a typing write that failed is answered, never a close.
            conn.replies.append(("ERROR:UNAVAILABLE:TYPING_START", True, now))

    def sent_presence(self, conn: Conn, text: str) -> None:
        self.trace.sent(conn.cid, text)
        now = self.now()
        self._touch(conn.user, now + EPS)
        if self.faults.backend_fault_during(now - EPS, now + EPS):
            # PROTOCOL 15: a presence write that failed is answered, never a close.
            conn.replies.append(("ERROR:UNAVAILABLE:PRESENCE_UPDATE", True, now))

    def went_silent(self, conn: Conn) -> None:
        self.trace.event(conn.cid, "FAULT silent")

    def stopped_reading(self, conn: Conn) -> None:
        self.trace.event(conn.cid, "FAULT slow")
        now = self.now()
        conn.slow_at = now
        for rec, must in conn.expected:
            if must and rec.horizon + EPS < now and not self._fault_forgiven(rec):
                self._conn_violation(conn, RECIPIENTS, f"never received {rec.describe()}")
        conn.expected.clear()
        conn.replies.clear()

    def closed(self, conn: Conn, code: int, *, by_server: bool, how: str = "") -> None:
        """The client saw its connection end (or ended it)."""
        if conn.state == CLOSED:
            return
        now = self.now()
        who = how or ("server" if by_server else "client")
        self.trace.event(conn.cid, f"CLOSE {code} {who}")
        key = f"{code} {who}"
        self.closes[key] = self.closes.get(key, 0) + 1
        previous = conn.state
        conn.state = CLOSED
        conn.closed_at = now
        conn.close_code = code
        self.open_conns.pop(conn, None)
        for server in conn.subs:
            routed = self.server_index.get(server)
            if routed is not None:
                routed.pop(conn, None)
                if not routed:
                    del self.server_index[server]
        state = self._user(conn.user)
        state.conns.pop(conn, None)
        if previous != CONNECTING:
            state.last_close_at = now
            self.closed_on.setdefault(conn.instance_id, {})[conn.user] = now
            self._touch(conn.user, now + EPS)
        for rec, must in conn.expected:
            self.checks[RECIPIENTS] += 1
            if must and rec.horizon + EPS < now and not self._fault_forgiven(rec):
                self._conn_violation(conn, RECIPIENTS, f"closed without {rec.describe()}")
        conn.expected.clear()
        if by_server:
            self._check_close_code(conn, code, previous)

    def instance_crashed(self, instance_id: str, conns: list[Conn]) -> None:
        now = self.now()
        until = now + 2 * self.timeout
        for conn in conns:
            self.closed(conn, 1006, by_server=False, how="crash")
        for user, at in self.closed_on.get(instance_id, {}).items():
            if at >= now - 1.0:  # its teardown may not have reached the store
                state = self._user(user)
                state.crash_until = max(state.crash_until, until)
                self._touch(user, until)

    def _check_close_code(self, conn: Conn, code: int, previous: str) -> None:
        now = self.now()
        if code == 4009:
            self.checks[HEARTBEAT] += 1
            idle = now - conn.last_hb
            if idle < self.timeout - EPS or idle > self.timeout + self.sweep + EPS:
                self._conn_violation(
                    conn,
                    HEARTBEAT,
                    f"closed 4009 {idle:.3f} s after its last heartbeat (allowed "
                    f"[{self.timeout:g}, {self.timeout + self.sweep:g}])",
                )
        elif code == 4010:
            self.checks[SLOW] += 1
            if conn.slow_at is None:
                self._conn_violation(conn, SLOW, "closed 4010 although it kept reading")
        elif code == 4000:
            self.checks[CLOSE_CODES] += 1
            if not self.faults.backend_fault_during(now - 1.0, now + EPS):
                self._conn_violation(conn, CLOSE_CODES, "closed 4000 with no backend fault")
            if previous == IDENTIFYING:
                self.checks[IDENTIFY] += 1
        else:
            self.checks[CLOSE_CODES] += 1
            self._conn_violation(conn, CLOSE_CODES, f"closed with unexpected code {code}")

    # --- frames -----------------------------------------------------------------------

    def frame(self, conn: Conn, text: str) -> str:
        """One frame received by a client; returns its op."""
        self.frames += 1
        try:
            op = text[7 : text.index('"', 7)] if text.startswith('{"op":"') else ""
            if op in _CONTROL:
                self.trace.frame(conn.cid, text)
                self._control(conn, op, text)
                return op
            i = text.rfind(SEQ_MARK)
            if i < 0 or not text.endswith("}"):
                raise ValueError("dispatch without s")
            seq = int(text[i + 5 : -1])
        except ValueError as exc:
            self.trace.frame(conn.cid, text)
            self._conn_violation(conn, SEQ, f"malformed frame {text[:120]!r}: {exc}")
            return ""
        self.trace.dispatch(conn.cid, text, i)
        self.checks[SEQ] += 1
        if seq != conn.next_s:
            self._conn_violation(conn, SEQ, f"{op} has s={seq}, expected {conn.next_s}")
        elif seq == 1 and op != "READY":
            self._conn_violation(conn, SEQ, f"first dispatch is {op}, not READY")
        conn.next_s = seq + 1
        if op == "READY":
            self._ready(conn, text)
        elif op in ("SUBSCRIBED", "UNSUBSCRIBED"):
            self._subscription_reply(conn, op, text)
        else:
            self._event(conn, text[: i + 5])
        return op

    def _control(self, conn: Conn, op: str, text: str) -> None:
        if op == "HEARTBEAT_ACK":
            if text != _ACK_FRAME:
                self._conn_violation(conn, SEQ, f"bad control frame {text!r}")
            self._reply(conn, "HEARTBEAT_ACK")
            return
        doc = json.loads(text)
        if "s" in doc:
            self._conn_violation(conn, SEQ, f"control frame with s: {text[:120]}")
        d = doc.get("d")
        if op == "HELLO":
            self.checks[IDENTIFY] += 1
            if conn.session_id is not None or not isinstance(d, dict):
                self._conn_violation(conn, IDENTIFY, f"unexpected HELLO {text}")
                return
            conn.session_id = d.get("sessionId")
            if d.get("heartbeatInterval") != self.settings.session.heartbeat_interval_ms:
                self._conn_violation(conn, IDENTIFY, f"HELLO advertises {d}")
        elif op == "ERROR":
            assert isinstance(d, dict)
            self._reply(conn, f"ERROR:{d.get('code')}:{d.get('op')}")
        else:
            self._conn_violation(conn, CLOSE_CODES, f"unexpected {text}")

    def _reply(self, conn: Conn, got: str) -> None:
        self.checks[REPLIES] += 1
        replies = conn.replies
        stale = self.now() - EPS
        while replies:
            want, optional, at = replies.popleft()
            if optional and at < stale:
                continue  # its instant passed without an answer: it was dropped
            if want == got:
                return
            if not optional:
                self._conn_violation(conn, REPLIES, f"expected {want}, got {got}")
                return
        self._conn_violation(conn, REPLIES, f"unexpected reply {got}")

    def _ready(self, conn: Conn, text: str) -> None:
        self.checks[IDENTIFY] += 1
        d = json.loads(text)["d"]
        now = self.now()
        state = self._user(conn.user)
        problems: list[str] = []
        if conn.state != IDENTIFYING:
            problems.append(f"READY in state {conn.state}")
        if d.get("sessionId") != conn.session_id:
            problems.append(f"sessionId {d.get('sessionId')} != HELLO's {conn.session_id}")
        user = d.get("user") or {}
        if user.get("id") != conn.user or user.get("username") != self.pop.usernames[conn.user]:
            problems.append(f"user {user}")
        status = user.get("status")
        alone = not any(c is not conn and c.state == READY for c in state.conns)
        assert conn.identify_at is not None
        settled = state.crash_until <= now and state.last_close_at < conn.identify_at - EPS
        if status not in _SETTABLE or (alone and settled and status != "online"):
            problems.append(f"status {status!r} (only connection: {alone})")
        servers = sorted(s.get("id") for s in d.get("servers", ()))
        if servers != sorted(self.pop.ready_servers[conn.user]):
            problems.append(f"servers {servers}")
        if problems:
            self._conn_violation(conn, IDENTIFY, "; ".join(problems))
        conn.state = READY
        self._touch(conn.user, now + EPS)

    def _subscription_reply(self, conn: Conn, op: str, text: str) -> None:
        d = json.loads(text)["d"]
        server = d.get("serverId") if isinstance(d, dict) else None
        self._reply(conn, f"{op}:{server}")
        if not isinstance(server, str):
            return
        state = conn.subs.get(server, NONE)
        if op == "SUBSCRIBED" and state == PENDING_SUB:
            conn.subs[server] = SUBSCRIBED
        elif op == "UNSUBSCRIBED" and state == PENDING_UNSUB:
            del conn.subs[server]
            routed = self.server_index.get(server)
            if routed is not None:
                routed.pop(conn, None)
                if not routed:
                    del self.server_index[server]

    def _event(self, conn: Conn, head: str) -> None:
        self.checks[RECIPIENTS] += 1
        expected = conn.expected
        if expected and expected[0][0].head == head:
            rec, must = expected.popleft()
        else:
            index = next((k for k, (r, _) in enumerate(expected) if r.head == head), None)
            if index is None:
                latest = self.latest_by_head.get(head)
                if latest is not None and (head, latest.no) in conn.recent:
                    self.checks[EXACTLY_ONCE] += 1
                    self._conn_violation(conn, EXACTLY_ONCE, f"received twice: {head}…")
                elif head in conn.skipped:
                    self.checks[IN_ORDER] += 1
                    self._conn_violation(conn, IN_ORDER, f"received out of order: {head}…")
                else:
                    self._conn_violation(conn, RECIPIENTS, f"should not receive {head}…")
                return
            for _ in range(index):
                skipped, must = expected.popleft()
                conn.skipped.append(skipped.head)
                if must and not self._fault_forgiven(skipped):
                    self._conn_violation(conn, RECIPIENTS, f"missed {skipped.describe()}")
            rec, must = expected.popleft()
        if must is None and not self.faults.directory_failing_during(
            rec.p - EPS, rec.horizon + EPS
        ):
            self._conn_violation(conn, RECIPIENTS, f"should not receive {head}…")
            return
        self.deliveries += 1
        self.checks[EXACTLY_ONCE] += 1
        self.checks[IN_ORDER] += 1
        conn.recent.append((rec.head, rec.no))

    def _fault_forgiven(self, rec: Record) -> bool:
        """Lost for a declared reason: a delayed delivery came due during a broker
        outage, or a channel-scoped fan-out could not read permissions."""
        if rec.horizon > rec.p and self.faults.broker_down_during(rec.p, rec.horizon):
            return True
        return rec.channel is not None and self.faults.directory_failing_during(
            rec.p - EPS, rec.horizon + EPS
        )

    # --- publishes (the broker hook) --------------------------------------------------

    def published(self, channel: str, payload: bytes) -> None:
        now = self.now()
        env = json.loads(payload)
        event = env["event"]
        op: str = event["op"]
        d = event.get("d")
        self.records += 1
        self.published_by_op[op] = self.published_by_op.get(op, 0) + 1
        rec = Record(
            self.records, op, expected_head(op, d), now, self.faults.latency_bound(now), None, None
        )
        self.latest_by_head[rec.head] = rec
        eid = d.get("eid") if isinstance(d, dict) else None
        if isinstance(eid, str) and eid in self.intents:
            kind, target, channel_id, exclude = self.intents.pop(eid)
            wanted = ("ws:user:" if kind == "user" else "ws:server:") + target
            if channel != wanted:
                self.violation(RECIPIENTS, f"event {eid} published on {channel}, not {wanted}")
            if kind == "user":
                self._expect_user(rec, target)
            else:
                rec.server, rec.channel = target, channel_id
                self._expect_server(rec, target, channel_id, exclude)
        elif op == "TYPING_START" and isinstance(d, dict):
            self._typing_published(rec, channel, d)
        elif op == "PRESENCE_UPDATE" and isinstance(d, dict):
            self._presence_published(rec, channel, d)
        else:
            self.violation(RECIPIENTS, f"unknown publish on {channel}: {payload[:200]!r}")

    def presence_changed(self, change: PresenceChange) -> None:
        """A transition of the presence store, as an instance saw it."""
        if change.visible_changed:
            self.transition(change.user_id)

    def transition(self, user: UserId) -> None:
        self.transitions[user] = self.transitions.get(user, 0) + 1

    def publish_failed(self, channel: str, payload: bytes) -> None:
        self.failed_publishes += 1
        event = json.loads(payload)["event"]
        d = event.get("d")
        if event["op"] == "PRESENCE_UPDATE" and isinstance(d, dict):
            key = (d["userId"], d["serverId"])
            self.presence_lost.add(key)
            self.trace.event("BROKER", f"lost PRESENCE_UPDATE {key[0]} {key[1]} {d['status']}")
            self._touch(key[0], self.now() + EPS)

    def _typing_published(self, rec: Record, channel: str, d: dict[str, Any]) -> None:
        self.checks[TYPING] += 1
        channel_id, user, stamp = d.get("channelId"), d.get("userId"), d.get("timestamp")
        server = self.pop.channel_server.get(str(channel_id))
        if (
            server is None
            or d.get("serverId") != server
            or channel != f"ws:server:{server}"
            or not isinstance(user, str)
            or user not in self.pop.usernames
            or d.get("username") != self.pop.usernames[user]
            or not isinstance(stamp, int)
            or stamp != self.wall_ms()
        ):
            self.violation(TYPING, f"malformed TYPING_START on {channel}: {d}")
            return
        assert isinstance(channel_id, str)
        key = (channel_id, user)
        last = self.typing_last.get(key)
        if last is not None and stamp - last < self.typing_ttl_ms:
            self.violation(
                TYPING,
                f"second TYPING_START for {channel_id}/{user} "
                f"{stamp - last} ms after the first (TTL "
                f"{self.typing_ttl_ms} ms)",
                user,
                channel_id,
            )
        self.typing_last[key] = stamp
        rec.server, rec.channel = server, channel_id
        rec.typing = (channel_id, user, stamp)
        self._expect_server(rec, server, channel_id, user)

    def _presence_published(self, rec: Record, channel: str, d: dict[str, Any]) -> None:
        self.checks[PRESENCE_ONCE] += 1
        user, server, status = d.get("userId"), d.get("serverId"), d.get("status")
        if (
            not isinstance(user, str)
            or not isinstance(server, str)
            or channel != f"ws:server:{server}"
            or status not in _VISIBLE
            or server not in self.member_of.get(user, ())
        ):
            self.violation(PRESENCE, f"malformed PRESENCE_UPDATE on {channel}: {d}")
            return
        assert isinstance(status, str)
        key = (user, server)
        previous = self.presence_last.get(key, "offline")
        changes = self.transitions.get(user, 0)
        # A repeat is fine after a visible transition that was never broadcast (a reaped
        # user back before the retry of its offline broadcast): the store did change.
        if (
            previous == status
            and key not in self.presence_lost
            and changes == self.presence_seen.get(key, 0)
        ):
            self.violation(
                PRESENCE_ONCE,
                f"PRESENCE_UPDATE {user} {status} on {server} "
                f"although the last one already said {status}",
                user,
            )
        self.presence_last[key] = status
        self.presence_seen[key] = changes
        self.presence_lost.discard(key)
        rec.server = server
        rec.presence = (user, status)
        self._touch(user, rec.horizon + EPS)
        if len(self.pop.members[server]) > self.settings.session.large_server_members:
            # PROTOCOL 14: in a large server only the user's own subscribed connections
            # (simulated clients ask for nobody's presence); anyone else is a violation.
            # While the directory fails the fan-out cannot tell the server's size and
            # delivers to every subscriber (more, never fewer): allowed then, not owed.
            # A delayed fan-out may meet a failure that starts after the publish: then
            # allowed (None) only if the failure began before the horizon (on arrival).
            lenient = self.faults.directory_failing_during(rec.p - EPS, rec.horizon + EPS)
            other: bool | None = False if lenient else None
            self._in_flight("s:" + server, rec, None, None)
            for conn in self.server_index.get(server, ()):
                if conn.user == user:
                    self._expect(conn, rec, conn.subs[server] == SUBSCRIBED)
                elif lenient or rec.horizon > rec.p:
                    self._expect(conn, rec, other)
            return
        self._expect_server(rec, server, None, None)

    def _in_flight(
        self,
        key: str,
        rec: Record | None = None,
        channel: str | None = None,
        exclude: str | None = None,
    ) -> deque[tuple[Record, str | None, str | None]]:
        """Records for ``key`` that may still reach an instance (pruned), plus ``rec``."""
        queue = self.inflight.get(key)
        if queue is None:
            if rec is None:
                return deque()
            queue = self.inflight[key] = deque()
        limit = self.now() - EPS
        while queue and queue[0][0].horizon < limit:
            queue.popleft()
        if rec is not None:
            queue.append((rec, channel, exclude))
        elif not queue:
            del self.inflight[key]
        return queue

    def _catch_up(self, conn: Conn, key: str) -> None:
        """A new route: events published before it but still in flight may arrive."""
        late = [
            rec
            for rec, channel, exclude in self._in_flight(key)
            if conn.user != exclude and (channel is None or conn.user in self.pop.readers[channel])
        ]
        if late and conn.slow_at is None:
            merged = sorted(
                [*conn.expected, *((rec, False) for rec in late)], key=lambda item: item[0].no
            )
            conn.expected = deque(merged)

    def _expect_server(
        self, rec: Record, server: str, channel: str | None, exclude: str | None
    ) -> None:
        self._in_flight("s:" + server, rec, channel, exclude)
        routed = self.server_index.get(server)
        if not routed:
            return
        readers = self.pop.readers[channel] if channel is not None else None
        for conn in routed:
            user = conn.user
            if user == exclude or (readers is not None and user not in readers):
                continue
            self._expect(conn, rec, conn.subs[server] == SUBSCRIBED)

    def _expect_user(self, rec: Record, user: UserId) -> None:
        self._in_flight("u:" + user, rec)
        state = self.users.get(user)
        if state is None:
            return
        for conn in state.conns:
            self._expect(conn, rec, conn.state == READY)

    def _expect(self, conn: Conn, rec: Record, must: bool | None) -> None:
        if conn.slow_at is not None:
            # Not reading: count what the gateway must queue for it (frames that no
            # declared fault can remove), to bound when 4010 must come.
            if must and rec.channel is None and rec.horizon == rec.p:
                conn.slow_musts += 1
                if conn.slow_musts == self.slow_threshold:
                    conn.slow_last = rec.horizon
            return
        conn.expected.append((rec, must))

    # --- periodic checks --------------------------------------------------------------

    def outlets(self, instance_id: str, gateway: Gateway, conns: dict[object, Conn]) -> None:
        """The outbound side of every connection of one live instance (``conns``:
        transport -> the client's connection)."""
        self.outlet_report(*outlet_problems(instance_id, gateway, conns))

    def outlet_report(self, count: int, problems: list[OutletProblem]) -> None:
        self.checks[OUTBOUND] += count
        for client, message in problems:
            if client is not None:
                self._conn_violation(client, OUTBOUND, message)
            else:
                self.violation(OUTBOUND, message)

    def periodic(self, *, presence: bool = True) -> None:
        now = self.now()
        limit = self.timeout + self.sweep + EPS
        for conn in list(self.open_conns):
            self.checks[HEARTBEAT] += 1
            if now - conn.last_hb > limit:
                self._conn_violation(
                    conn,
                    HEARTBEAT,
                    f"still open {now - conn.last_hb:.3f} s after its last heartbeat",
                )
            if conn.state == CONNECTING and now - conn.opened_at > 1.0:
                self._conn_violation(conn, IDENTIFY, "no HELLO")
            elif (
                conn.state == IDENTIFYING
                and conn.identify_at is not None
                and now - conn.identify_at > 1.0 + self.faults.storm_wait(conn.identify_at)
            ):
                self._conn_violation(conn, IDENTIFY, "IDENTIFY neither answered nor closed")
            expected = conn.expected
            while expected and expected[0][0].horizon + EPS < now:
                rec, must = expected.popleft()
                conn.skipped.append(rec.head)
                self.checks[RECIPIENTS] += 1
                if must and not self._fault_forgiven(rec):
                    self._conn_violation(conn, RECIPIENTS, f"never received {rec.describe()}")
            replies = conn.replies
            if replies and conn.slow_at is None:
                self.checks[REPLIES] += 1
                while replies and replies[0][1] and replies[0][2] + EPS < now:
                    replies.popleft()
                if replies and replies[0][2] + EPS < now:
                    self._conn_violation(
                        conn,
                        REPLIES,
                        f"no {replies[0][0]} for a command sent at {replies[0][2]:.6f}",
                    )
            if conn.slow_at is not None:
                self.checks[SLOW] += 1
                if conn.slow_last and conn.slow_last + EPS < now:
                    self._conn_violation(
                        conn,
                        SLOW,
                        f"stopped reading at {conn.slow_at:.3f}, "
                        f"{conn.slow_musts} frames owed, still not closed 4010",
                    )
        if len(self.latest_by_head) > 4 * len(self.open_conns) + 10_000:
            limit = now - 60.0
            self.latest_by_head = {h: r for h, r in self.latest_by_head.items() if r.p >= limit}
        if presence:
            self.presence_pass(now)

    def presence_pass(self, now: float, *, everyone: bool = False) -> None:
        users = (
            list(self.users)
            if everyone
            else [u for u in self.dirty if self.users[u].settle_at <= now]
        )
        if not users:
            return
        sessions = self.presence.live_sessions()
        statuses = self.presence.stored_statuses()
        for user in users:
            self.dirty.pop(user, None)
            self._check_presence(user, sessions.get(user, {}), statuses.get(user))

    def _check_presence(
        self, user: UserId, stored_sessions: dict[SessionId, str], stored: Status | None
    ) -> None:
        self.checks[PRESENCE] += 1
        state = self.users[user]
        live = {c.session_id: c.instance_id for c in state.conns if c.state == READY}
        if stored_sessions != live:
            self.violation(
                PRESENCE,
                f"{user}: the store holds sessions {stored_sessions}, the "
                f"live READY connections are {live}",
                user,
            )
            return
        if (stored is not None) != bool(live):
            self.violation(
                PRESENCE,
                f"{user}: stored status {stored} with {len(live)} live connection(s)",
                user,
            )
            return
        visible = "offline" if stored is None or stored is Status.INVISIBLE else stored.value
        for server in self.pop.servers_of[user]:
            key = (user, server)
            if key in self.presence_lost:
                continue
            told = self.presence_last.get(key, "offline")
            if told != visible:
                self.violation(
                    PRESENCE,
                    f"{user}: subscribers of {server} were last told "
                    f"{told}, the store says {visible}",
                    user,
                    server,
                )
                return


def outlet_problems(
    instance_id: str, gateway: Gateway, conns: dict[object, Conn]
) -> tuple[int, list[OutletProblem]]:
    """``lean-outbound`` on one live instance: how many connections were looked at and
    what is wrong (a queue nobody writes, a sender task at rest), by client connection
    (or, for a connection no client knows, a message naming the session)."""
    waiting = {id(c) for c in gateway.flusher.waiting()}
    count = 0
    problems: list[OutletProblem] = []
    for outlet in list(gateway.admission.connections):
        if outlet.ended:
            continue
        count += 1
        queued = len(outlet.outbound)
        problem = None
        if queued and not outlet.sending and id(outlet) not in waiting:
            problem = f"{queued} frames queued with nobody to write them"
        elif (
            outlet.sending
            and not queued
            and not outlet.closing
            and getattr(outlet.transport, "reading", False)
        ):
            problem = "holds a sender task at rest"
        if problem is None:
            continue
        client = conns.get(outlet.transport)
        if client is not None:
            problems.append((client, problem))
        else:
            problems.append((None, f"{instance_id} {outlet.live.session_id}: {problem}"))
    return count, problems
