"""Example-based tests of the session state machine: every OP_TABLE row, every error
precedence rule of PROTOCOL 7a, timers, rate limit and dispatch sequence numbers."""

from __future__ import annotations

import gc
import json
import tracemalloc
from typing import Any

import pytest

from domain.codec import (
    CloseCode,
    Command,
    ErrorCode,
    Heartbeat,
    Identify,
    PresenceUpdate,
    Resume,
    SubscribePresence,
    SubscribeServer,
    TypingStart,
    UnsubscribeServer,
    dispatch_template,
)
from domain.effects import (
    Authenticate,
    Close,
    Dropped,
    Effect,
    Reclaim,
    Send,
    SetPresence,
    StartTyping,
    Subscribe,
    Unsubscribe,
    WatchPresence,
)
from domain.model import Server, Status, User
from domain.rate_limit import SlidingWindow
from domain.session import OP_TABLE, Session, SessionConfig, State

SID = "0d9b5f5e-1f0e-4a43-8d51-3c1e7c1f2a10"
CONFIG = SessionConfig(
    identify_timeout=5.0,
    heartbeat_interval_ms=30_000,
    heartbeat_timeout=60.0,
    rate_limit_count=120,
    rate_limit_window=60.0,
    max_subscriptions=2,
)
ALICE = User(id="u1", username="alice", display_name="Alice", avatar_url=None)
HOME = Server(id="s1", name="Home", owner_id="u1", icon_url=None)

READY_OPS = (
    "SUBSCRIBE_SERVER", "UNSUBSCRIBE_SERVER", "TYPING_START", "PRESENCE_UPDATE",
    "SUBSCRIBE_PRESENCE",
)
GOOD_D: dict[str, Any] = {
    "IDENTIFY": {"token": "jwt"},
    "HEARTBEAT": None,
    "SUBSCRIBE_SERVER": {"serverId": "s1"},
    "UNSUBSCRIBE_SERVER": {"serverId": "s1"},
    "TYPING_START": {"channelId": "c1"},
    "PRESENCE_UPDATE": {"status": "dnd"},
    "RESUME": {"token": "jwt", "sessionId": "old", "seq": 3},
    "SUBSCRIBE_PRESENCE": {"serverId": "s1", "userIds": ["u2"]},
}
COMMANDS: dict[str, Command] = {
    "IDENTIFY": Identify("jwt"),
    "HEARTBEAT": Heartbeat(),
    "SUBSCRIBE_SERVER": SubscribeServer("s1"),
    "UNSUBSCRIBE_SERVER": UnsubscribeServer("s1"),
    "TYPING_START": TypingStart("c1"),
    "PRESENCE_UPDATE": PresenceUpdate(Status.DND),
    "RESUME": Resume("jwt", "old", 3),
    "SUBSCRIBE_PRESENCE": SubscribePresence("s1", ("u2",)),
}
#: Payloads that are wrong for every op that has a field.
BAD_D: list[Any] = [None, "x", 3, [], {}, {"token": 1, "serverId": 2, "channelId": None,
                                        "status": "offline"}]


# --- helpers -------------------------------------------------------------------------


def frame(op: Any, d: Any = None, **extra: Any) -> str:
    return json.dumps({"op": op, "d": d, **extra})


def parse(effect: Effect) -> dict[str, Any]:
    assert isinstance(effect, Send), effect
    doc = json.loads(effect.text)
    assert isinstance(doc, dict)
    return doc


def only_error(effects: list[Effect]) -> tuple[str, str | None]:
    """The (code, op) of the single ERROR frame in ``effects``."""
    assert len(effects) == 1, effects
    doc = parse(effects[0])
    assert set(doc) == {"op", "d"}, doc  # a control frame: no "s"
    assert doc["op"] == "ERROR"
    d = doc["d"]
    assert set(d) == {"code", "message", "op"}
    assert isinstance(d["message"], str) and d["message"]
    assert isinstance(effects[0], Send) and effects[0].error == d["code"]
    return d["code"], d["op"]


