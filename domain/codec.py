"""The wire codec (PROTOCOL sections 2-4, 6, 7a, 8): pure and on the hot path.

Decoding turns one raw client message into a :class:`Command` or a
:class:`ProtocolError` (which the session answers with an ERROR frame). Encoding
builds frames; a dispatch is encoded once per event as a :class:`DispatchTemplate`
and each connection only splices in its own sequence number.
"""

from __future__ import annotations

import json
import json.encoder
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from domain.model import SETTABLE_STATUSES, ChannelId, ServerId, Status, UserId


class ErrorCode(StrEnum):
    DECODE_ERROR = "DECODE_ERROR"
    UNKNOWN_OP = "UNKNOWN_OP"
    INVALID_PAYLOAD = "INVALID_PAYLOAD"
    NOT_AUTHENTICATED = "NOT_AUTHENTICATED"
    ALREADY_AUTHENTICATED = "ALREADY_AUTHENTICATED"
    FORBIDDEN = "FORBIDDEN"
    NOT_FOUND = "NOT_FOUND"
    TOO_MANY_SUBSCRIPTIONS = "TOO_MANY_SUBSCRIPTIONS"
    NOT_SUBSCRIBED = "NOT_SUBSCRIBED"
    #: PROTOCOL 15: a backend call for the op failed; nothing changed, the client may
    #: send the op again (the connection stays).
    UNAVAILABLE = "UNAVAILABLE"


class CloseCode:
    GOING_AWAY = 1001
    MESSAGE_TOO_BIG = 1009
    UNEXPECTED = 4000
    NOT_AUTHENTICATED = 4003
    AUTHENTICATION_FAILED = 4004
    RATE_LIMITED = 4008
    SESSION_TIMED_OUT = 4009
    SLOW_CONSUMER = 4010
    #: Not in PROTOCOL's table: connection caps (README, "Limits"). 4000-4999 is the
    #: application range; clients treat unknown codes as "reconnect later".
    TOO_MANY_CONNECTIONS = 4013
    #: A RESUME of this session succeeded on another connection (PROTOCOL 13).
    SESSION_TAKEN_OVER = 4014


# --- client commands ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Identify:
    token: str


@dataclass(frozen=True, slots=True)
class Heartbeat:
    pass


@dataclass(frozen=True, slots=True)
class SubscribeServer:
    server_id: ServerId


@dataclass(frozen=True, slots=True)
class UnsubscribeServer:
    server_id: ServerId


@dataclass(frozen=True, slots=True)
class TypingStart:
    channel_id: ChannelId


@dataclass(frozen=True, slots=True)
class PresenceUpdate:
    status: Status


@dataclass(frozen=True, slots=True)
class Resume:
    token: str
    session_id: str
    seq: int


@dataclass(frozen=True, slots=True)
class SubscribePresence:
    """PROTOCOL section 14: the members whose presence this connection shows."""

    server_id: ServerId
    user_ids: tuple[UserId, ...]


#: At most this many ids in one SUBSCRIBE_PRESENCE.
MAX_PRESENCE_IDS = 100

Command = (
    Identify
    | Heartbeat
    | SubscribeServer
    | UnsubscribeServer
    | TypingStart
    | PresenceUpdate
    | Resume
    | SubscribePresence
)


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """A client frame that is answered with ERROR (the connection stays)."""

    code: ErrorCode
    message: str
    op: str | None = None


_HEARTBEAT = Heartbeat()


def _field(d: object, op: str, name: str) -> str | ProtocolError:
    if not isinstance(d, dict):
        return ProtocolError(ErrorCode.INVALID_PAYLOAD, f"{op}: 'd' must be an object", op)
    value = d.get(name)
    if not isinstance(value, str):
        return ProtocolError(ErrorCode.INVALID_PAYLOAD, f"{op}: 'd.{name}' must be a string", op)
    return value


def _identify(d: object) -> Command | ProtocolError:
    token = _field(d, "IDENTIFY", "token")
    return token if isinstance(token, ProtocolError) else Identify(token)


