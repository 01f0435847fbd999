"""What a :class:`~entrypoints.client.GatewayClient` yields, and what it raises.

Everything the client observes arrives through one async iterator, in order: the
server's dispatches (:class:`Dispatch`, with their ``s``) interleaved with the
client's own state events (:class:`Connected`, :class:`Disconnected`,
:class:`SessionLost`) and the server's ERROR frames (:class:`ServerError`) and
protocol faults (:class:`ProtocolFault`). Nothing is delivered through callbacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Close code the client sends when it drops a connection it means to resume
#: (zombie connection, protocol fault, RECONNECT not followed by a close). Any code
#: other than 1000 and 1001 keeps the session resumable (PROTOCOL section 13).
CLIENT_RECONNECT_CLOSE = 4900

#: Server close codes after which reconnecting would be pointless.
FATAL_CLOSE_CODES = frozenset({4004, 4014})
#: Server close codes after which the session is gone (a fresh IDENTIFY follows).
SESSION_ENDING_CLOSE_CODES = frozenset({4000, 4004, 4010, 4014})


@dataclass(frozen=True, slots=True)
class Dispatch:
    """A dispatch frame from the server: READY, SUBSCRIBED, TYPING_START,
    PRESENCE_UPDATE, RESUMED, or any event another service published."""

    op: str
    d: Any
    s: int


@dataclass(frozen=True, slots=True)
class Connected:
    """The connection is usable: after READY (``resumed`` false: a fresh session,
    whose subscriptions and presence interest the client has just restored) or after
    RESUMED (``resumed`` true: nothing was lost; ``replayed`` dispatches came first)."""

    session_id: str
    resumed: bool
    url: str
    replayed: int = 0
    user: dict[str, Any] | None = field(default=None, compare=False)
    servers: list[dict[str, Any]] = field(default_factory=list, compare=False)


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The connection ended. ``code`` is the close code (``None`` when no connection
    was established); ``reconnect_in`` the backoff delay before the next attempt, or
    ``None`` when the client stops."""

    code: int | None
    reason: str
    reconnect_in: float | None


@dataclass(frozen=True, slots=True)
class SessionLost:
    """The previous session could not be resumed (INVALID_SESSION, or a server
    without RESUME): events published while disconnected may be missing. The client
    identifies afresh on the same connection."""

    reason: str


@dataclass(frozen=True, slots=True)
class ServerError:
    """An ERROR frame: the server refused one client frame (the connection stays)."""

    code: str
    message: str
    op: str | None


@dataclass(frozen=True, slots=True)
class ProtocolFault:
    """The server broke the protocol (a frame that is not a JSON object with a
    string ``op``, a dispatch whose ``s`` is not the previous ``s + 1``, ...). The
    client drops the connection and resumes from the last good ``s``."""

    message: str


ClientEvent = Dispatch | Connected | Disconnected | SessionLost | ServerError | ProtocolFault


class ClientError(Exception):
    """Base class of the errors a :class:`GatewayClient` raises."""


class AuthenticationFailed(ClientError):
    """The gateway closed with 4004: the token is not valid. Retrying cannot help."""


class SessionTakenOver(ClientError):
    """The gateway closed with 4014: another connection resumed this session."""


class GatewayUnavailable(ClientError):
    """``max_attempts`` consecutive connection attempts failed."""


class NotConnected(ClientError):
    """The op needs a READY connection and there is none right now."""


class ClientClosed(ClientError):
    """The client was closed."""
