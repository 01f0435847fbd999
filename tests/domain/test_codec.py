"""Property tests of the wire codec: client command decoding, server frames and
publish envelopes (PROTOCOL sections 2-4, 6, 7a, 8).

The expected result of decoding is computed by :func:`oracle`, a direct reading of
the protocol tables that shares no code with ``domain.codec``.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.codec import (
    HEARTBEAT_ACK_FRAME,
    RECONNECT_FRAME,
    Command,
    Envelope,
    ErrorCode,
    Heartbeat,
    Identify,
    InvalidEnvelope,
    PresenceUpdate,
    ProtocolError,
    Resume,
    SubscribePresence,
    SubscribeServer,
    TypingStart,
    UnsubscribeServer,
    decode_command,
    decode_envelope,
    dispatch_template,
    encode_control,
    encode_envelope,
    encode_error,
)
from domain.model import Status

CLIENT_OPS = (
    "IDENTIFY",
    "HEARTBEAT",
    "SUBSCRIBE_SERVER",
    "UNSUBSCRIBE_SERVER",
    "TYPING_START",
    "PRESENCE_UPDATE",
)
SETTABLE = ("online", "idle", "dnd", "invisible")


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_loads(text: str | bytes) -> Any:
    """RFC 8259 JSON: what a strict client (JSON.parse) accepts."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    return json.loads(text, parse_constant=_no_constants)


# --- the oracle ------------------------------------------------------------------------


def oracle(raw: str | bytes) -> Command | tuple[str, str | None]:
    """What PROTOCOL says one client message is: a command, or (ERROR code, op)."""
    if isinstance(raw, bytes):
        return ("DECODE_ERROR", None)
    try:
        doc = strict_loads(raw)
    except (ValueError, RecursionError):
        return ("DECODE_ERROR", None)
    if not isinstance(doc, dict):
        return ("DECODE_ERROR", None)
    op = doc.get("op")
    if not isinstance(op, str):
        return ("UNKNOWN_OP", None)
    if op not in CLIENT_OPS:
        return ("UNKNOWN_OP", op)
    if op == "HEARTBEAT":
        return Heartbeat()
    d = doc.get("d")
    if op == "RESUME":  # section 13: two strings and a non-negative int (no bool)
        if not isinstance(d, dict):
            return ("INVALID_PAYLOAD", op)
        token, sid, seq = d.get("token"), d.get("sessionId"), d.get("seq")
        if not (isinstance(token, str) and isinstance(sid, str)):
            return ("INVALID_PAYLOAD", op)
        if type(seq) is not int or seq < 0:
            return ("INVALID_PAYLOAD", op)
        return Resume(token, sid, seq)
    field = {"IDENTIFY": "token", "SUBSCRIBE_SERVER": "serverId",
             "UNSUBSCRIBE_SERVER": "serverId", "TYPING_START": "channelId",
             "PRESENCE_UPDATE": "status"}[op]
    value = d.get(field) if isinstance(d, dict) else None
    if not isinstance(value, str):
        return ("INVALID_PAYLOAD", op)
    if op == "IDENTIFY":
        return Identify(value)
    if op == "SUBSCRIBE_SERVER":
        return SubscribeServer(value)
    if op == "UNSUBSCRIBE_SERVER":
        return UnsubscribeServer(value)
    if op == "TYPING_START":
        return TypingStart(value)
    if value not in SETTABLE:
        return ("INVALID_PAYLOAD", op)
    return PresenceUpdate(Status(value))


def outcome(result: Command | ProtocolError) -> Command | tuple[str, str | None]:
    if isinstance(result, ProtocolError):
        assert isinstance(result.message, str) and result.message
        return (result.code.value, result.op)
    return result


# --- strategies ------------------------------------------------------------------------

#: Any text, lone surrogates included.
any_text = st.text(st.characters(exclude_categories=()), max_size=12)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | any_text
)
json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=10,
)
op_names = st.sampled_from(
    [*CLIENT_OPS, "READY", "HELLO", "HEARTBEAT_ACK", "ERROR", "identify", "", "X"]
) | any_text
payload_like = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {},
        optional={
            "token": json_scalars,
            "serverId": json_scalars,
            "channelId": json_scalars,
            "status": st.sampled_from([*SETTABLE, "offline", "ONLINE", ""]) | json_scalars,
            "userIds": st.lists(any_text | json_scalars, max_size=3) | json_scalars,
        },
    ),
)
frame_docs = st.fixed_dictionaries(
    {},
    optional={"op": op_names | json_values, "d": payload_like, "s": json_scalars,
              "extra": json_values},
)