def _heartbeat(d: object) -> Command | ProtocolError:
    return _HEARTBEAT  # 'd' is ignored, whatever it holds (7a)


def _subscribe(d: object) -> Command | ProtocolError:
    sid = _field(d, "SUBSCRIBE_SERVER", "serverId")
    return sid if isinstance(sid, ProtocolError) else SubscribeServer(sid)


def _unsubscribe(d: object) -> Command | ProtocolError:
    sid = _field(d, "UNSUBSCRIBE_SERVER", "serverId")
    return sid if isinstance(sid, ProtocolError) else UnsubscribeServer(sid)


def _typing(d: object) -> Command | ProtocolError:
    cid = _field(d, "TYPING_START", "channelId")
    return cid if isinstance(cid, ProtocolError) else TypingStart(cid)


def _presence(d: object) -> Command | ProtocolError:
    status = _field(d, "PRESENCE_UPDATE", "status")
    if isinstance(status, ProtocolError):
        return status
    if status not in SETTABLE_STATUSES:
        return ProtocolError(
            ErrorCode.INVALID_PAYLOAD,
            "PRESENCE_UPDATE: 'd.status' must be one of online, idle, dnd, invisible",
            "PRESENCE_UPDATE",
        )
    return PresenceUpdate(Status(status))


def _resume(d: object) -> Command | ProtocolError:
    token = _field(d, "RESUME", "token")
    if isinstance(token, ProtocolError):
        return token
    session_id = _field(d, "RESUME", "sessionId")
    if isinstance(session_id, ProtocolError):
        return session_id
    assert isinstance(d, dict)
    seq = d.get("seq")
    # A JSON boolean is not an integer (bool is an int subclass in Python).
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        return ProtocolError(
            ErrorCode.INVALID_PAYLOAD, "RESUME: 'd.seq' must be a non-negative integer", "RESUME"
        )
    return Resume(token, session_id, seq)


def _subscribe_presence(d: object) -> Command | ProtocolError:
    op = "SUBSCRIBE_PRESENCE"
    sid = _field(d, op, "serverId")
    if isinstance(sid, ProtocolError):
        return sid
    assert isinstance(d, dict)
    ids = d.get("userIds")
    if not isinstance(ids, list) or not all(isinstance(u, str) for u in ids):
        return ProtocolError(
            ErrorCode.INVALID_PAYLOAD, f"{op}: 'd.userIds' must be a list of strings", op
        )
    if len(ids) > MAX_PRESENCE_IDS:
        return ProtocolError(
            ErrorCode.INVALID_PAYLOAD, f"{op}: at most {MAX_PRESENCE_IDS} 'd.userIds'", op
        )
    return SubscribePresence(sid, tuple(ids))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
# ensure_ascii: a lone surrogate from a JSON escape ("\ud800") must not reach the
# socket's UTF-8 encoder. allow_nan=False: NaN and Infinity are not JSON. Both are
# built once: json.loads/dumps with options build a new one per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


#: The decoder's scanner (set by JSONDecoder.__init__; typeshed does not declare it).
_SCAN: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]
_BLANKS = " \t\n\r"  # json's whitespace


def _loads(text: str) -> Any:
    """Strict JSON: NaN and Infinity are refused. Too deep a nesting raises
    RecursionError, which callers treat as malformed input."""
    # JSONDecoder.decode is scan_once at the first non-blank, then a check that only
    # blanks follow. A document with no blank around it (nearly every frame and
    # envelope) needs scan_once alone; anything else (and every error) takes decode,
    # which gives the same value or raises the same error as ever.
    if text and text[0] not in _BLANKS:
        try:
            value, end = _SCAN(text, 0)
        except StopIteration:
            pass
        else:
            if end == len(text):
                return value
    return _DECODER.decode(text)


@dataclass(frozen=True, slots=True)
class ClientOp:
    """One client op of PROTOCOL section 3: its wire name, its command and its parser."""

    name: str
    command: type[Command]
    parse: Callable[[object], Command | ProtocolError]