def only_dispatch(effects: list[Effect]) -> dict[str, Any]:
    assert len(effects) == 1, effects
    doc = parse(effects[0])
    assert set(doc) == {"op", "d", "s"}, doc
    return doc


def is_ack(effects: list[Effect]) -> bool:
    if len(effects) != 1 or not isinstance(effects[0], Send):
        return False
    doc = parse(effects[0])
    return doc["op"] == "HEARTBEAT_ACK" and set(doc) == {"op", "d"} and doc["d"] in (None, {})


def new_session(now: float = 0.0, config: SessionConfig = CONFIG) -> Session:
    return Session(SID, config, now)


def session_in(state: State, now: float = 0.0) -> Session:
    s = new_session(now)
    if state is State.AWAITING_IDENTIFY:
        return s
    assert s.receive(frame("IDENTIFY", {"token": "jwt"}), now) == [Authenticate("jwt")]
    if state is State.IDENTIFYING:
        return s
    if state is State.CLOSED:
        s.close(1000, "bye")
        return s
    ready = s.identified(ALICE, [HOME], Status.ONLINE)
    assert only_dispatch(ready)["op"] == "READY"
    if state is State.PARKED:
        s.close(1001, "drain")
        s.report(Dropped(1001, False, now))
    assert s.state is state
    return s


# --- OP_TABLE ------------------------------------------------------------------------

NA = ("error", ErrorCode.NOT_AUTHENTICATED)
AA = ("error", ErrorCode.ALREADY_AUTHENTICATED)
EXPECTED_ROWS: dict[State, dict[str, tuple[str, Any]]] = {
    State.AWAITING_IDENTIFY: {
        "IDENTIFY": ("effect", Authenticate("jwt")),
        "HEARTBEAT": ("ack", None),
        "SUBSCRIBE_SERVER": NA,
        "UNSUBSCRIBE_SERVER": NA,
        "TYPING_START": NA,
        "PRESENCE_UPDATE": NA,
        "RESUME": ("effect", Reclaim("jwt", "old", 3)),
        "SUBSCRIBE_PRESENCE": NA,
    },
    State.IDENTIFYING: {
        "IDENTIFY": AA,
        "RESUME": AA,
        "HEARTBEAT": ("ack", None),
        "SUBSCRIBE_SERVER": NA,
        "UNSUBSCRIBE_SERVER": NA,
        "TYPING_START": NA,
        "PRESENCE_UPDATE": NA,
        "SUBSCRIBE_PRESENCE": NA,
    },
    State.READY: {
        "IDENTIFY": AA,
        "RESUME": AA,
        "HEARTBEAT": ("ack", None),
        "SUBSCRIBE_SERVER": ("effect", Subscribe("s1")),
        "UNSUBSCRIBE_SERVER": ("unsubscribed", None),
        "TYPING_START": ("effect", StartTyping("c1")),
        "PRESENCE_UPDATE": ("effect", SetPresence(Status.DND)),
        "SUBSCRIBE_PRESENCE": ("effect", WatchPresence("s1", ("u2",), False)),
    },
    State.PARKED: dict.fromkeys(GOOD_D, ("nothing", None)),
    State.CLOSED: dict.fromkeys(GOOD_D, ("nothing", None)),
}
ROWS = [(state, op) for state, row in EXPECTED_ROWS.items() for op in row]


def test_op_table_has_a_row_per_state_and_every_command_in_live_states() -> None:
    assert set(OP_TABLE) == set(State)
    command_types = {type(c) for c in COMMANDS.values()}
    for state in (State.AWAITING_IDENTIFY, State.IDENTIFYING, State.READY):
        assert set(OP_TABLE[state]) == command_types
    assert OP_TABLE[State.CLOSED] == {}
    assert OP_TABLE[State.PARKED] == {}  # no connection: no client frames