def dumps(value: Any, ensure_ascii: bool) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii)


frame_texts = st.builds(dumps, frame_docs, st.booleans())
commands: st.SearchStrategy[Command] = st.one_of(
    st.builds(Identify, any_text),
    st.just(Heartbeat()),
    st.builds(SubscribeServer, any_text),
    st.builds(UnsubscribeServer, any_text),
    st.builds(TypingStart, any_text),
    st.builds(PresenceUpdate, st.sampled_from([Status(s) for s in SETTABLE])),
    st.builds(Resume, any_text, any_text, st.integers(min_value=0, max_value=2**63)),
    st.builds(SubscribePresence, any_text, st.lists(any_text, max_size=100).map(tuple)),
)


def command_frame(command: Command) -> dict[str, Any]:
    """The client frame for ``command``, written from the op table of section 3."""
    if isinstance(command, Identify):
        return {"op": "IDENTIFY", "d": {"token": command.token}}
    if isinstance(command, Heartbeat):
        return {"op": "HEARTBEAT", "d": None}
    if isinstance(command, SubscribeServer):
        return {"op": "SUBSCRIBE_SERVER", "d": {"serverId": command.server_id}}
    if isinstance(command, UnsubscribeServer):
        return {"op": "UNSUBSCRIBE_SERVER", "d": {"serverId": command.server_id}}
    if isinstance(command, TypingStart):
        return {"op": "TYPING_START", "d": {"channelId": command.channel_id}}
    if isinstance(command, Resume):
        d = {"token": command.token, "sessionId": command.session_id, "seq": command.seq}
        return {"op": "RESUME", "d": d}
    if isinstance(command, SubscribePresence):
        d = {"serverId": command.server_id, "userIds": list(command.user_ids)}
        return {"op": "SUBSCRIBE_PRESENCE", "d": d}
    return {"op": "PRESENCE_UPDATE", "d": {"status": command.status.value}}


# --- decode_command ------------------------------------------------------------------


@given(st.text(st.characters(exclude_categories=())))
def test_decode_arbitrary_text_never_raises(raw: str) -> None:
    result = decode_command(raw)
    assert outcome(result) == oracle(raw)


@given(st.binary())
def test_binary_frames_are_decode_errors(raw: bytes) -> None:
    result = decode_command(raw)
    assert isinstance(result, ProtocolError)
    assert (result.code, result.op) == (ErrorCode.DECODE_ERROR, None)


@settings(max_examples=300)
@given(frame_texts)
def test_decode_json_frames_matches_the_protocol(raw: str) -> None:
    assert outcome(decode_command(raw)) == oracle(raw)


@given(json_values.filter(lambda v: not isinstance(v, dict)))
def test_json_that_is_not_an_object_is_a_decode_error(value: Any) -> None:
    assert outcome(decode_command(json.dumps(value))) == ("DECODE_ERROR", None)


@given(st.text(max_size=20), st.integers(0, 30))
def test_truncated_frames_never_raise(token: str, cut: int) -> None:
    raw = json.dumps({"op": "IDENTIFY", "d": {"token": token}})[:cut]
    assert outcome(decode_command(raw)) == oracle(raw)


@given(commands, st.dictionaries(st.sampled_from(["s", "t", "x", "id"]), json_values),
       st.booleans())
def test_commands_round_trip_and_extra_fields_are_ignored(
    command: Command, extra: dict[str, Any], ascii_only: bool
) -> None:
    doc = {**extra, **command_frame(command)}
    assert decode_command(json.dumps(doc, ensure_ascii=ascii_only)) == command


@given(json_values)
def test_heartbeat_ignores_d(d: Any) -> None:
    assert decode_command(json.dumps({"op": "HEARTBEAT", "d": d})) == Heartbeat()


