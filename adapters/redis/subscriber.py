"""The subscriber connection's side of Redis pub/sub, without I/O: what one
connection is known to have subscribed, and what a reply on it means
(see :mod:`adapters.redis.broker` for the theory of operation).

Subscription state
------------------
The broker's ``_wanted`` is what the caller asked for, and survives reconnects. Per session,
``sent[channel]`` is the last command sent for the channel on that connection (True
for SUBSCRIBE) and ``pending[channel]`` the number of its commands not yet
confirmed. Redis answers every SUBSCRIBE or UNSUBSCRIBE with one confirmation per
channel, in order, so a channel is live exactly when its last command was SUBSCRIBE
and nothing is pending. That makes subscribe/unsubscribe/subscribe in a row end
subscribed, and ``subscribe`` return only once the server has applied it: from then
on every PUBLISH reaches this connection. Messages of channels no longer wanted are
dropped on arrival, so ``unsubscribe`` needs no confirmation.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import anyio
from redis.asyncio.connection import AbstractConnection, Connection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from adapters.redis._common import UNAVAILABLE_ERRORS

#: The token of the PING sent after a resubscription: its PONG follows every
#: confirmation, and marks the broker healthy again.
RESYNC = b"gw-resync"
#: Errors that end a subscriber connection (a protocol error too: we cannot resync).
#: A read timeout that never fires (the watchdog decides when a connection is dead).
_FOREVER = 365 * 24 * 3600.0
SESSION_ERRORS: tuple[type[BaseException], ...] = (*UNAVAILABLE_ERRORS, RedisError)


def subscriber_connection(
    url: str, connect_timeout: float, client_name: str | None
) -> tuple[type[AbstractConnection], dict[str, Any]]:
    """The subscriber connection's class and arguments: same server and credentials
    as ``url``, but RESP2 (messages are plain replies), no socket timeout (reads wait
    for messages; every wait is bounded by the broker instead) and no retries."""
    conn_kwargs: dict[str, Any] = dict(parse_url(url))
    conn_class: type[AbstractConnection] = conn_kwargs.pop("connection_class", Connection)
    conn_kwargs.update(
        protocol=2,
        socket_timeout=None,
        socket_connect_timeout=connect_timeout,
        socket_keepalive=True,
        retry=Retry(NoBackoff(), 0),
    )
    if client_name is not None:
        conn_kwargs["client_name"] = client_name
    return conn_class, conn_kwargs


async def disconnect(conn: AbstractConnection) -> None:
    with anyio.CancelScope(shield=True), anyio.move_on_after(1.0), suppress(*SESSION_ERRORS):
        await conn.disconnect(nowait=True)


@dataclass
class BrokerStats:
    """Plain counters, read by metrics."""

    connects: int = 0  #: subscriber connections that became live (first one included)
    reconnects: int = 0  #: ... after an outage
    outages: int = 0  #: live subscriber connections lost (dead, hung, killed)
    connect_failures: int = 0  #: connection attempts that failed
    messages_received: int = 0  #: messages handed to the handler
    messages_dropped: int = 0  #: messages of channels unsubscribed meanwhile
    publishes: int = 0
    publish_failures: int = 0
    subscribe_timeouts: int = 0


@dataclass(eq=False)
class SubscriberSession:
    """One subscriber connection and what is known about its server-side state."""

    conn: AbstractConnection
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    sent: dict[str, bool] = field(default_factory=dict)
    pending: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    live: set[str] = field(default_factory=set)
    healthy: bool = False
    failure: str | None = None
    handler_error: BaseException | None = None
    ping_sent_at: float | None = None
    last_progress: float = 0.0
    in_handler: bool = False

    def send(self, channel: str, wanted: bool) -> bool:
        """Record a SUBSCRIBE (``wanted``) or UNSUBSCRIBE about to be sent; False when
        the last command sent for the channel already says so (nothing to send)."""
        if self.sent.get(channel, False) == wanted:
            return False
        self.sent[channel] = wanted
        self.pending[channel] += 1
        if not wanted:
            self.live.discard(channel)
        return True

    def confirmed(self, channel: str) -> bool:
        """The server confirmed a command for ``channel``; True when it became live."""
        left = self.pending[channel] - 1
        if left > 0:
            self.pending[channel] = left
            return False
        del self.pending[channel]
        if self.sent.get(channel, False):
            self.live.add(channel)
            return True
        self.sent.pop(channel, None)
        return False

    def fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
        self.scope.cancel()


@dataclass(frozen=True, slots=True)
class Message:
    channel: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Confirmation:
    """A SUBSCRIBE or UNSUBSCRIBE applied by the server (one per channel, in order)."""

    channel: str


@dataclass(frozen=True, slots=True)
class Pong:
    """A PONG; ``token`` is b"" for a plain PING outside subscribed mode."""

    token: bytes


def parse_reply(reply: object) -> Message | Confirmation | Pong | None:
    """One reply read on the subscriber connection; None when it makes no sense."""
    if isinstance(reply, list) and reply:
        kind = reply[0]
        if kind == b"message" and len(reply) == 3:
            return Message(_text(reply[1]), bytes(reply[2]))
        if kind in (b"subscribe", b"unsubscribe") and len(reply) == 3:
            return Confirmation(_text(reply[1]))
        if kind == b"pong" and len(reply) == 2:
            return Pong(bytes(reply[1]))
    elif isinstance(reply, bytes | str):
        # PING outside subscribed mode (no channel wanted): a plain reply.
        token = reply.encode() if isinstance(reply, str) else reply
        return Pong(b"" if token == b"PONG" else token)
    return None


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


async def watchdog(
    session: SubscriberSession,
    ping_interval: float,
    ping_timeout: float,
    ping: Callable[[], Awaitable[bool]],
) -> None:
    """Send ``PING`` every ``ping_interval`` and declare the connection dead when a
    PING has gone unanswered, and nothing else arrived, for ``ping_timeout``
    (redis-py's ``health_check_interval`` does not notice a *hung* subscriber
    connection, redis/redis-py#2417). Time spent inside the handler does not count:
    the reader is not reading then."""
    tick = min(ping_interval, ping_timeout) / 5
    next_ping = anyio.current_time()
    while True:
        now = anyio.current_time()
        if session.ping_sent_at is None:
            if now >= next_ping:
                session.ping_sent_at = now
                next_ping = now + ping_interval
                if not await ping():
                    return
        elif not session.in_handler:
            silent_since = max(session.ping_sent_at, session.last_progress)
            if now - silent_since > ping_timeout:
                session.fail(f"no reply to PING within {ping_timeout}s")
                return
        await anyio.sleep(tick)


async def read_replies(
    session: SubscriberSession, on_reply: Callable[[object], Awaitable[None]]
) -> None:
    """Read every reply of the session's connection in order, until it fails."""
    conn = session.conn
    try:
        while session.failure is None:
            reply = await conn.read_response(timeout=_FOREVER, disconnect_on_error=False)
            session.last_progress = anyio.current_time()
            await on_reply(reply)
    except SESSION_ERRORS as exc:
        session.fail(f"read failed: {type(exc).__name__}: {exc}")


async def write(session: SubscriberSession, timeout: float, *args: str | bytes) -> bool:
    """Send one command on the subscriber connection (caller holds the write
    lock). A failure ends the session; returns whether the command was sent."""
    if session.failure is not None or not session.conn.is_connected:
        # redis-py would silently open a new socket: never on this connection.
        return False
    # Shielded: a caller cancelled mid-write must not tear the shared connection
    # down; bounded by the write timeout instead (one scope for both).
    scope = anyio.CancelScope(deadline=anyio.current_time() + timeout, shield=True)
    try:
        with scope:
            await session.conn.send_command(*args, check_health=False)
    except SESSION_ERRORS as exc:
        session.fail(f"write failed: {type(exc).__name__}: {exc}")
        return False
    if scope.cancelled_caught:
        session.fail(f"write failed: TimeoutError: not written within {timeout}s")
        return False
    return True