def _check_row(state: State, op: str, effects: list[Effect], session: Session) -> None:
    kind, value = EXPECTED_ROWS[state][op]
    if kind == "error":
        assert only_error(effects) == (value.value, op)
    elif kind == "ack":
        assert is_ack(effects)
    elif kind == "effect":
        assert effects == [value]
    elif kind == "unsubscribed":
        assert only_dispatch(effects)["op"] == "UNSUBSCRIBED"
    else:
        assert effects == []
    starts = state is State.AWAITING_IDENTIFY and op in ("IDENTIFY", "RESUME")
    expected_state = State.IDENTIFYING if starts else state
    assert session.state is expected_state


@pytest.mark.parametrize(("state", "op"), ROWS)
def test_op_table_row_through_receive(state: State, op: str) -> None:
    s = session_in(state)
    _check_row(state, op, s.receive(frame(op, GOOD_D[op]), 1.0), s)


@pytest.mark.parametrize(("state", "op"), ROWS)
def test_op_table_row_through_handle(state: State, op: str) -> None:
    s = session_in(state)
    _check_row(state, op, s.handle(COMMANDS[op], 1.0), s)


# --- error precedence (PROTOCOL 7a) ----------------------------------------------------

SECOND_IDENTIFIES = [
    frame("IDENTIFY", {"token": "another"}),
    frame("IDENTIFY", {"token": 1}),
    frame("IDENTIFY", None),
    frame("IDENTIFY", "jwt"),
    frame("IDENTIFY", []),
    json.dumps({"op": "IDENTIFY"}),
    frame("IDENTIFY", {"token": "x"}, s=9),
]


@pytest.mark.parametrize("state", [State.IDENTIFYING, State.READY])
@pytest.mark.parametrize("raw", SECOND_IDENTIFIES)
def test_second_identify_whatever_its_content_is_already_authenticated(
    state: State, raw: str
) -> None:
    s = session_in(state)
    assert only_error(s.receive(raw, 1.0)) == ("ALREADY_AUTHENTICATED", "IDENTIFY")
    assert s.state is state  # a stray frame never ends the session


@pytest.mark.parametrize("d", [None, "jwt", 7, [], {}, {"token": None}, {"token": 1},
                               {"token": ["jwt"]}, {"Token": "jwt"}])
def test_identify_with_bad_payload_before_ready_is_invalid_payload(d: Any) -> None:
    s = new_session()
    assert only_error(s.receive(frame("IDENTIFY", d), 1.0)) == ("INVALID_PAYLOAD", "IDENTIFY")
    assert s.state is State.AWAITING_IDENTIFY
    # the connection stays and a good IDENTIFY is still accepted ...
    assert s.receive(frame("IDENTIFY", {"token": "jwt"}), 2.0) == [Authenticate("jwt")]


def test_bad_identify_does_not_stop_the_identify_deadline() -> None:
    s = new_session()
    only_error(s.receive(frame("IDENTIFY", {"token": 1}), 1.0))
    assert s.check_timers(4.999) == []
    assert s.check_timers(5.0) == [Close(CloseCode.NOT_AUTHENTICATED, "not authenticated in time")]


@pytest.mark.parametrize("state", [State.AWAITING_IDENTIFY, State.IDENTIFYING])
@pytest.mark.parametrize("op", READY_OPS)
@pytest.mark.parametrize("good", [True, False])
def test_ready_only_ops_before_ready_are_not_authenticated(
    state: State, op: str, good: bool
) -> None:
    s = session_in(state)
    ds = [GOOD_D[op]] if good else BAD_D
    for d in ds:
        assert only_error(s.receive(frame(op, d), 1.0)) == ("NOT_AUTHENTICATED", op)
    assert s.state is state


@pytest.mark.parametrize("op", READY_OPS)
@pytest.mark.parametrize("d", BAD_D)
def test_ready_only_ops_with_bad_payload_after_ready_are_invalid_payload(op: str, d: Any) -> None:
    s = session_in(State.READY)
    assert only_error(s.receive(frame(op, d), 1.0)) == ("INVALID_PAYLOAD", op)
    assert s.state is State.READY


@pytest.mark.parametrize("status", ["offline", "OFFLINE", "Online", "away", "", 1, None])
def test_presence_outside_the_four_statuses_is_invalid_payload(status: Any) -> None:
    s = session_in(State.READY)
    effects = s.receive(frame("PRESENCE_UPDATE", {"status": status}), 1.0)
    assert only_error(effects) == ("INVALID_PAYLOAD", "PRESENCE_UPDATE")


