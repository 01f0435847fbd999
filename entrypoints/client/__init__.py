"""An async client for the gateway (PROTOCOL.md), built on anyio and wsproto.

    from entrypoints.client import connect, Dispatch

    async with connect("ws://127.0.0.1:8000/ws/gateway", token, subscribe=["s1"]) as client:
        async for event in client:
            if isinstance(event, Dispatch) and event.op == "TYPING_START":
                print(event.d["username"], "is typing")

It keeps a session alive across connections: heartbeats with zombie detection,
RECONNECT, full-jitter backoff, RESUME with the last ``s`` (falling back to IDENTIFY,
then restoring subscriptions, presence interest and status), and a gapless ``s``
check. ``token`` may be an async callable, called before every IDENTIFY and RESUME.
See :mod:`entrypoints.client.client` for the theory of operation. The package depends
on nothing else in this repository (an import-linter contract says so), so it can be
lifted out as it is.
"""

from entrypoints.client.client import STATUSES, Backoff, GatewayClient, Status, TokenSource, connect
from entrypoints.client.events import (
    CLIENT_RECONNECT_CLOSE,
    AuthenticationFailed,
    ClientClosed,
    ClientError,
    ClientEvent,
    Connected,
    Disconnected,
    Dispatch,
    GatewayUnavailable,
    NotConnected,
    ProtocolFault,
    ServerError,
    SessionLost,
    SessionTakenOver,
)

__all__ = [
    "CLIENT_RECONNECT_CLOSE",
    "STATUSES",
    "AuthenticationFailed",
    "Backoff",
    "ClientClosed",
    "ClientError",
    "ClientEvent",
    "Connected",
    "Disconnected",
    "Dispatch",
    "GatewayClient",
    "GatewayUnavailable",
    "NotConnected",
    "ProtocolFault",
    "ServerError",
    "SessionLost",
    "SessionTakenOver",
    "Status",
    "TokenSource",
    "connect",
]