@pytest.mark.parametrize(
    "raw",
    [
        '{"op":"HEARTBEAT","d":NaN}',
        '{"op":"HEARTBEAT","d":Infinity}',
        '{"op":"IDENTIFY","d":{"token":-Infinity}}',
        "NaN",
        "[" * 100_000,
        '{"op":' * 50_000,
        '{"op":"HEARTBEAT","d":' + "[" * 50_000 + "]" * 50_000 + "}",
        '{"op":"HEARTBEAT"} x',
        "{'op':'HEARTBEAT'}",
        "",
    ],
)
def test_malformed_or_absurd_json_is_a_decode_error(raw: str) -> None:
    """Not JSON (NaN, Infinity, trailing data, single quotes), or nested deeper than the parser
    goes: DECODE_ERROR, never an exception (a 64 KiB frame can nest 32k levels)."""
    result = decode_command(raw)
    assert isinstance(result, ProtocolError)
    assert (result.code, result.op) == (ErrorCode.DECODE_ERROR, None)


def test_lone_surrogate_escapes_are_accepted_and_never_sent_raw() -> None:
    result = decode_command('{"op":"\\ud800x","d":null}')
    assert isinstance(result, ProtocolError)
    assert (result.code, result.op) == (ErrorCode.UNKNOWN_OP, "\ud800x")
    encode_error(result).encode("utf-8")
    assert decode_command('{"op":"IDENTIFY","d":{"token":"\\udfff"}}') == Identify("\udfff")


# --- server frames ---------------------------------------------------------------------


@given(st.sampled_from(["HELLO", "HEARTBEAT_ACK", "ERROR", "RECONNECT"]) | any_text, json_values)
def test_encode_control_has_exactly_op_and_d(op: str, d: Any) -> None:
    text = encode_control(op, d)
    text.encode("utf-8")  # no lone surrogate reaches the socket
    assert strict_loads(text) == {"op": op, "d": d}


def test_constant_control_frames() -> None:
    assert strict_loads(HEARTBEAT_ACK_FRAME) == {"op": "HEARTBEAT_ACK", "d": None}
    assert strict_loads(RECONNECT_FRAME) == {"op": "RECONNECT", "d": None}


@given(st.sampled_from(list(ErrorCode)), any_text, st.none() | any_text)
def test_encode_error(code: ErrorCode, message: str, op: str | None) -> None:
    text = encode_error(ProtocolError(code, message, op))
    text.encode("utf-8")
    assert strict_loads(text) == {
        "op": "ERROR",
        "d": {"code": code.value, "message": message, "op": op},
    }


@given(any_text, json_values, st.integers(1, 2**63))
def test_dispatch_frame_has_op_d_and_s(op: str, d: Any, seq: int) -> None:
    template = dispatch_template(op, d)
    assert template.op == op
    text = template.frame(seq)
    text.encode("utf-8")
    assert strict_loads(text) == {"op": op, "d": d, "s": seq}


@given(any_text, json_values)
def test_one_template_many_connections(op: str, d: Any) -> None:
    template = dispatch_template(op, d)
    frames = [strict_loads(template.frame(s)) for s in (1, 2, 10, 12345)]
    assert [f["s"] for f in frames] == [1, 2, 10, 12345]
    assert all(f["op"] == op and f["d"] == d for f in frames)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, {"x": [math.nan]}])
def test_nan_is_never_encoded(bad: Any) -> None:
    """NaN/Infinity are not JSON: refusing them beats sending a frame a client
    cannot parse."""
    with pytest.raises(ValueError):
        dispatch_template("X", bad)
    with pytest.raises(ValueError):
        encode_control("X", bad)
    with pytest.raises(ValueError):
        encode_envelope({"op": "X", "d": bad})


# --- envelopes -------------------------------------------------------------------------


def envelope_oracle(payload: bytes | str) -> Envelope | None:
    """PROTOCOL 7a: None when the envelope is invalid."""
    try:
        doc = strict_loads(payload)
    except (ValueError, RecursionError):  # includes UnicodeDecodeError
        return None
    if not isinstance(doc, dict):
        return None
    event = doc.get("event")
    if not isinstance(event, dict) or not isinstance(event.get("op"), str):
        return None
    channel = doc.get("channelId")
    exclude = doc.get("excludeUserId")
    for value in (channel, exclude):
        if value is not None and not isinstance(value, str):
            return None
    return Envelope(event["op"], event.get("d"), channel, exclude)


def decode_or_none(payload: bytes | str) -> Envelope | None:
    try:
        return decode_envelope(payload)
    except InvalidEnvelope:
        return None