@pytest.mark.parametrize("status", ["online", "idle", "dnd", "invisible"])
def test_presence_update_with_a_settable_status(status: str) -> None:
    s = session_in(State.READY)
    assert s.receive(frame("PRESENCE_UPDATE", {"status": status}), 1.0) == [
        SetPresence(Status(status))
    ]


def test_unsubscribe_is_always_answered_unsubscribed() -> None:
    s = session_in(State.READY)
    # not subscribed: UNSUBSCRIBED, and nothing to unroute
    d = only_dispatch(s.receive(frame("UNSUBSCRIBE_SERVER", {"serverId": "nowhere"}), 1.0))
    assert (d["op"], d["d"]) == ("UNSUBSCRIBED", {"serverId": "nowhere"})
    # subscribed: unroute first, then UNSUBSCRIBED
    assert s.receive(frame("SUBSCRIBE_SERVER", {"serverId": "s1"}), 1.0) == [Subscribe("s1")]
    only_dispatch(s.subscribe_confirmed("s1"))
    effects = s.receive(frame("UNSUBSCRIBE_SERVER", {"serverId": "s1"}), 1.0)
    assert effects[0] == Unsubscribe("s1")
    d = only_dispatch(effects[1:])
    assert (d["op"], d["d"]) == ("UNSUBSCRIBED", {"serverId": "s1"})
    assert s.subscriptions == set()


def test_subscriptions_are_a_set() -> None:
    s = session_in(State.READY)
    for _ in range(2):
        effects = s.receive(frame("SUBSCRIBE_SERVER", {"serverId": "s1"}), 1.0)
        if effects == [Subscribe("s1")]:
            effects = s.subscribe_confirmed("s1")
        d = only_dispatch(effects)
        assert (d["op"], d["d"]) == ("SUBSCRIBED", {"serverId": "s1"})
    assert s.subscriptions == {"s1"}
    effects = s.receive(frame("UNSUBSCRIBE_SERVER", {"serverId": "s1"}), 1.0)
    assert effects[0] == Unsubscribe("s1")  # one UNSUBSCRIBE ends delivery
    assert s.subscriptions == set()


def test_repeat_subscribe_answers_subscribed_without_counting_toward_the_cap() -> None:
    s = session_in(State.READY)  # max_subscriptions = 2
    for sid in ("a", "b"):
        assert s.receive(frame("SUBSCRIBE_SERVER", {"serverId": sid}), 1.0) == [Subscribe(sid)]
        only_dispatch(s.subscribe_confirmed(sid))
    # at the cap, a repeat is answered SUBSCRIBED at once (no membership round trip) ...
    d = only_dispatch(s.receive(frame("SUBSCRIBE_SERVER", {"serverId": "a"}), 1.0))
    assert (d["op"], d["d"]) == ("SUBSCRIBED", {"serverId": "a"})
    # ... and a new server is over the cap
    effects = s.receive(frame("SUBSCRIBE_SERVER", {"serverId": "c"}), 1.0)
    assert only_error(effects) == ("TOO_MANY_SUBSCRIPTIONS", "SUBSCRIBE_SERVER")
    assert s.subscriptions == {"a", "b"}
    # freeing a slot lets it in
    s.receive(frame("UNSUBSCRIBE_SERVER", {"serverId": "a"}), 1.0)
    assert s.receive(frame("SUBSCRIBE_SERVER", {"serverId": "c"}), 1.0) == [Subscribe("c")]


@pytest.mark.parametrize(
    "raw",
    [
        frame(1),
        frame(None),
        frame(True),
        frame(["IDENTIFY"]),
        frame({"name": "IDENTIFY"}),
        frame(1.5),
        json.dumps({"d": {"token": "jwt"}}),
        "{}",
    ],
)
def test_error_op_is_null_when_op_is_not_a_string(raw: str) -> None:
    for state in (State.AWAITING_IDENTIFY, State.READY):
        assert only_error(session_in(state).receive(raw, 1.0)) == ("UNKNOWN_OP", None)


