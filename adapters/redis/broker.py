"""Pub/sub on Redis: one dedicated subscriber connection per instance, a pool for PUBLISH.

Theory of operation
-------------------
``run`` owns the subscriber connection. Each connection lives in a
:class:`SubscriberSession`; a session is three tasks in one task group:

* the **reader** reads every reply in order: messages go to the handler, one at a
  time; ``subscribe``/``unsubscribe`` confirmations and PONGs update the session;
* the **watchdog** declares a hung connection dead (:func:`~.subscriber.watchdog`);
* the **resubscriber** sends ``SUBSCRIBE`` for every wanted channel, in batches, then
  ``PING gw-resync``; its PONG comes after every confirmation, and marks the broker
  healthy again.

When any of them fails, the session ends, the broker is unhealthy, and ``run``
reconnects after an exponential, capped and jittered backoff. ``_wanted`` is what the
caller asked for, and survives reconnects; what one connection is known to have
applied is its :class:`SubscriberSession` (:mod:`adapters.redis.subscriber`).

While down
----------
``is_healthy()`` is False. ``publish`` raises ``BackendUnavailable`` within
``publish_timeout`` of having a pooled connection, and at once while a publish
already failed in this outage less than ``publish_timeout`` ago. ``subscribe``
waits for the reconnect, up to ``subscribe_timeout``, then raises
``BackendUnavailable``; a subscribe that failed or was cancelled has no effect.
Messages published meanwhile are lost (at most once). An exception from the handler
ends ``run`` with that exception, as with the memory broker. ``stats`` counts
outages, reconnects and messages for metrics.

``subscribe`` must not be awaited inside the handler (its confirmation is read by the
task running the handler); ``unsubscribe`` may.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict

import anyio
import anyio.lowlevel
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection

from adapters.redis._common import DEFAULT_POOL_TIMEOUT, create_client, unavailable_as
from adapters.redis.batch import CommandBatcher
from adapters.redis.subscriber import (
    RESYNC,
    SESSION_ERRORS,
    BrokerStats,
    Confirmation,
    Message,
    Pong,
    SubscriberSession,
    disconnect,
    parse_reply,
    read_replies,
    subscriber_connection,
    watchdog,
    write,
)
from adapters.redis.wanted import WantedChannels
from domain.ports import BackendUnavailable, MessageHandler

logger = logging.getLogger(__name__)


class RedisBroker(WantedChannels):
    """:class:`domain.ports.Broker` on Redis pub/sub (channels ``ws:server:*``,
    ``ws:user:*``).

    ``ping_interval``/``ping_timeout``: the watchdog of the subscriber connection.
    ``connect_timeout``: one connection attempt, handshake included.
    ``publish_timeout``: bound of one PUBLISH's socket operations, from the moment it
    has a pooled connection; ``pool_timeout``: the wait for one (kept apart, see
    :mod:`adapters.redis._common`).
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
        pool_timeout: float = DEFAULT_POOL_TIMEOUT,
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
            pool_timeout=pool_timeout,
            connect_timeout=min(connect_timeout, publish_timeout),
            max_connections=max_connections,
        )
        self._conn_class, self._conn_kwargs = subscriber_connection(
            url, connect_timeout, client_name
        )
        self.stats = BrokerStats()
        self._wanted: set[str] = set()
        self._events: dict[str, anyio.Event] = {}
        #: Uncontended, taken without a trip through the loop: ``_sync``'s own
        #: checkpoint (inside it) is what gathers the channels of one tick.
        self._write_lock = anyio.Lock(fast_acquire=True)
        #: Channels whose command awaits the next flush of ``_sync``.
        self._dirty: set[str] = set()
        self._session: SubscriberSession | None = None
        self._healthy = False
        self._publish_blocked_until = 0.0
        #: PUBLISHes issued while one is on the wire go together in the next round trip
        #: (a storm's presence changes, the handoff's asks and markers).
        self._publishes = CommandBatcher(self._client)
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
            with unavailable_as(f"PUBLISH {channel}"):
                await self._publishes.command(lambda p: p.publish(channel, payload))
        except BackendUnavailable:
            self.stats.publish_failures += 1
            if not self._healthy:
                self._publish_blocked_until = anyio.current_time() + self._publish_timeout
            raise
        self.stats.publishes += 1

    @property
    def publish_round_trips(self) -> int:
        """Round trips that carried PUBLISHes (a pipeline counts once)."""
        return self._publishes.batches

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
        self._release_waiters()
        session = self._session
        if session is not None:
            session.fail("broker closed")
            await disconnect(session.conn)
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

    async def _run_session(self, handler: MessageHandler) -> bool:
        """Connect, serve until the connection fails; True if it became live."""
        conn = self._new_connection()
        try:
            with anyio.fail_after(self._connect_timeout):
                await conn.connect()  # type: ignore[no-untyped-call]  # untyped in redis-py
        except SESSION_ERRORS as exc:
            self.stats.connect_failures += 1
            self._last_failure = f"connect failed: {type(exc).__name__}: {exc}"
            await disconnect(conn)
            return False
        except BaseException:
            await disconnect(conn)
            raise
        session = SubscriberSession(conn=conn, last_progress=anyio.current_time())
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
            await disconnect(conn)
        if session.handler_error is not None:
            raise session.handler_error
        return session.healthy

    async def _sync(self, channel: str) -> None:
        """Make the connection's last command for ``channel`` match ``_wanted`` (none
        without a connection: the next session resubscribes what is wanted). Channels
        synced in one loop tick share one SUBSCRIBE and one UNSUBSCRIBE: the first
        caller waits a checkpoint and writes for all (shielded: the batch is theirs too;
        the write has its own bound); the others find their channel written."""
        self._dirty.add(channel)
        async with self._write_lock:
            if channel not in self._dirty:
                return
            await anyio.lowlevel.checkpoint()
            dirty, self._dirty = sorted(self._dirty), set()
            session = self._session
            if session is None or session.failure is not None:
                return
            for command, on in (("SUBSCRIBE", True), ("UNSUBSCRIBE", False)):
                batch = [c for c in dirty if (c in self._wanted) is on and session.send(c, on)]
                if batch:  # write() shields itself
                    await write(session, self._write_timeout, command, *batch)

    async def _resubscribe(self, session: SubscriberSession) -> None:
        channels = sorted(self._wanted)
        for start in range(0, len(channels), self._batch):
            async with self._write_lock:
                batch = [
                    c
                    for c in channels[start : start + self._batch]
                    if c in self._wanted and session.send(c, True)
                ]
                if batch and not await write(session, self._write_timeout, "SUBSCRIBE", *batch):
                    return
        async with self._write_lock:
            await write(session, self._write_timeout, "PING", RESYNC)

    async def _watchdog(self, session: SubscriberSession) -> None:
        async def ping() -> bool:
            async with self._write_lock:
                return await write(session, self._write_timeout, "PING")

        await watchdog(session, self._ping_interval, self._ping_timeout, ping)

    async def _reader(self, session: SubscriberSession, handler: MessageHandler) -> None:
        async def on_reply(reply: object) -> None:
            await self._on_reply(session, reply, handler)

        await read_replies(session, on_reply)

    async def _on_reply(
        self, session: SubscriberSession, reply: object, handler: MessageHandler
    ) -> None:
        parsed = parse_reply(reply)
        if isinstance(parsed, Message):
            if parsed.channel not in self._wanted:
                self.stats.messages_dropped += 1
                return
            self.stats.messages_received += 1
            session.in_handler = True
            try:
                await handler(parsed.channel, parsed.payload)
            except Exception as exc:
                session.handler_error = exc
                session.fail(f"handler raised {exc!r}")
            finally:
                session.in_handler = False
                session.last_progress = anyio.current_time()
        elif isinstance(parsed, Confirmation):
            self._on_confirmation(session, parsed.channel)
        elif isinstance(parsed, Pong):
            self._on_pong(session, parsed.token)
        else:
            session.fail(f"unexpected reply on the subscriber connection: {reply!r}")

    def _on_confirmation(self, session: SubscriberSession, channel: str) -> None:
        if session.confirmed(channel):
            event = self._events.pop(channel, None)
            if event is not None:
                event.set()

    def _on_pong(self, session: SubscriberSession, token: bytes) -> None:
        if token != RESYNC:
            session.ping_sent_at = None
            return
        session.healthy = True
        self._healthy = True
        self._publish_blocked_until = 0.0
        self.stats.connects += 1
        if self.stats.connects > 1:
            self.stats.reconnects += 1
            logger.warning("broker: reconnected, %d channel(s) resubscribed", len(session.live))