#: The one registry of client ops (the session table refers to their command types).
CLIENT_OPS: dict[str, ClientOp] = {
    op.name: op
    for op in (
        ClientOp("IDENTIFY", Identify, _identify),
        ClientOp("HEARTBEAT", Heartbeat, _heartbeat),
        ClientOp("SUBSCRIBE_SERVER", SubscribeServer, _subscribe),
        ClientOp("UNSUBSCRIBE_SERVER", UnsubscribeServer, _unsubscribe),
        ClientOp("TYPING_START", TypingStart, _typing),
        ClientOp("PRESENCE_UPDATE", PresenceUpdate, _presence),
        ClientOp("RESUME", Resume, _resume),
        ClientOp("SUBSCRIBE_PRESENCE", SubscribePresence, _subscribe_presence),
    )
}
_NAMES: dict[type[Command], str] = {op.command: op.name for op in CLIENT_OPS.values()}


def op_name(command: Command) -> str:
    """The wire name of a decoded command."""
    return _NAMES[type(command)]


def decode_command(raw: str | bytes) -> Command | ProtocolError:
    """One client message -> a validated command, or the ERROR to answer."""
    if not isinstance(raw, str):
        return ProtocolError(ErrorCode.DECODE_ERROR, "binary frames are not accepted")
    try:
        frame = _loads(raw)
    except (ValueError, RecursionError):
        return ProtocolError(ErrorCode.DECODE_ERROR, "frame is not valid JSON")
    if not isinstance(frame, dict):
        return ProtocolError(ErrorCode.DECODE_ERROR, "frame must be a JSON object")
    op = frame.get("op")
    if not isinstance(op, str):
        return ProtocolError(ErrorCode.UNKNOWN_OP, "'op' must be a string")
    client_op = CLIENT_OPS.get(op)
    if client_op is None:
        return ProtocolError(ErrorCode.UNKNOWN_OP, f"unknown op {op[:64]!r}", op)
    return client_op.parse(frame.get("d"))


# --- server frames -----------------------------------------------------------------


#: ``_ENCODER``'s own C encoder, built once (``JSONEncoder.encode`` builds one per call
#: for anything but a string: about half the cost of encoding a small event). It keeps
#: the circular-reference check; its markers are cleared after a failed encode, which
#: leaves the markers of the objects it was inside. One encode at a time: it runs in C
#: under the GIL and calls back into Python only to fail (``default``).
_MARKERS: dict[int, Any] = {}
_MAKE_C_ENCODER: Callable[..., Callable[[Any, int], Any]] | None = getattr(
    json.encoder, "c_make_encoder", None
)  # CPython's _json accelerator (typeshed does not declare it)
_C_ENCODE: Callable[[Any, int], Any] | None = (
    None
    if _MAKE_C_ENCODER is None
    else _MAKE_C_ENCODER(
        _MARKERS,
        _ENCODER.default,
        json.encoder.encode_basestring_ascii,
        None,
        _ENCODER.key_separator,
        _ENCODER.item_separator,
        _ENCODER.sort_keys,
        _ENCODER.skipkeys,
        _ENCODER.allow_nan,
    )
)


def _dumps(value: Any) -> str:
    if _C_ENCODE is None or isinstance(value, str):
        return _ENCODER.encode(value)
    try:
        return "".join(_C_ENCODE(value, 0))
    except BaseException:
        _MARKERS.clear()
        raise


def encode_control(op: str, d: Any) -> str:
    """HELLO, HEARTBEAT_ACK, ERROR, RECONNECT: no ``s`` key at all (7a)."""
    return '{"op":' + _dumps(op) + ',"d":' + _dumps(d) + "}"


def encode_error(error: ProtocolError) -> str:
    return encode_control(
        "ERROR", {"code": error.code.value, "message": error.message, "op": error.op}
    )


HEARTBEAT_ACK_FRAME = encode_control("HEARTBEAT_ACK", None)
RECONNECT_FRAME = encode_control("RECONNECT", None)
INVALID_SESSION_FRAME = encode_control("INVALID_SESSION", {"resumable": False})