@pytest.mark.parametrize(
    "op",
    ["READY", "HELLO", "HEARTBEAT_ACK", "ERROR", "SUBSCRIBED", "UNSUBSCRIBED", "RECONNECT",
     "MESSAGE_CREATE", "identify", "Heartbeat", "", " HEARTBEAT", "\ud800"],
)
def test_unknown_string_op_is_unknown_op_naming_it(op: str) -> None:
    for state in (State.AWAITING_IDENTIFY, State.IDENTIFYING, State.READY):
        s = session_in(state)
        effects = s.receive(frame(op, {"token": "jwt"}), 1.0)
        assert only_error(effects) == ("UNKNOWN_OP", op)
        assert isinstance(effects[0], Send)
        effects[0].text.encode("utf-8")  # a lone surrogate is escaped, never sent raw
        assert s.state is state


@pytest.mark.parametrize(
    "raw",
    ["", "not json", "{", '{"op":"HEARTBEAT"', "[]", '["HEARTBEAT"]', "null", "42", '"op"',
     '{"op":"HEARTBEAT","d":NaN}', "[" * 100_000, b'{"op":"HEARTBEAT","d":null}', b"\xff"],
)
def test_decode_errors_have_a_null_op(raw: str | bytes) -> None:
    s = session_in(State.READY)
    assert only_error(s.receive(raw, 1.0)) == ("DECODE_ERROR", None)
    assert s.state is State.READY


def test_unknown_extra_fields_are_ignored() -> None:
    s = new_session()
    raw = json.dumps({"op": "IDENTIFY", "d": {"token": "jwt", "x": 1}, "s": 5, "t": "y"})
    assert s.receive(raw, 1.0) == [Authenticate("jwt")]


@pytest.mark.parametrize("d", [None, {}, 0, "x", [1, 2], {"nested": [None, {"a": True}]}])
def test_heartbeat_d_is_ignored(d: Any) -> None:
    s = new_session()
    assert is_ack(s.receive(frame("HEARTBEAT", d), 1.0))
    assert is_ack(s.receive(json.dumps({"op": "HEARTBEAT"}), 1.0))


# --- HELLO, READY and sequence numbers -------------------------------------------------


def test_hello_is_a_control_frame_with_the_session_id() -> None:
    (effect,) = new_session().hello()
    assert parse(effect) == {"op": "HELLO", "d": {"heartbeatInterval": 30000, "sessionId": SID}}


def test_ready_has_s_1_and_the_hello_session_id() -> None:
    s = session_in(State.IDENTIFYING)
    ready = only_dispatch(s.identified(ALICE, [HOME], Status.DND))
    assert ready == {
        "op": "READY",
        "s": 1,
        "d": {
            "sessionId": SID,
            "user": {"id": "u1", "username": "alice", "displayName": "Alice",
                     "avatarUrl": None, "status": "dnd"},
            "servers": [{"id": "s1", "name": "Home", "ownerId": "u1", "iconUrl": None,
                         "memberCount": 0, "large": False}],
        },
    }
    assert s.user_id == "u1"


def test_dispatch_sequence_is_gapless_across_kinds_of_dispatch() -> None:
    s = session_in(State.READY)  # READY was s=1
    seqs = []
    s.receive(frame("SUBSCRIBE_SERVER", {"serverId": "s1"}), 1.0)
    seqs.append(only_dispatch(s.subscribe_confirmed("s1"))["s"])
    seqs.append(json.loads(s.stamp(dispatch_template("MESSAGE_CREATE", {"id": 1})))["s"])
    assert is_ack(s.receive(frame("HEARTBEAT"), 1.0))  # control frames take no number
    only_error(s.receive("nope", 1.0))
    seqs.append(only_dispatch(s.receive(frame("SUBSCRIBE_SERVER", {"serverId": "s1"}), 1.0))["s"])
    seqs.append(only_dispatch(s.unsubscribe("s1")[1:])["s"])
    seqs.append(json.loads(s.stamp(dispatch_template("X", None)))["s"])
    assert seqs == [2, 3, 4, 5, 6]