envelope_docs = st.fixed_dictionaries(
    {},
    optional={
        "event": st.fixed_dictionaries({}, optional={"op": op_names | json_values,
                                                     "d": json_values})
        | json_values,
        "channelId": st.none() | any_text | json_values,
        "excludeUserId": st.none() | any_text | json_values,
        "extra": json_values,
    },
)


@settings(max_examples=250)
@given(envelope_docs, st.booleans(), st.booleans())
def test_decode_envelope_matches_the_protocol(
    doc: dict[str, Any], ascii_only: bool, as_bytes: bool
) -> None:
    text = json.dumps(doc, ensure_ascii=ascii_only)
    payload: str | bytes = text.encode("utf-8", "surrogatepass") if as_bytes else text
    assert decode_or_none(payload) == envelope_oracle(payload)


@given(st.binary() | st.text(st.characters(exclude_categories=())))
def test_decode_envelope_raises_only_invalid_envelope(payload: bytes | str) -> None:
    assert decode_or_none(payload) == envelope_oracle(payload)


UTF8 = "not UTF-8 JSON"
OBJ = "not an object"
EVENT = "'event' object"
OP = "'event.op'"
CHANNEL = "'channelId'"
EXCLUDE = "'excludeUserId'"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff\xfe", UTF8),
        (b'{"event":{"op":"X","d":"\xed\xa0\x80"}}', UTF8),  # an encoded surrogate
        ('{"event":{"op":"X"}}'.encode("utf-16"), UTF8),
        ('{"event":{"op":"X"}}'.encode("utf-32"), UTF8),
        (b"", UTF8),
        (b"not json", UTF8),
        (b'{"event":{"op":"X","d":NaN}}', UTF8),
        (b'{"event":{"op":"X"}} {}', UTF8),
        (b"[" * 100_000, UTF8),
        (b"[]", OBJ),
        (b'"event"', OBJ),
        (b"null", OBJ),
        (b"{}", EVENT),
        (b'{"event":null}', EVENT),
        (b'{"event":"X"}', EVENT),
        (b'{"event":[{"op":"X"}]}', EVENT),
        (b'{"event":{}}', OP),
        (b'{"event":{"d":1}}', OP),
        (b'{"event":{"op":1}}', OP),
        (b'{"event":{"op":null}}', OP),
        (b'{"event":{"op":"X"},"channelId":1}', CHANNEL),
        (b'{"event":{"op":"X"},"channelId":["c1"]}', CHANNEL),
        (b'{"event":{"op":"X"},"excludeUserId":false}', EXCLUDE),
        (b'{"event":{"op":"X"},"excludeUserId":{"id":"u1"}}', EXCLUDE),
    ],
)
def test_every_rejection_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(InvalidEnvelope) as info:
        decode_envelope(payload)
    assert reason in str(info.value)
    if payload.isascii():  # the same text as str
        with pytest.raises(InvalidEnvelope) as info:
            decode_envelope(payload.decode("ascii"))
        assert reason in str(info.value)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b'{"event":{"op":"X"}}', Envelope("X", None)),
        (b'{"event":{"op":"X","d":null},"channelId":null,"excludeUserId":null}',
         Envelope("X", None)),
        (b'{"event":{"op":"X","d":[1]},"channelId":"c1","excludeUserId":"u1","v":2}',
         Envelope("X", [1], "c1", "u1")),
        ('{"event":{"op":"É","d":"\\ud800"}}'.encode(), Envelope("É", "\ud800")),
        ('{"event":{"op":"MESSAGE_CREATE","d":{"t":"ü"}}}', Envelope("MESSAGE_CREATE",
                                                                     {"t": "ü"})),
    ],
)
def test_valid_envelopes(payload: bytes | str, expected: Envelope) -> None:
    assert decode_envelope(payload) == expected


@given(op_names, json_values, st.none() | any_text, st.none() | any_text)
def test_envelope_round_trip(op: str, d: Any, channel: str | None, exclude: str | None) -> None:
    payload = encode_envelope({"op": op, "d": d}, channel, exclude)
    assert isinstance(payload, bytes)
    payload.decode("utf-8")
    assert decode_envelope(payload) == Envelope(op, d, channel, exclude)