@dataclass(frozen=True, slots=True)
class DispatchTemplate:
    """A dispatch frame encoded once; :meth:`frame` splices in a connection's ``s``."""

    op: str
    head: str  # '{"op":"X","d":...,"s":'

    def frame(self, seq: int) -> str:
        return self.head + str(seq) + "}"


def dispatch_template(op: str, d: Any) -> DispatchTemplate:
    return DispatchTemplate(op, '{"op":' + _dumps(op) + ',"d":' + _dumps(d) + ',"s":')


# --- publish envelopes (PROTOCOL section 8) ----------------------------------------


@dataclass(frozen=True, slots=True)
class Envelope:
    op: str
    d: Any
    channel_id: ChannelId | None = None
    exclude_user_id: UserId | None = None


class InvalidEnvelope(ValueError):
    pass


def _document(payload: bytes | str) -> Any:
    try:
        # Strict UTF-8: json.loads(bytes) would also accept UTF-16/32 and surrogates.
        text = payload.decode("utf-8") if isinstance(payload, bytes) else payload
        return _loads(text)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise InvalidEnvelope("not UTF-8 JSON") from exc


def _envelope(doc: Any) -> Envelope:
    if not isinstance(doc, dict):
        raise InvalidEnvelope("not an object")
    event = doc.get("event")
    if not isinstance(event, dict):
        raise InvalidEnvelope("no 'event' object")
    op = event.get("op")
    if not isinstance(op, str):
        raise InvalidEnvelope("'event.op' missing or not a string")
    channel_id = doc.get("channelId")
    if channel_id is not None and not isinstance(channel_id, str):
        raise InvalidEnvelope("'channelId' must be a string or null")
    exclude = doc.get("excludeUserId")
    if exclude is not None and not isinstance(exclude, str):
        raise InvalidEnvelope("'excludeUserId' must be a string or null")
    return Envelope(op, event.get("d"), channel_id, exclude)


def decode_envelope(payload: bytes | str) -> Envelope:
    """Validate an envelope from ``ws:server:*`` or ``ws:user:*`` (7a)."""
    return _envelope(_document(payload))


@dataclass(frozen=True, slots=True)
class PublishRequest:
    """The body of ``POST /api/publish``: an envelope and exactly one target."""

    envelope: Envelope
    server_id: ServerId | None = None
    user_id: UserId | None = None


def decode_publish_request(payload: bytes | str) -> PublishRequest:
    """PROTOCOL section 8, HTTP: the envelope rules plus exactly one of ``serverId``
    and ``userId`` (a non-empty string); ``channelId`` and ``excludeUserId`` only with
    ``serverId``. Raises :class:`InvalidEnvelope` with the reason."""
    doc = _document(payload)
    envelope = _envelope(doc)
    server_id, user_id = doc.get("serverId"), doc.get("userId")
    for name, value in (("serverId", server_id), ("userId", user_id)):
        if value is not None and (not isinstance(value, str) or not value):
            raise InvalidEnvelope(f"'{name}' must be a non-empty string")
    if (server_id is None) == (user_id is None):
        raise InvalidEnvelope("exactly one of 'serverId' and 'userId' is required")
    if user_id is not None and (envelope.channel_id or envelope.exclude_user_id) is not None:
        raise InvalidEnvelope("'channelId' and 'excludeUserId' apply only with 'serverId'")
    return PublishRequest(envelope, server_id, user_id)


def encode_envelope(
    event: dict[str, Any],
    channel_id: ChannelId | None = None,
    exclude_user_id: UserId | None = None,
) -> bytes:
    """The envelope other services PUBLISH; ``event`` is ``{"op": NAME, "d": ...}``."""
    op = event.get("op") if isinstance(event, dict) else None
    if not isinstance(op, str):
        raise ValueError("event must be an object with a string 'op'")
    body = {
        "event": {"op": op, "d": event.get("d")},
        "channelId": channel_id,
        "excludeUserId": exclude_user_id,
    }
    return _dumps(body).encode()