def test_identified_only_counts_while_identifying() -> None:
    for state in (State.AWAITING_IDENTIFY, State.READY, State.CLOSED):
        s = session_in(state)
        assert s.identified(ALICE, [HOME], Status.ONLINE) == []
        assert s.state is state


@pytest.mark.parametrize("code", [4004, 4000])
def test_identify_failed_closes_with_the_given_code(code: int) -> None:
    s = session_in(State.IDENTIFYING)
    assert s.identify_failed(code, "authentication failed") == [
        Close(code, "authentication failed")
    ]
    assert s.state is State.CLOSED
    assert s.identify_failed(code, "again") == []


def test_shell_outcomes_after_close_are_ignored() -> None:
    s = session_in(State.READY)
    s.receive(frame("SUBSCRIBE_SERVER", {"serverId": "s1"}), 1.0)
    assert s.close(CloseCode.SLOW_CONSUMER, "slow consumer") == [Close(4010, "slow consumer")]
    assert s.subscribe_confirmed("s1") == []
    assert s.refuse(ErrorCode.FORBIDDEN, "no", "SUBSCRIBE_SERVER") == []
    assert s.unsubscribe("s1") == []
    assert s.receive(frame("HEARTBEAT"), 2.0) == []
    assert s.check_timers(1e9) == []
    assert s.close(1000, "again") == []


def test_refusals_answer_error_naming_the_op() -> None:
    s = session_in(State.READY)
    assert s.receive(frame("SUBSCRIBE_SERVER", {"serverId": "zz"}), 1.0) == [Subscribe("zz")]
    effects = s.refuse(ErrorCode.NOT_FOUND, "unknown server", "SUBSCRIBE_SERVER")
    assert only_error(effects) == ("NOT_FOUND", "SUBSCRIBE_SERVER")
    assert s.subscriptions == set()
    assert s.receive(frame("TYPING_START", {"channelId": "c9"}), 1.0) == [StartTyping("c9")]
    effects = s.refuse(ErrorCode.FORBIDDEN, "missing READ_MESSAGES", "TYPING_START")
    assert only_error(effects) == ("FORBIDDEN", "TYPING_START")
    assert s.state is State.READY


# --- timers --------------------------------------------------------------------------


def test_identify_deadline_runs_from_connect_and_heartbeats_do_not_stop_it() -> None:
    s = new_session(now=10.0)
    for t in (11.0, 12.0, 13.0, 14.0, 14.9):
        assert is_ack(s.receive(frame("HEARTBEAT"), t))
    assert s.check_timers(14.999) == []
    assert s.check_timers(15.0) == [Close(4003, "not authenticated in time")]


def test_no_identify_timeout_once_identify_arrived() -> None:
    s = session_in(State.IDENTIFYING)
    assert s.check_timers(5.0) == []
    assert s.check_timers(59.0) == []
    s2 = session_in(State.READY)
    assert s2.check_timers(30.0) == []


@pytest.mark.parametrize("state", [State.AWAITING_IDENTIFY, State.IDENTIFYING, State.READY])
def test_heartbeat_timeout_runs_from_connect_then_from_the_last_heartbeat(state: State) -> None:
    config = SessionConfig(identify_timeout=1000.0, heartbeat_timeout=60.0)
    s = Session(SID, config, 0.0)
    if state is not State.AWAITING_IDENTIFY:
        s.receive(frame("IDENTIFY", {"token": "jwt"}), 0.0)
    if state is State.READY:
        s.identified(ALICE, [], Status.ONLINE)
    assert s.check_timers(60.0) == []  # not older than 60 s yet
    assert is_ack(s.receive(frame("HEARTBEAT"), 50.0))
    assert s.check_timers(110.0) == []
    assert s.check_timers(110.001) == [Close(4009, "session timed out")]
    assert s.check_timers(200.0) == []


def test_heartbeat_timeout_from_connect() -> None:
    s = session_in(State.READY)
    assert s.check_timers(60.5) == [Close(4009, "session timed out")]


