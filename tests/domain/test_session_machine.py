"""Stateful test of :class:`domain.session.Session` against an independent model.

The model below is written from PROTOCOL.md (sections 2-7a), not from the session's
code: a client frame is classified by :func:`classify` (its own reading of the wire
format) and :class:`SessionMachine` predicts, for every input, the exact list of
effects the session must return. Hypothesis drives both with random frames, time
steps and the answers the shell would give (identify outcome, subscription check).

The test plays the shell's role faithfully: the shell carries out a ``Subscribe``
effect before it reads the next client frame (``Connection.apply`` awaits it), so
no client frame is fed while a subscription is pending; timers, fan-out stamps,
forced unsubscriptions and shell-side closes may still interleave with it.

Small configuration numbers (5 frames per 2 s, 3 subscriptions, 5 s to identify,
8 s heartbeat timeout) make every edge reachable in a few dozen steps. Times are
multiples of 0.25 s, so window and deadline boundaries are hit exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from domain.codec import ErrorCode, dispatch_template
from domain.effects import (
    Authenticate,
    Close,
    Effect,
    Send,
    SetPresence,
    StartTyping,
    Subscribe,
    Unsubscribe,
)
from domain.model import Server, Status, User
from domain.session import Session, SessionConfig, State

#: A passing run takes about 10 s. Shrinking a failing one can take minutes: let it
#: finish rather than be killed with an uninformative timeout.
pytestmark = pytest.mark.timeout(900)

# --- configuration: small numbers so that every edge is reached ----------------------

RATE_COUNT = 5
RATE_WINDOW = 2.0
IDENTIFY_TIMEOUT = 5.0
HEARTBEAT_TIMEOUT = 8.0
HEARTBEAT_INTERVAL_MS = 4000
MAX_SUBSCRIPTIONS = 3
CONFIG = SessionConfig(
    identify_timeout=IDENTIFY_TIMEOUT,
    heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS,
    heartbeat_timeout=HEARTBEAT_TIMEOUT,
    rate_limit_count=RATE_COUNT,
    rate_limit_window=RATE_WINDOW,
    max_subscriptions=MAX_SUBSCRIPTIONS,
)
SESSION_ID = "6f1c2d0e-5b7a-4c3e-9d2f-0a1b2c3d4e5f"
USER = User(id="u1", username="alice", display_name="Alice", avatar_url=None)
SERVERS = (
    Server(id="s1", name="Home", owner_id="u1", icon_url=None),
    Server(id="s2", name="Gaming", owner_id="u2", icon_url="https://cdn.example/g.png"),
)

# --- the protocol, as PROTOCOL.md states it ------------------------------------------

CLIENT_OPS = (
    "IDENTIFY",
    "HEARTBEAT",
    "SUBSCRIBE_SERVER",
    "UNSUBSCRIBE_SERVER",
    "TYPING_START",
    "PRESENCE_UPDATE",
)
NEEDS_READY = frozenset(CLIENT_OPS[2:])
SETTABLE = ("online", "idle", "dnd", "invisible")
SERVER_KEYS = ("id", "name", "ownerId", "iconUrl")
CONTROL_OPS = frozenset({"HELLO", "HEARTBEAT_ACK", "ERROR"})
SERVER_IDS = ("s1", "s2", "s3", "s4")
CHANNEL_IDS = ("c1", "c2")
PAYLOAD_FIELD = {
    "IDENTIFY": "token",
    "SUBSCRIBE_SERVER": "serverId",
    "UNSUBSCRIBE_SERVER": "serverId",
    "TYPING_START": "channelId",
    "PRESENCE_UPDATE": "status",
}


@dataclass(frozen=True)
class Garbled:
    """A frame answered with ERROR whatever the state: DECODE_ERROR or UNKNOWN_OP."""

    code: str
    op: str | None


@dataclass(frozen=True)
class ClientOp:
    """A client op; ``arg`` is its one field (``""`` for HEARTBEAT), None if ``d`` is bad."""

    op: str
    arg: str | None


def _refuse_constant(name: str) -> Any:
    raise ValueError(name)


def classify(raw: str | bytes) -> Garbled | ClientOp:
    """Sections 2, 3, 6 and 7a: what one client message is."""
    if isinstance(raw, bytes):
        return Garbled("DECODE_ERROR", None)
    try:
        frame = json.loads(raw, parse_constant=_refuse_constant)  # NaN is not JSON
    except (ValueError, RecursionError):
        return Garbled("DECODE_ERROR", None)
    if not isinstance(frame, dict):
        return Garbled("DECODE_ERROR", None)
    op = frame.get("op")
    if not isinstance(op, str):
        return Garbled("UNKNOWN_OP", None)
    if op not in CLIENT_OPS:
        return Garbled("UNKNOWN_OP", op)
    if op == "HEARTBEAT":
        return ClientOp(op, "")  # d is ignored, whatever it holds
    d = frame.get("d")
    value = d.get(PAYLOAD_FIELD[op]) if isinstance(d, dict) else None
    if not isinstance(value, str) or (op == "PRESENCE_UPDATE" and value not in SETTABLE):
        return ClientOp(op, None)
    return ClientOp(op, value)


# --- frame strategies ----------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.floats(allow_nan=False, allow_infinity=False, width=32)
    | st.text(max_size=4)
)


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)


json_values: st.SearchStrategy[Any] = st.recursive(json_scalars, _containers, max_leaves=3)
json_non_objects = json_scalars | st.lists(json_values, max_size=3)
json_non_strings = (
    st.none() | st.booleans() | st.integers(-3, 3) | st.lists(json_values, max_size=2)
    | st.dictionaries(st.text(max_size=3), json_values, max_size=2)
)

_good_d: dict[str, st.SearchStrategy[Any]] = {
    "IDENTIFY": st.fixed_dictionaries({"token": st.text(max_size=6)}),
    "HEARTBEAT": json_scalars | json_values,
    "SUBSCRIBE_SERVER": st.fixed_dictionaries({"serverId": st.sampled_from(SERVER_IDS)}),
    "UNSUBSCRIBE_SERVER": st.fixed_dictionaries({"serverId": st.sampled_from(SERVER_IDS)}),
    "TYPING_START": st.fixed_dictionaries({"channelId": st.sampled_from(CHANNEL_IDS)}),
    "PRESENCE_UPDATE": st.fixed_dictionaries({"status": st.sampled_from(SETTABLE)}),
}
_bad_d = st.one_of(
    json_values,
    st.sampled_from(
        [
            {},
            {"token": 1},
            {"token": None},
            {"serverId": 7},
            {"serverId": ["s1"]},
            {"channelId": False},
            {"status": "offline"},
            {"status": "ONLINE"},
            {"status": ""},
            {"status": None},
        ]
    ),
)
_extra = st.dictionaries(st.sampled_from(["x", "s", "t", "nonce"]), json_scalars, max_size=2)


def _frame(op: Any, d: Any, extra: dict[str, Any], ascii_only: bool) -> str:
    return json.dumps({**extra, "op": op, "d": d}, ensure_ascii=ascii_only)


def valid_frame(op: str) -> st.SearchStrategy[str]:
    plain = _good_d[op].map(lambda d: json.dumps({"op": op, "d": d}))
    return plain | st.builds(_frame, st.just(op), _good_d[op], _extra, st.booleans())


valid_frames = st.one_of(*[valid_frame(op) for op in CLIENT_OPS])
bad_payload_frames = st.builds(_frame, st.sampled_from(CLIENT_OPS), _bad_d, _extra, st.booleans())
server_op_frames = st.builds(
    _frame,
    st.sampled_from(["READY", "HELLO", "HEARTBEAT_ACK", "ERROR", "SUBSCRIBED", "RECONNECT",
                     "heartbeat", "Identify", "", "IDENTIFY "]),
    json_values,
    _extra,
    st.booleans(),
)
nonstring_op_frames = st.builds(_frame, json_non_strings, json_values, _extra, st.booleans())
missing_op_frames = st.builds(lambda d: json.dumps({"d": d}), json_values)
non_object_frames = json_non_objects.map(json.dumps)
truncated_frames = st.tuples(valid_frames, st.integers(0, 40)).map(lambda t: t[0][: t[1]])
binary_frames = st.binary(max_size=16) | valid_frames.map(str.encode)
odd_frames = st.sampled_from(
    [
        '{"op":"HEARTBEAT","d":NaN}',
        '{"op":"HEARTBEAT","d":-Infinity}',
        "[" * 3000,
        '{"op":"IDENTIFY","d":{"token":"\\ud800"}}',
        '{"op":"\\udfff","d":null}',
        '{"op":"HEARTBEAT","op":"IDENTIFY","d":{"token":"dup"}}',
        "",
        " ",
        "null",
    ]
)

#: Seconds between one input and the next client frame.
pace = st.sampled_from([0.0, 0.25, 0.5, 0.5, 1.0])

#: Everything but a well-formed client op.
wrong_frames: st.SearchStrategy[str | bytes] = st.one_of(
    bad_payload_frames,
    server_op_frames,
    nonstring_op_frames,
    missing_op_frames,
    non_object_frames,
    truncated_frames,
    st.text(max_size=12),
    binary_frames,
    odd_frames,
)

# --- expected effects ----------------------------------------------------------------
#
# Effects are compared in a normalized form: ("error", code, op), ("ack",),
# ("dispatch", op, d), ("close", code), ("authenticate", token), ("subscribe", sid),
# ("unsubscribe", sid), ("typing", channel), ("presence", status).

Norm = tuple[Any, ...]


def ready_d(status: str) -> dict[str, Any]:
    return {
        "sessionId": SESSION_ID,
        "user": {"id": "u1", "username": "alice", "displayName": "Alice", "avatarUrl": None,
                 "status": status},
        "servers": [
            {"id": "s1", "name": "Home", "ownerId": "u1", "iconUrl": None},
            {"id": "s2", "name": "Gaming", "ownerId": "u2", "iconUrl": "https://cdn.example/g.png"},
        ],
    }


_STATE_OF = {
    "awaiting": State.AWAITING_IDENTIFY,
    "identifying": State.IDENTIFYING,
    "ready": State.READY,
    "closed": State.CLOSED,
}


@settings(
    max_examples=250,
    stateful_step_count=40,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
class SessionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 100.0
        self.session = Session(SESSION_ID, CONFIG, self.now)
        # the model
        self.state = "awaiting"
        self.connected_at = self.now
        self.last_heartbeat = self.now
        self.accepted: list[float] = []  # times of the frames that counted
        self.subs: set[str] = set()
        self.pending_auth = False
        self.pending_sub: str | None = None
        self.identify_accepted = False
        # observations
        self.seqs: list[int] = []
        self.closes: list[int] = []
        self.readies = 0

        hello = self.session.hello()
        assert len(hello) == 1 and isinstance(hello[0], Send)
        frame = self._control(hello[0].text)
        assert frame == {
            "op": "HELLO",
            "d": {"heartbeatInterval": HEARTBEAT_INTERVAL_MS, "sessionId": SESSION_ID},
        }

    # --- helpers ------------------------------------------------------------------

    @staticmethod
    def _control(text: str) -> dict[str, Any]:
        text.encode("utf-8")  # never a lone surrogate on the wire
        frame = json.loads(text, parse_constant=_refuse_constant)
        assert isinstance(frame, dict)
        assert set(frame) == {"op", "d"}, f"control frame with keys {sorted(frame)}: {text}"
        return frame

    def _normalize_send(self, text: str) -> Norm:
        text.encode("utf-8")
        frame = json.loads(text, parse_constant=_refuse_constant)
        assert isinstance(frame, dict) and isinstance(frame.get("op"), str), text
        op = frame["op"]
        if op in CONTROL_OPS:
            frame = self._control(text)
            if op == "ERROR":
                d = frame["d"]
                assert isinstance(d, dict) and set(d) == {"code", "message", "op"}, text
                assert isinstance(d["message"], str) and d["message"], text
                return ("error", d["code"], d["op"])
            if op == "HEARTBEAT_ACK":
                assert frame["d"] in (None, {}), text
                return ("ack",)
            raise AssertionError(f"unexpected control frame {text}")
        assert set(frame) == {"op", "d", "s"}, f"dispatch frame with keys {sorted(frame)}: {text}"
        s = frame["s"]
        assert type(s) is int, text
        self.seqs.append(s)
        assert self.seqs == list(range(1, len(self.seqs) + 1)), f"sequence gap: {self.seqs}"
        d = frame["d"]
        if op == "READY":
            assert self.identify_accepted, "READY without an accepted IDENTIFY"
            self.readies += 1
            assert self.readies == 1, "a second READY"
            # Servers may carry more fields (section 4): compare the required ones.
            d = {**d, "servers": [{k: srv[k] for k in SERVER_KEYS} for srv in d["servers"]]}
        return ("dispatch", op, d)

    def _normalize(self, effect: Effect) -> Norm:
        if isinstance(effect, Send):
            norm = self._normalize_send(effect.text)
            # Send.error names the code of an ERROR frame (for metrics), else None.
            assert effect.error == (norm[1] if norm[0] == "error" else None), effect
            return norm
        if isinstance(effect, Close):
            self.closes.append(effect.code)
            assert len(self.closes) == 1, f"more than one Close: {self.closes}"
            assert isinstance(effect.reason, str)
            return ("close", effect.code)
        if isinstance(effect, Authenticate):
            return ("authenticate", effect.token)
        if isinstance(effect, Unsubscribe):
            return ("unsubscribe", effect.server_id)
        # the effects that need READY
        assert self.readies == 1, f"{effect} before READY"
        if isinstance(effect, Subscribe):
            return ("subscribe", effect.server_id)
        if isinstance(effect, StartTyping):
            return ("typing", effect.channel_id)
        assert isinstance(effect, SetPresence)
        return ("presence", effect.status.value)

    def _check(self, effects: list[Effect], expected: list[Norm], closed_before: bool) -> None:
        if closed_before:
            assert effects == [], f"effects after CLOSED: {effects}"
        actual = [self._normalize(e) for e in effects]
        for norm in actual:
            event(" ".join(str(part) for part in norm[:2] if part != "dispatch")
                  if norm[0] != "authenticate" else "authenticate")
        assert actual == expected, f"\n  actual:   {actual}\n  expected: {expected}"

    def _close(self, code: int) -> list[Norm]:
        if self.state == "closed":
            return []
        self.state = "closed"
        return [("close", code)]

    def _dispatch(self, op: str, d: Any) -> Norm:
        return ("dispatch", op, d)

    # --- the model of one client frame --------------------------------------------

    def _expect_frame(self, kind: Garbled | ClientOp) -> list[Norm]:
        if self.state == "closed":
            return []
        recent = [t for t in self.accepted if self.now - t < RATE_WINDOW]
        if len(recent) >= RATE_COUNT:
            return self._close(4008)
        self.accepted.append(self.now)
        if isinstance(kind, Garbled):
            return [("error", kind.code, kind.op)]
        op, arg = kind.op, kind.arg
        if op == "HEARTBEAT":
            self.last_heartbeat = self.now
            return [("ack",)]
        if op == "IDENTIFY":
            if self.state != "awaiting":
                return [("error", "ALREADY_AUTHENTICATED", op)]
            if arg is None:
                return [("error", "INVALID_PAYLOAD", op)]
            self.state = "identifying"
            self.pending_auth = True
            self.identify_accepted = True
            return [("authenticate", arg)]
        assert op in NEEDS_READY
        if self.state != "ready":
            return [("error", "NOT_AUTHENTICATED", op)]
        if arg is None:
            return [("error", "INVALID_PAYLOAD", op)]
        if op == "SUBSCRIBE_SERVER":
            if arg in self.subs:
                return [self._dispatch("SUBSCRIBED", {"serverId": arg})]
            if len(self.subs) >= MAX_SUBSCRIPTIONS:
                return [("error", "TOO_MANY_SUBSCRIPTIONS", op)]
            self.pending_sub = arg
            return [("subscribe", arg)]
        if op == "UNSUBSCRIBE_SERVER":
            return self._expect_unsubscribe(arg)
        if op == "TYPING_START":
            return [("typing", arg)]
        return [("presence", arg)]

    def _expect_unsubscribe(self, sid: str) -> list[Norm]:
        if self.state != "ready":
            return []
        expected: list[Norm] = []
        if sid in self.subs:
            self.subs.discard(sid)
            expected.append(("unsubscribe", sid))
        expected.append(self._dispatch("UNSUBSCRIBED", {"serverId": sid}))
        return expected

    @initialize(
        heartbeat_after=st.sampled_from([None, None, 0.5, 1.5, 3.0]),
        ready=st.sampled_from([False, True, True]),
    )
    def start(self, heartbeat_after: float | None, ready: bool) -> None:
        """Maybe a HEARTBEAT before IDENTIFY (it must count in every state); most runs
        then reach READY, so that the READY rows get most of the budget."""
        if heartbeat_after is not None:
            self.now += heartbeat_after
            self._receive('{"op":"HEARTBEAT","d":null}')
        if ready:
            self._receive('{"op":"IDENTIFY","d":{"token":"t"}}')
            self.resolve_identify(True, Status.ONLINE, 4004)

    # --- rules --------------------------------------------------------------------

    def _receive(self, raw: str | bytes, typing_answer: ErrorCode | None = None) -> None:
        closed_before = self.state == "closed"
        expected = self._expect_frame(classify(raw))
        effects = self.session.receive(raw, self.now)
        self._check(effects, expected, closed_before)
        if expected and expected[-1][0] == "typing" and typing_answer is not None:
            # The shell found no such channel, or no READ_MESSAGES on it.
            refused = self.session.refuse(typing_answer, "refused", "TYPING_START")
            self._check(refused, [("error", typing_answer.value, "TYPING_START")], False)

    # One rule per client op (so that sessions make progress), then everything else.
    # Each frame comes ``pace`` seconds after the previous input. No client frame is
    # read while the shell is busy with a Subscribe effect.

    @precondition(lambda self: self.pending_sub is None)
    @rule(raw=valid_frame("IDENTIFY"), pace=pace)
    def identify(self, raw: str, pace: float) -> None:
        self.now += pace
        self._receive(raw)

    @precondition(lambda self: self.pending_sub is None)
    @rule(raw=valid_frame("HEARTBEAT"), pace=pace)
    def heartbeat(self, raw: str, pace: float) -> None:
        self.now += pace
        self._receive(raw)

    @precondition(lambda self: self.pending_sub is None)
    @rule(
        raw=valid_frame("SUBSCRIBE_SERVER"),
        pace=pace,
        answer=st.sampled_from(["later", "confirm", "confirm", "confirm", "forbidden"]),
    )
    def subscribe(self, raw: str, pace: float, answer: str) -> None:
        """The shell usually answers at once; "later" lets other inputs interleave."""
        self.now += pace
        self._receive(raw)
        if self.pending_sub is not None and answer != "later":
            self.resolve_subscription(None if answer == "confirm" else ErrorCode.FORBIDDEN)

    @precondition(lambda self: self.pending_sub is None and self.state == "ready")
    @rule(sids=st.permutations(SERVER_IDS), count=st.integers(2, len(SERVER_IDS)))
    def subscribe_many(self, sids: list[str], count: int) -> None:
        """Subscribe to several servers in a row, half a second apart (the cap's edge)."""
        for sid in sids[:count]:
            self.now += 0.5
            self._receive(json.dumps({"op": "SUBSCRIBE_SERVER", "d": {"serverId": sid}}))
            if self.pending_sub is not None:
                self.resolve_subscription(None)

    @precondition(lambda self: self.pending_sub is None)
    @rule(raw=valid_frame("UNSUBSCRIBE_SERVER"), pace=pace)
    def unsubscribe(self, raw: str, pace: float) -> None:
        self.now += pace
        self._receive(raw)

    @precondition(lambda self: self.pending_sub is None)
    @rule(
        raw=valid_frame("TYPING_START"),
        pace=pace,
        answer=st.sampled_from([None, ErrorCode.FORBIDDEN, ErrorCode.NOT_FOUND]),
    )
    def typing(self, raw: str, pace: float, answer: ErrorCode | None) -> None:
        self.now += pace
        self._receive(raw, answer)

    @precondition(lambda self: self.pending_sub is None)
    @rule(raw=valid_frame("PRESENCE_UPDATE"), pace=pace)
    def presence(self, raw: str, pace: float) -> None:
        self.now += pace
        self._receive(raw)

    @precondition(lambda self: self.pending_sub is None)
    @rule(raw=bad_payload_frames, pace=pace)
    def bad_payload(self, raw: str, pace: float) -> None:
        self.now += pace
        self._receive(raw)

    @precondition(lambda self: self.pending_sub is None)
    @rule(raw=wrong_frames, pace=pace)
    def wrong_frame(self, raw: str | bytes, pace: float) -> None:
        self.now += pace
        self._receive(raw)

    @precondition(lambda self: self.pending_sub is None)
    @rule(raw=st.lists(valid_frame("HEARTBEAT") | wrong_frames, min_size=2, max_size=RATE_COUNT))
    def burst(self, raw: list[str | bytes]) -> None:
        """Several frames at the same instant (what trips the rate limit)."""
        for one in raw:
            self._receive(one)

    @rule(dt=st.sampled_from([0.25, 0.5, 1.0, 1.75, 2.0, 2.25]))
    def advance_time(self, dt: float) -> None:
        self.now += dt

    @rule(dt=st.sampled_from([2.75, 4.75, 8.25]))
    def advance_time_far(self, dt: float) -> None:
        self.now += dt

    @rule(
        edge=st.sampled_from(["identify", "heartbeat", "window"]),
        offset=st.sampled_from([-0.25, 0.0, 0.0, 0.25]),
        sweep=st.booleans(),
    )
    def advance_to_edge(self, edge: str, offset: float, sweep: bool) -> None:
        """Jump to just before, at or just after a deadline or the rate window's end
        (never backwards); maybe the timers are checked right then."""
        if edge == "identify":
            target = self.connected_at + IDENTIFY_TIMEOUT
        elif edge == "heartbeat":
            target = self.last_heartbeat + HEARTBEAT_TIMEOUT
        else:
            recent = self.accepted[-RATE_COUNT:]
            target = recent[0] + RATE_WINDOW if recent else self.now
        self.now = max(self.now, target + offset)
        if sweep:
            self.check_timers()

    @rule()
    def check_timers(self) -> None:
        closed_before = self.state == "closed"
        if self.state == "awaiting" and self.now >= self.connected_at + IDENTIFY_TIMEOUT:
            expected = self._close(4003)
        elif self.state != "closed" and self.now > self.last_heartbeat + HEARTBEAT_TIMEOUT:
            expected = self._close(4009)
        else:
            expected = []
        self._check(self.session.check_timers(self.now), expected, closed_before)

    @precondition(lambda self: self.state == "awaiting")
    @rule()
    def identify_timer(self) -> None:
        """The shell's identify timer fires at the deadline, to the instant."""
        self.now = max(self.now, self.connected_at + IDENTIFY_TIMEOUT)
        self.check_timers()

    @precondition(lambda self: self.pending_auth)
    @rule(
        success=st.sampled_from([True, True, True, False]),
        status=st.sampled_from([Status.ONLINE, Status.IDLE, Status.DND, Status.INVISIBLE]),
        failure=st.sampled_from([4004, 4000, 4013]),
    )
    def resolve_identify(self, success: bool, status: Status, failure: int) -> None:
        self.pending_auth = False
        closed_before = self.state == "closed"
        if success:
            expected: list[Norm] = []
            if self.state == "identifying":
                self.state = "ready"
                expected = [self._dispatch("READY", ready_d(status.value))]
            effects = self.session.identified(USER, SERVERS, status)
        else:
            expected = self._close(failure)
            effects = self.session.identify_failed(failure, "authentication failed")
        self._check(effects, expected, closed_before)

    @precondition(lambda self: self.pending_sub is not None)
    @rule(answer=st.sampled_from([None, None, ErrorCode.FORBIDDEN, ErrorCode.NOT_FOUND]))
    def resolve_subscription(self, answer: ErrorCode | None) -> None:
        sid = self.pending_sub
        assert sid is not None
        self.pending_sub = None
        closed_before = self.state == "closed"
        expected: list[Norm] = []
        if answer is None:
            if self.state == "ready":
                self.subs.add(sid)
                expected = [self._dispatch("SUBSCRIBED", {"serverId": sid})]
            effects = self.session.subscribe_confirmed(sid)
        else:
            if self.state != "closed":
                expected = [("error", answer.value, "SUBSCRIBE_SERVER")]
            effects = self.session.refuse(answer, "refused", "SUBSCRIBE_SERVER")
        self._check(effects, expected, closed_before)

    @precondition(lambda self: bool(self.subs) or self.pending_sub is not None)
    @rule(pick=st.integers(0, 3))
    def forced_unsubscribe(self, pick: int) -> None:
        """SERVER_MEMBER_REMOVE for this user, for a server it subscribed (or is
        subscribing) to."""
        candidates = sorted(self.subs | ({self.pending_sub} if self.pending_sub else set()))
        sid = candidates[pick % len(candidates)]
        closed_before = self.state == "closed"
        expected = self._expect_unsubscribe(sid)
        self._check(self.session.unsubscribe(sid), expected, closed_before)

    @precondition(lambda self: self.state == "ready")
    @rule(op=st.sampled_from(["MESSAGE_CREATE", "PRESENCE_UPDATE", "TYPING_START", "X"]),
          d=json_values)
    def stamp_dispatch(self, op: str, d: Any) -> None:
        """Fan-out: the shell stamps an event encoded once into this connection's frame."""
        text = self.session.stamp(dispatch_template(op, d))
        assert self._normalize_send(text) == ("dispatch", op, d)

    @rule(code=st.sampled_from([1001, 1009, 4010]), dice=st.integers(0, 3))
    def shell_close(self, code: int, dice: int) -> None:
        """Shutdown, a message too big, a slow consumer: the shell closes the session
        (one time in four, or little would happen after it)."""
        if dice:
            return
        closed_before = self.state == "closed"
        expected = self._close(code)
        self._check(self.session.close(code, "closed by the shell"), expected, closed_before)

    # --- invariants ---------------------------------------------------------------

    @invariant()
    def state_matches(self) -> None:
        assert self.session.state is _STATE_OF[self.state]

    @invariant()
    def deadlines_match(self) -> None:
        """The deadlines the shell's timers are armed with (public properties)."""
        assert self.session.identify_deadline == self.connected_at + IDENTIFY_TIMEOUT
        assert self.session.heartbeat_deadline == self.last_heartbeat + HEARTBEAT_TIMEOUT
        assert self.session.user_id == (USER.id if self.readies else None)

    @invariant()
    def subscriptions_match(self) -> None:
        assert self.session.subscriptions == self.subs
        assert len(self.session.subscriptions) <= MAX_SUBSCRIPTIONS

    @invariant()
    def at_most_one_close_and_ready(self) -> None:
        assert len(self.closes) <= 1
        assert self.readies <= 1
        assert (self.state == "closed") == (len(self.closes) == 1)

    def teardown(self) -> None:
        # Every session ends with exactly one Close: time it out if nothing did.
        if self.state != "closed":
            self.now += max(IDENTIFY_TIMEOUT, HEARTBEAT_TIMEOUT) + 1
            self.check_timers()
        assert len(self.closes) == 1
        # Once CLOSED, nothing produces an effect any more.
        s = self.session
        later = self.now + 1
        assert s.receive('{"op":"HEARTBEAT","d":null}', later) == []
        assert s.receive(b"\x00", later) == []
        assert s.identified(USER, SERVERS, Status.ONLINE) == []
        assert s.identify_failed(4004, "x") == []
        assert s.subscribe_confirmed("s1") == []
        assert s.unsubscribe("s1") == []
        assert s.refuse(ErrorCode.FORBIDDEN, "x", "SUBSCRIBE_SERVER") == []
        assert s.check_timers(later + 1000) == []
        assert s.close(1000, "x") == []
        assert s.state is State.CLOSED


TestSessionMachine = SessionMachine.TestCase