@pytest.mark.parametrize("event", [{}, {"op": 1}, {"op": None, "d": 1}, {"d": "x"}])
def test_encode_envelope_refuses_an_event_without_a_string_op(event: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        encode_envelope(event)


# --- RESUME (PROTOCOL 13) ------------------------------------------------------------


@pytest.mark.parametrize(
    "d",
    [
        None, [], "x", {"sessionId": "a", "seq": 0}, {"token": 1, "sessionId": "a", "seq": 0},
        {"token": "t", "seq": 0}, {"token": "t", "sessionId": None, "seq": 0},
        {"token": "t", "sessionId": "a"}, {"token": "t", "sessionId": "a", "seq": -1},
        {"token": "t", "sessionId": "a", "seq": True},
        {"token": "t", "sessionId": "a", "seq": False},
        {"token": "t", "sessionId": "a", "seq": 1.0}, {"token": "t", "sessionId": "a", "seq": "1"},
    ],
)
def test_resume_invalid_payload(d: Any) -> None:
    decoded = decode_command(json.dumps({"op": "RESUME", "d": d}))
    assert isinstance(decoded, ProtocolError)
    assert decoded.code is ErrorCode.INVALID_PAYLOAD and decoded.op == "RESUME"


def test_resume_decodes() -> None:
    frame = {"op": "RESUME", "d": {"token": "t", "sessionId": "a", "seq": 0, "x": 1}}
    assert decode_command(json.dumps(frame)) == Resume("t", "a", 0)


# --- SUBSCRIBE_PRESENCE (PROTOCOL section 14) -------------------------------------------


@pytest.mark.parametrize(
    "d",
    [
        None, [], {"userIds": []}, {"serverId": 1, "userIds": []}, {"serverId": "s1"},
        {"serverId": "s1", "userIds": "u1"}, {"serverId": "s1", "userIds": ["u1", 2]},
        {"serverId": "s1", "userIds": [None]}, {"serverId": "s1", "userIds": {"u1": 1}},
        {"serverId": "s1", "userIds": [f"u{i}" for i in range(101)]},
    ],
)
def test_subscribe_presence_bad_payloads_are_invalid(d: Any) -> None:
    decoded = decode_command(json.dumps({"op": "SUBSCRIBE_PRESENCE", "d": d}))
    assert isinstance(decoded, ProtocolError)
    assert decoded.code is ErrorCode.INVALID_PAYLOAD and decoded.op == "SUBSCRIBE_PRESENCE"


def test_subscribe_presence_keeps_order_duplicates_and_100_ids() -> None:
    ids = [f"u{i}" for i in range(100)]
    frame = {"op": "SUBSCRIBE_PRESENCE", "d": {"serverId": "s1", "userIds": ids}}
    assert decode_command(json.dumps(frame)) == SubscribePresence("s1", tuple(ids))
    frame["d"] = {"serverId": "s1", "userIds": ["b", "a", "b"], "extra": 1}
    assert decode_command(json.dumps(frame)) == SubscribePresence("s1", ("b", "a", "b"))
    frame["d"] = {"serverId": "s1", "userIds": []}
    assert decode_command(json.dumps(frame)) == SubscribePresence("s1", ())


_REFERENCE = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


@given(
    value=st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats()  # NaN and the infinities included: both sides must refuse them
        | st.text(),
        lambda children: st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(max_size=5) | st.integers() | st.booleans() | st.none(), children, max_size=4
        ),
        max_leaves=20,
    )
)
@settings(max_examples=300, deadline=None)
def test_the_prebuilt_encoder_writes_what_json_writes(value: Any) -> None:
    """codec's encoder (the C encoder built once) gives json's bytes and json's errors,
    and a failed encode leaves no circular-check marker behind."""
    from domain import codec

    try:
        expected: str | type[BaseException] = _REFERENCE.encode(value)
    except (ValueError, TypeError) as exc:
        expected = type(exc)
    if isinstance(expected, str):
        assert codec._dumps(value) == expected
    else:
        with pytest.raises(expected):
            codec._dumps(value)
    assert codec._MARKERS == {}


def test_the_prebuilt_encoder_still_refuses_cycles() -> None:
    from domain import codec

    cycle: dict[str, Any] = {}
    cycle["self"] = [cycle]
    for _ in range(2):  # the second time too: the first left no marker behind
        with pytest.raises(ValueError, match="Circular"):
            codec._dumps(cycle)
    assert codec._dumps({"self": [{}]}) == '{"self":[{}]}'