# --- rate limit ----------------------------------------------------------------------


def test_rate_limit_counts_every_frame_and_closes_on_the_first_one_beyond() -> None:
    config = SessionConfig(rate_limit_count=4, rate_limit_window=10.0)
    s = Session(SID, config, 0.0)
    kinds: list[str | bytes] = [frame("HEARTBEAT"), "garbage", b"\x00",
                                frame("IDENTIFY", {"token": 5})]
    for raw in kinds:  # four frames of every kind, all counted
        effects = s.receive(raw, 1.0)
        assert effects and not any(isinstance(e, Close) for e in effects)
    assert s.receive(frame("HEARTBEAT"), 10.999) == [Close(4008, "rate limited")]
    assert s.state is State.CLOSED


def test_rate_limit_window_slides() -> None:
    config = SessionConfig(rate_limit_count=3, rate_limit_window=10.0)
    s = Session(SID, config, 0.0)
    hb = frame("HEARTBEAT")
    for t in (0.0, 4.0, 8.0):
        assert is_ack(s.receive(hb, t))
    assert is_ack(s.receive(hb, 10.0))  # the frame at 0.0 left the window [0.0, 10.0)
    assert is_ack(s.receive(hb, 14.0))  # 4.0 left
    # 8.0, 10.0, 14.0 are within 10 s of 17.9: a fourth closes
    assert s.receive(hb, 17.9) == [Close(4008, "rate limited")]


def test_rate_limit_is_not_a_fixed_bucket() -> None:
    """A burst at the end of one bucket and the start of the next must be caught."""
    config = SessionConfig(rate_limit_count=3, rate_limit_window=10.0)
    s = Session(SID, config, 0.0)
    hb = frame("HEARTBEAT")
    for t in (9.0, 9.5, 9.9):
        assert is_ack(s.receive(hb, t))
    assert s.receive(hb, 10.1) == [Close(4008, "rate limited")]


def test_sliding_window() -> None:
    """At most ``count`` events in any half-open span of ``window`` seconds."""
    w = SlidingWindow(2, 1.0)
    assert w.admit(0.0)
    assert w.admit(0.0)
    assert not w.admit(0.5)
    assert w.admit(1.0)  # the events at 0.0 are a full window old
    assert w.admit(1.0)
    assert not w.admit(1.5)
    assert not w.admit(1.999)
    assert w.admit(2.0)


def test_the_window_keeps_only_the_stamps_that_can_still_decide() -> None:
    """A busy minute then quiet: the next event finds the old stamps gone (an idle
    session holds one or two, not ``count``), and the limit decides as before."""
    w = SlidingWindow(120, 60.0)
    for i in range(100):
        assert w.admit(i * 0.1)
    assert len(w.stamps) == 100
    assert w.admit(200.0)
    assert w.stamps == (200.0,)
    for i in range(119):
        assert w.admit(200.0 + i * 0.01)
    assert not w.admit(201.5)  # 120 within the window: refused
    w.merge((150.0, 199.0))  # a resumed session's window joins: the last 120 stay
    assert len(w.stamps) == 120 and w.stamps[0] == 200.0


def test_a_kept_dispatch_costs_one_slot_not_an_object() -> None:
    """The replay buffer of a busy session keeps ``resume_buffer_frames`` dispatches
    of templates shared by every session: per frame only a deque slot (8 bytes), no
    ``(s, template)`` tuple nor ``s`` int (92 bytes a frame before). tracemalloc
    counts bytes, not time."""

    config = SessionConfig(resume_ttl=30.0)
    templates = [dispatch_template("E", {"i": i}) for i in range(config.resume_buffer_frames)]
    session = Session("sid", config, 0.0)
    gc.collect()
    tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    for template in templates:
        session.stamp(template)
    gc.collect()
    after, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(session.replay) == config.resume_buffer_frames
    assert (after - before) / config.resume_buffer_frames < 16
    assert [s for s, _ in session.replay.items()] == list(range(1, len(templates) + 1))
