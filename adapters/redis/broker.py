"""Pub/sub on Redis: one dedicated subscriber connection per instance, a pool for PUBLISH.

Theory of operation
-------------------
``run`` owns the subscriber connection. Each connection lives in a
:class:`_Session`; a session is three tasks in one task group:

* the **reader** reads every reply in order: messages go to the handler, one at a
  time; ``subscribe``/``unsubscribe`` confirmations and PONGs update the session;
* the **watchdog** sends ``PING`` every ``ping_interval`` and declares the connection
  dead when a PING has gone unanswered, and nothing else arrived, for
  ``ping_timeout`` (redis-py's ``health_check_interval`` does not notice a *hung*
  subscriber connection, redis/redis-py#2417). Time spent inside the handler does
  not count: the reader is not reading then;
* the **resubscriber** sends ``SUBSCRIBE`` for every wanted channel, in batches, then
  ``PING gw-resync``; its PONG comes after every confirmation, and marks the broker
  healthy again.

When any of them fails, the session ends, the broker is unhealthy, and ``run``
reconnects after an exponential, capped and jittered backoff.

Subscription state
------------------
``_wanted`` is what the caller asked for, and survives reconnects. Per session,
``sent[channel]`` is the last command sent for the channel on that connection (True
for SUBSCRIBE) and ``pending[channel]`` the number of its commands not yet
confirmed. Redis answers every SUBSCRIBE or UNSUBSCRIBE with one confirmation per
channel, in order, so a channel is live exactly when its last command was SUBSCRIBE
and nothing is pending. That makes subscribe/unsubscribe/subscribe in a row end
subscribed, and ``subscribe`` return only once the server has applied it: from then
on every PUBLISH reaches this connection. Messages of channels no longer wanted are
dropped on arrival, so ``unsubscribe`` needs no confirmation.

While down
----------
``is_healthy()`` is False. ``publish`` raises ``BackendUnavailable`` within
``publish_timeout``, and at once while a publish already failed in this outage less
than ``publish_timeout`` ago. ``subscribe`` waits for the reconnect, up to
``subscribe_timeout``, then raises ``BackendUnavailable``; a subscribe that failed or
was cancelled has no effect. Messages published meanwhile are lost (at most once).
An exception from the handler ends ``run`` with that exception, as with the memory
broker. ``stats`` counts outages, reconnects and messages for metrics.

``subscribe`` must not be awaited inside the handler (its confirmation is read by the
task running the handler); ``unsubscribe`` may.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import anyio
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, Connection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from adapters.redis._common import UNAVAILABLE_ERRORS, create_client, unavailable_as
from domain.ports import BackendUnavailable, MessageHandler

logger = logging.getLogger(__name__)

_RESYNC = b"gw-resync"
#: A read timeout that never fires (the watchdog decides when a connection is dead).
_FOREVER = 365 * 24 * 3600.0
#: Errors that end a subscriber connection (a protocol error too: we cannot resync).
_SESSION_ERRORS: tuple[type[BaseException], ...] = (*UNAVAILABLE_ERRORS, RedisError)


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
class _Session:
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

    def fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
        self.scope.cancel()


class RedisBroker:
    """:class:`domain.ports.Broker` on Redis pub/sub (channels ``ws:server:*``,
    ``ws:user:*``).

    ``ping_interval``/``ping_timeout``: the watchdog of the subscriber connection.
    ``connect_timeout``: one connection attempt, handshake included.
    ``publish_timeout``: bound of one PUBLISH (socket, pool wait and overall).
    ``subscribe_timeout``: how long ``subscribe`` waits for the broker to be live.
    ``reconnect_base``/``reconnect_max``: the backoff between attempts (doubling,
    capped, each delay scaled by a random factor in [0.5, 1]).
    ``resubscribe_batch``: channels per SUBSCRIBE command after a reconnect.
    ``client_name``: CLIENT SETNAME of the subscriber connection.
    """

    def __init__(
        self,
        url: str,
        *,
        ping_interval: float = 1.0,
        ping_timeout: float = 3.0,
        connect_timeout: float = 2.0,
        publish_timeout: float = 1.0,
        subscribe_timeout: float = 5.0,
        write_timeout: float = 1.0,
        reconnect_base: float = 0.1,
        reconnect_max: float = 5.0,
        resubscribe_batch: int = 500,
        max_connections: int = 64,
        client_name: str | None = None,
    ) -> None:
        if ping_interval <= 0 or ping_timeout <= 0:
            raise ValueError("ping_interval and ping_timeout must be positive")
        if resubscribe_batch < 1:
            raise ValueError("resubscribe_batch must be at least 1")
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._connect_timeout = connect_timeout
        self._publish_timeout = publish_timeout
        self._subscribe_timeout = subscribe_timeout
        self._write_timeout = write_timeout
        self._reconnect_base = reconnect_base
        self._reconnect_max = reconnect_max
        self._batch = resubscribe_batch
        self._client: Redis = create_client(
            url,
            timeout=publish_timeout,
            connect_timeout=min(connect_timeout, publish_timeout),
            max_connections=max_connections,
        )
        # The subscriber connection: same server and credentials, but RESP2 (messages
        # are plain replies), no socket timeout (reads wait for messages; every wait
        # is bounded here instead) and no retries.
        conn_kwargs: dict[str, Any] = dict(parse_url(url))
        self._conn_class: type[AbstractConnection] = conn_kwargs.pop("connection_class", Connection)
        conn_kwargs.update(
            protocol=2,
            socket_timeout=None,
            socket_connect_timeout=connect_timeout,
            socket_keepalive=True,
            retry=Retry(NoBackoff(), 0),
        )
        if client_name is not None:
            conn_kwargs["client_name"] = client_name
        self._conn_kwargs = conn_kwargs
        self.stats = BrokerStats()
        self._wanted: set[str] = set()
        self._events: dict[str, anyio.Event] = {}
        self._write_lock = anyio.Lock()
        self._session: _Session | None = None
        self._healthy = False
        self._publish_blocked_until = 0.0
        self._subscribing: defaultdict[str, int] = defaultdict(int)
        self._running = False
        self._run_scope: anyio.CancelScope | None = None
        self._closed = False
        self._last_failure = ""

    # -- the port -------------------------------------------------------------

    def is_healthy(self) -> bool:
        return self._healthy and not self._closed

    async def publish(self, channel: str, payload: bytes) -> None:
        self._check_open()
        if not self._healthy and anyio.current_time() < self._publish_blocked_until:
            # A publish failed during this outage a moment ago: fail at once rather
            # than wait for another timeout (one publish probes again per interval).
            self.stats.publish_failures += 1
            raise BackendUnavailable("broker unavailable (reconnecting)")
        try:
            with unavailable_as(f"PUBLISH {channel}", self._publish_timeout):
                await self._client.publish(channel, payload)
        except BackendUnavailable:
            self.stats.publish_failures += 1
            if not self._healthy:
                self._publish_blocked_until = anyio.current_time() + self._publish_timeout
            raise
        self.stats.publishes += 1

    async def subscribe(self, channel: str) -> None:
        self._check_open()
        if channel in self._wanted and self._is_live(channel):
            return
        added = channel not in self._wanted
        self._wanted.add(channel)
        event = self._events.get(channel)
        if event is None:
            event = self._events[channel] = anyio.Event()
        self._subscribing[channel] += 1
        done = False
        try:
            with anyio.fail_after(self._subscribe_timeout):
                await self._sync(channel)
                await event.wait()
            done = True
        except TimeoutError:
            self.stats.subscribe_timeouts += 1
            raise BackendUnavailable(
                f"subscribe {channel}: broker not live within {self._subscribe_timeout}s"
            ) from None
        finally:
            self._subscribing[channel] -= 1
            if not self._subscribing[channel]:
                del self._subscribing[channel]
                if not done:
                    self._events.pop(channel, None)  # nobody waits on it any more
                if not done and added and not self._closed:
                    # A subscribe that failed or was cancelled has no effect.
                    self._wanted.discard(channel)
                    with anyio.CancelScope(shield=True), anyio.move_on_after(self._write_timeout):
                        await self._sync(channel)
        self._check_open()

    async def unsubscribe(self, channel: str) -> None:
        self._wanted.discard(channel)
        event = self._events.pop(channel, None)
        if event is not None:
            event.set()  # a subscribe still waiting was superseded
        await self._sync(channel)

    async def run(self, handler: MessageHandler) -> None:
        if self._running:
            raise RuntimeError("RedisBroker.run is already running")
        self._check_open()
        self._running = True
        failures = 0
        try:
            with anyio.CancelScope() as scope:
                self._run_scope = scope
                while True:
                    became_healthy = await self._run_session(handler)
                    if self._closed:
                        break
                    failures = 0 if became_healthy else failures + 1
                    if failures == 1 or (failures and failures % 20 == 0):
                        logger.warning(
                            "broker: not live (%d attempt(s) in a row): %s",
                            failures,
                            self._last_failure,
                        )
                    await anyio.sleep(self._backoff(failures))
        finally:
            self._running = False
            self._run_scope = None

    # -- lifecycle ------------------------------------------------------------

    async def close(self) -> None:
        """Stop ``run``, release waiting subscribers, close every connection."""
        if self._closed:
            return
        self._closed = True
        self._healthy = False
        if self._run_scope is not None:
            self._run_scope.cancel()
        for event in self._events.values():
            event.set()
        self._events.clear()
        session = self._session
        if session is not None:
            session.fail("broker closed")
            await self._disconnect(session.conn)
        with anyio.CancelScope(shield=True):
            await self._client.aclose()

    async def __aenter__(self) -> RedisBroker:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def subscribed_channels(self) -> frozenset[str]:
        """Channels the caller subscribed to (live or waiting for a reconnect)."""
        return frozenset(self._wanted)

    # -- internals --------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise BackendUnavailable("broker closed")

    def _is_live(self, channel: str) -> bool:
        session = self._session
        return session is not None and channel in session.live

    def _backoff(self, failures: int) -> float:
        delay = min(self._reconnect_max, self._reconnect_base * 2.0 ** min(failures, 30))
        return delay * random.uniform(0.5, 1.0)

    def _new_connection(self) -> AbstractConnection:
        return self._conn_class(**self._conn_kwargs)

    async def _disconnect(self, conn: AbstractConnection) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(1.0), suppress(*_SESSION_ERRORS):
            await conn.disconnect(nowait=True)

    async def _run_session(self, handler: MessageHandler) -> bool:
        """Connect, serve until the connection fails; True if it became live."""
        conn = self._new_connection()
        try:
            with anyio.fail_after(self._connect_timeout):
                await conn.connect()  # type: ignore[no-untyped-call]  # untyped in redis-py
        except _SESSION_ERRORS as exc:
            self.stats.connect_failures += 1
            self._last_failure = f"connect failed: {type(exc).__name__}: {exc}"
            await self._disconnect(conn)
            return False
        except BaseException:
            await self._disconnect(conn)
            raise
        session = _Session(conn=conn, last_progress=anyio.current_time())
        self._session = session
        try:
            with session.scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._watchdog, session)
                    tg.start_soon(self._resubscribe, session)
                    await self._reader(session, handler)
        finally:
            self._session = None
            self._healthy = False
            self._last_failure = session.failure or "session ended"
            # An outage is a live connection that failed: not a close, not run
            # being cancelled, not a handler error.
            if (
                session.healthy
                and session.failure is not None
                and session.handler_error is None
                and not self._closed
            ):
                self.stats.outages += 1
                logger.warning("broker: subscriber connection lost: %s", session.failure)
            await self._disconnect(conn)
        if session.handler_error is not None:
            raise session.handler_error
        return session.healthy

    async def _write(self, session: _Session, *args: str | bytes) -> bool:
        """Send one command on the subscriber connection (caller holds the write
        lock). A failure ends the session; returns whether the command was sent."""
        if session.failure is not None or not session.conn.is_connected:
            # redis-py would silently open a new socket: never on this connection.
            return False
        try:
            # Shielded: a caller cancelled mid-write must not tear the shared
            # connection down; bounded by the write timeout instead.
            with anyio.CancelScope(shield=True), anyio.fail_after(self._write_timeout):
                await session.conn.send_command(*args, check_health=False)
        except _SESSION_ERRORS as exc:
            session.fail(f"write failed: {type(exc).__name__}: {exc}")
            return False
        return True

    async def _sync(self, channel: str) -> None:
        """Make the current connection's last command for ``channel`` match
        ``_wanted``. Without a connection there is nothing to do: the next session
        resubscribes what is wanted."""
        async with self._write_lock:
            session = self._session
            if session is None or session.failure is not None:
                return
            wanted = channel in self._wanted
            if session.sent.get(channel, False) == wanted:
                return
            session.sent[channel] = wanted
            session.pending[channel] += 1
            if not wanted:
                session.live.discard(channel)
            await self._write(session, "SUBSCRIBE" if wanted else "UNSUBSCRIBE", channel)

    async def _resubscribe(self, session: _Session) -> None:
        channels = sorted(self._wanted)
        for start in range(0, len(channels), self._batch):
            async with self._write_lock:
                batch = [
                    c
                    for c in channels[start : start + self._batch]
                    if c in self._wanted and not session.sent.get(c, False)
                ]
                for channel in batch:
                    session.sent[channel] = True
                    session.pending[channel] += 1
                if batch and not await self._write(session, "SUBSCRIBE", *batch):
                    return
        async with self._write_lock:
            await self._write(session, "PING", _RESYNC)

    async def _watchdog(self, session: _Session) -> None:
        tick = min(self._ping_interval, self._ping_timeout) / 5
        next_ping = anyio.current_time()
        while True:
            now = anyio.current_time()
            if session.ping_sent_at is None:
                if now >= next_ping:
                    session.ping_sent_at = now
                    next_ping = now + self._ping_interval
                    async with self._write_lock:
                        if not await self._write(session, "PING"):
                            return
            elif not session.in_handler:
                silent_since = max(session.ping_sent_at, session.last_progress)
                if now - silent_since > self._ping_timeout:
                    session.fail(f"no reply to PING within {self._ping_timeout}s")
                    return
            await anyio.sleep(tick)

    async def _reader(self, session: _Session, handler: MessageHandler) -> None:
        conn = session.conn
        try:
            while session.failure is None:
                reply = await conn.read_response(timeout=_FOREVER, disconnect_on_error=False)
                session.last_progress = anyio.current_time()
                await self._on_reply(session, reply, handler)
        except _SESSION_ERRORS as exc:
            session.fail(f"read failed: {type(exc).__name__}: {exc}")

    async def _on_reply(self, session: _Session, reply: object, handler: MessageHandler) -> None:
        if isinstance(reply, list) and reply:
            kind = reply[0]
            if kind == b"message" and len(reply) == 3:
                channel = _text(reply[1])
                if channel not in self._wanted:
                    self.stats.messages_dropped += 1
                    return
                self.stats.messages_received += 1
                session.in_handler = True
                try:
                    await handler(channel, bytes(reply[2]))
                except Exception as exc:
                    session.handler_error = exc
                    session.fail(f"handler raised {exc!r}")
                finally:
                    session.in_handler = False
                    session.last_progress = anyio.current_time()
                return
            if kind in (b"subscribe", b"unsubscribe") and len(reply) == 3:
                self._on_confirmation(session, _text(reply[1]))
                return
            if kind == b"pong" and len(reply) == 2:
                self._on_pong(session, bytes(reply[1]))
                return
        elif isinstance(reply, bytes | str):
            # PING outside subscribed mode (no channel wanted): a plain reply.
            token = reply.encode() if isinstance(reply, str) else reply
            self._on_pong(session, b"" if token == b"PONG" else token)
            return
        session.fail(f"unexpected reply on the subscriber connection: {reply!r}")

    def _on_confirmation(self, session: _Session, channel: str) -> None:
        left = session.pending[channel] - 1
        if left > 0:
            session.pending[channel] = left
            return
        del session.pending[channel]
        if session.sent.get(channel, False):
            session.live.add(channel)
            event = self._events.pop(channel, None)
            if event is not None:
                event.set()
        else:
            session.sent.pop(channel, None)

    def _on_pong(self, session: _Session, token: bytes) -> None:
        if token != _RESYNC:
            session.ping_sent_at = None
            return
        session.healthy = True
        self._healthy = True
        self._publish_blocked_until = 0.0
        self.stats.connects += 1
        if self.stats.connects > 1:
            self.stats.reconnects += 1
            logger.warning("broker: reconnected, %d channel(s) resubscribed", len(session.live))


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
