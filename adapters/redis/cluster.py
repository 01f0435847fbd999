"""Pub/sub on a Redis Cluster: sharded channels (SSUBSCRIBE/SPUBLISH), one subscriber
connection per master (PROTOCOL 16). The same port as :class:`~.broker.RedisBroker`.

Theory of operation
-------------------
``run`` keeps the **slot map** (``CLUSTER SLOTS`` from any node that answers, every
``refresh_interval`` and at once after a ``MOVED``, an unasked ``sunsubscribe`` or a
lost shard) and one **shard runner** per master in it. A shard runner is the
standalone broker's session loop for one master: connect, then reader, watchdog and
resubscriber in one task group (:mod:`adapters.redis.subscriber`), reconnecting with
a capped, jittered backoff when the connection fails; a master that leaves the map
has its runner cancelled.

``_wanted`` is what the caller asked for. A channel belongs to the master that
serves its slot; ``_reconcile`` makes every shard connection's last command for a
channel match that (SSUBSCRIBE on the owner, SUNSUBSCRIBE anywhere else), with the
channels of one loop tick coalesced into one command per slot and shard (a sharded
command may not span slots). ``subscribe`` returns once the owner confirmed. When
the owner changes (a slot moved, a failover), the channel is subscribed on the new
owner as soon as the broker learns of it; messages published to the new owner
before that are lost (at most once), messages on every other channel are not
affected. ``is_healthy()`` is True while every master of the map has a live
connection (a master down makes the instance unready: docs/OPERATIONS.md).

``publish`` sends SPUBLISH to the slot's owner on a pooled connection, follows one
``MOVED`` (the map is patched, then refreshed) or ``ASK``, and fails with
``BackendUnavailable`` like the standalone broker.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Iterable

import anyio
import anyio.abc
import anyio.lowlevel
from redis.asyncio import Redis
from redis.exceptions import AskError, MovedError, ResponseError

from adapters.redis._common import UNAVAILABLE_ERRORS, create_client, unavailable_as
from adapters.redis.cluster_shard import (
    PING,
    SUBSCRIBE,
    UNSUBSCRIBE,
    ShardSession,
    SlotMap,
    channel_slot,
    node_url,
    url_address,
)
from adapters.redis.subscriber import (
    _FOREVER,
    RESYNC,
    SESSION_ERRORS,
    BrokerStats,
    disconnect,
    subscriber_connection,
    watchdog,
    write,
)
from domain.ports import BackendUnavailable, MessageHandler

logger = logging.getLogger(__name__)

#: A node that cannot tell the slot map (down, or not a cluster node): ask the next.
_MAP_ERRORS: tuple[type[BaseException], ...] = (*UNAVAILABLE_ERRORS, ResponseError)


class RedisClusterBroker:
    """:class:`domain.ports.Broker` on Redis Cluster sharded pub/sub. Arguments as
    :class:`~.broker.RedisBroker`'s; ``refresh_interval``: how often the slot map is
    read again when nothing asked for it."""

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
        refresh_interval: float = 2.0,
        resubscribe_batch: int = 500,
        max_connections: int = 64,
        client_name: str | None = None,
    ) -> None:
        if ping_interval <= 0 or ping_timeout <= 0:
            raise ValueError("ping_interval and ping_timeout must be positive")
        self._url = url
        self._seed = url_address(url)
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._connect_timeout = connect_timeout
        self._publish_timeout = publish_timeout
        self._subscribe_timeout = subscribe_timeout
        self._write_timeout = write_timeout
        self._reconnect_base = reconnect_base
        self._reconnect_max = reconnect_max
        self._refresh_interval = refresh_interval
        self._batch = resubscribe_batch
        self._max_connections = max_connections
        self._client_name = client_name
        self._clients: dict[str, Redis] = {}
        self._map: SlotMap | None = None
        self._slots: dict[str, int] = {}
        self._sessions: dict[str, ShardSession] = {}
        self._runners: dict[str, anyio.CancelScope] = {}
        self._wanted: set[str] = set()
        self._events: dict[str, anyio.Event] = {}
        self._subscribing: defaultdict[str, int] = defaultdict(int)
        self._dirty: set[str] = set()
        self._write_lock = anyio.Lock()
        self._wake = anyio.Event()
        self._stale = True
        self._resync: set[str] = set()
        #: Per shard: until when a publish fails at once (the shard is down).
        self._blocked: dict[str, float] = {}
        self._running = False
        self._run_scope: anyio.CancelScope | None = None
        self._closed = False
        self._ever_live: set[str] = set()
        self._handler_error: BaseException | None = None
        self.stats = BrokerStats()

    # -- the port -------------------------------------------------------------

    def is_healthy(self) -> bool:
        slot_map = self._map
        if self._closed or slot_map is None:
            return False
        for address in slot_map.masters():
            session = self._sessions.get(address)
            if session is None or not session.healthy or session.failure is not None:
                return False
        return True

    async def publish(self, channel: str, payload: bytes) -> None:
        self._check_open()
        owner = self._owner(channel) or ""
        if not self._shard_live(owner) and anyio.current_time() < self._blocked.get(owner, 0.0):
            # A publish to this shard failed a moment ago while it is down: fail at
            # once (one publish probes again per interval); other shards unaffected.
            self.stats.publish_failures += 1
            raise BackendUnavailable(f"broker unavailable (shard {owner} reconnecting)")
        try:
            with unavailable_as(f"SPUBLISH {channel}", self._publish_timeout):
                await self._spublish(channel, payload)
        except BackendUnavailable:
            self.stats.publish_failures += 1
            if not self._shard_live(owner):
                self._blocked[owner] = anyio.current_time() + self._publish_timeout
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
                f"subscribe {channel}: shard not live within {self._subscribe_timeout}s"
            ) from None
        finally:
            self._subscribing[channel] -= 1
            if not self._subscribing[channel]:
                del self._subscribing[channel]
                if not done:
                    self._events.pop(channel, None)
                if not done and added and not self._closed:
                    self._wanted.discard(channel)  # a failed subscribe has no effect
                    with anyio.CancelScope(shield=True), anyio.move_on_after(self._write_timeout):
                        await self._sync(channel)
        self._check_open()

    async def unsubscribe(self, channel: str) -> None:
        self._wanted.discard(channel)
        event = self._events.pop(channel, None)
        if event is not None:
            event.set()
        await self._sync(channel)

    async def run(self, handler: MessageHandler) -> None:
        if self._running:
            raise RuntimeError("RedisClusterBroker.run is already running")
        self._check_open()
        self._running = True
        try:
            with anyio.CancelScope() as scope:
                self._run_scope = scope
                async with anyio.create_task_group() as tg:
                    await self._maintain(tg, handler)
            if self._handler_error is not None:
                raise self._handler_error
        finally:
            self._running = False
            self._run_scope = None

    # -- lifecycle ------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._run_scope is not None:
            self._run_scope.cancel()
        for event in self._events.values():
            event.set()
        self._events.clear()
        for session in list(self._sessions.values()):
            session.fail("broker closed")
            await disconnect(session.conn)
        with anyio.CancelScope(shield=True):
            for client in self._clients.values():
                await client.aclose()

    async def __aenter__(self) -> RedisClusterBroker:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def subscribed_channels(self) -> frozenset[str]:
        return frozenset(self._wanted)

    @property
    def slot_map(self) -> SlotMap | None:
        return self._map

    def is_live_on(self, channel: str, address: str) -> bool:
        """Whether the channel is live on that master's connection (tests, metrics)."""
        session = self._sessions.get(address)
        return session is not None and channel in session.live

    # -- routing ----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise BackendUnavailable("broker closed")

    def _slot(self, channel: str) -> int:
        slot = self._slots.get(channel)
        if slot is None:
            if len(self._slots) > 100_000:
                self._slots.clear()
            slot = self._slots[channel] = channel_slot(channel)
        return slot

    def _owner(self, channel: str) -> str | None:
        return None if self._map is None else self._map.owner(self._slot(channel))

    def _shard_live(self, address: str) -> bool:
        session = self._sessions.get(address)
        return session is not None and session.healthy and session.failure is None

    def _is_live(self, channel: str) -> bool:
        owner = self._owner(channel)
        session = self._sessions.get(owner) if owner is not None else None
        return session is not None and channel in session.live

    def _client(self, address: str) -> Redis:
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = create_client(
                node_url(self._url, address),
                timeout=self._publish_timeout,
                connect_timeout=min(self._connect_timeout, self._publish_timeout),
                max_connections=self._max_connections,
            )
        return client

    def _moved(self, slot: int, address: str) -> None:
        if self._map is not None and self._map.owner(slot) != address:
            self._map = self._map.moved(slot, address)
            self._resync.update(c for c in self._wanted if self._slot(c) == slot)
        self._wake_up(stale=True)

    def _wake_up(self, *, stale: bool = False) -> None:
        self._stale = self._stale or stale
        self._wake.set()

    async def _spublish(self, channel: str, payload: bytes) -> None:
        if self._map is None:
            await self._refresh_map()
        slot = self._slot(channel)
        for _ in range(3):
            address = self._owner(channel)
            if address is None:
                raise ConnectionError(f"no master serves slot {slot}")
            try:
                await self._client(address).spublish(channel, payload)
                return
            except MovedError as exc:
                self._moved(exc.slot_id, f"{exc.host}:{exc.port}")
            except AskError as exc:
                pipe = self._client(f"{exc.host}:{exc.port}").pipeline(transaction=False)
                pipe.execute_command("ASKING")
                pipe.execute_command("SPUBLISH", channel, payload)
                await pipe.execute()
                return
        raise ConnectionError(f"SPUBLISH {channel}: too many redirections")

    async def _refresh_map(self) -> bool:
        """Read the slot map from the first node that answers; True if it changed."""
        known = [self._seed, *sorted(self._map.masters() if self._map else ())]
        failure = "no node"
        for address in dict.fromkeys(known):
            try:
                with anyio.fail_after(self._publish_timeout):
                    reply = await self._client(address).execute_command(  # type: ignore[no-untyped-call]
                        "CLUSTER SLOTS"
                    )
            except _MAP_ERRORS as exc:
                failure = f"{address}: {type(exc).__name__}: {exc}"
                continue
            new = SlotMap.parse(reply)
            self._stale = False
            if new == self._map:
                return False
            self._map = new
            return True
        raise ConnectionError(f"slot map: no node answered ({failure})")

    # -- the maintainer: slot map, shard runners, re-routing --------------------

    async def _maintain(self, tg: anyio.abc.TaskGroup, handler: MessageHandler) -> None:
        failures = 0
        while True:
            try:
                if await self._refresh_map():
                    self._resync.update(self._wanted)
                failures = 0
            except ConnectionError as exc:
                failures += 1
                if failures == 1 or failures % 20 == 0:
                    logger.warning("cluster broker: %s", exc)
            if self._map is not None:
                self._start_and_stop_runners(tg, handler)
            if self._resync:
                channels, self._resync = self._resync, set()
                async with self._write_lock:
                    await self._reconcile(sorted(channels))
            delay = self._refresh_interval if not failures else self._backoff(failures)
            with anyio.move_on_after(delay):
                await self._wake.wait()
            self._wake = anyio.Event()
            await anyio.sleep(0.02)  # a burst of MOVEDs costs one refresh

    def _start_and_stop_runners(self, tg: anyio.abc.TaskGroup, handler: MessageHandler) -> None:
        assert self._map is not None
        masters = self._map.masters()
        for address in masters - self._runners.keys():
            scope = self._runners[address] = anyio.CancelScope()
            tg.start_soon(self._run_shard, address, scope, handler)
        for address in self._runners.keys() - masters:
            self._runners.pop(address).cancel()

    def _backoff(self, failures: int) -> float:
        delay = min(self._reconnect_max, self._reconnect_base * 2.0 ** min(failures, 30))
        return delay * random.uniform(0.5, 1.0)

    async def _reconcile(self, channels: Iterable[str]) -> None:
        """Caller holds the write lock. For each channel: SSUBSCRIBE on its owner if
        wanted, SUNSUBSCRIBE on every other connection that has it; one command per
        (shard, slot, kind)."""
        commands: defaultdict[tuple[str, int, bool], list[str]] = defaultdict(list)
        for channel in channels:
            owner = self._owner(channel)
            wanted = channel in self._wanted
            for address, session in self._sessions.items():
                if session.failure is None and session.send(channel, wanted and address == owner):
                    commands[(address, self._slot(channel), session.sent[channel])].append(channel)
        for (address, _, on), batch in sorted(commands.items()):
            session = self._sessions[address]
            for start in range(0, len(batch), self._batch):
                part = batch[start : start + self._batch]
                kind = SUBSCRIBE if on else UNSUBSCRIBE
                session.sent_command(kind, part)
                with anyio.CancelScope(shield=True):
                    await write(session, self._write_timeout, kind.decode().upper(), *part)

    async def _sync(self, channel: str) -> None:
        """As the standalone broker's: the channels of one loop tick share commands."""
        self._dirty.add(channel)
        async with self._write_lock:
            if channel not in self._dirty:
                return
            await anyio.lowlevel.checkpoint()
            dirty, self._dirty = sorted(self._dirty), set()
            await self._reconcile(dirty)

    # -- one shard ----------------------------------------------------------------

    async def _run_shard(
        self, address: str, scope: anyio.CancelScope, handler: MessageHandler
    ) -> None:
        failures = 0
        with scope:
            while not self._closed:
                became_healthy = await self._shard_session(address, handler)
                failures = 0 if became_healthy else failures + 1
                if failures == 1 or (failures and failures % 20 == 0):
                    logger.warning("cluster broker: shard %s not live (%d)", address, failures)
                self._wake_up(stale=True)
                await anyio.sleep(self._backoff(failures))

    async def _shard_session(self, address: str, handler: MessageHandler) -> bool:
        conn_class, kwargs = subscriber_connection(
            node_url(self._url, address), self._connect_timeout, self._client_name
        )
        conn = conn_class(**kwargs)
        try:
            with anyio.fail_after(self._connect_timeout):
                await conn.connect()  # type: ignore[no-untyped-call]  # untyped in redis-py
        except SESSION_ERRORS:
            self.stats.connect_failures += 1
            await disconnect(conn)
            return False
        except BaseException:
            await disconnect(conn)
            raise
        session = ShardSession(conn=conn, last_progress=anyio.current_time(), address=address)
        self._sessions[address] = session
        try:
            with session.scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._watchdog, session)
                    tg.start_soon(self._resubscribe, session)
                    await self._reader(session, handler)
        finally:
            if self._sessions.get(address) is session:
                del self._sessions[address]
            if (
                session.healthy
                and session.failure is not None
                and session.handler_error is None
                and not self._closed
            ):
                self.stats.outages += 1
                logger.warning("cluster broker: shard %s lost: %s", address, session.failure)
            await disconnect(conn)
        if session.handler_error is not None:
            # Ends run with that error (unwrapped, as the standalone broker does).
            self._handler_error = session.handler_error
            if self._run_scope is not None:
                self._run_scope.cancel()
            await anyio.sleep_forever()
        return session.healthy

    async def _resubscribe(self, session: ShardSession) -> None:
        async with self._write_lock:
            await self._reconcile(sorted(self._wanted))
            session.sent_command(PING, [])
            await write(session, self._write_timeout, "PING", RESYNC)

    async def _watchdog(self, session: ShardSession) -> None:
        async def ping() -> bool:
            async with self._write_lock:
                session.sent_command(PING, [])
                return await write(session, self._write_timeout, "PING")

        await watchdog(session, self._ping_interval, self._ping_timeout, ping)

    async def _reader(self, session: ShardSession, handler: MessageHandler) -> None:
        conn = session.conn
        while session.failure is None:
            try:
                reply = await conn.read_response(timeout=_FOREVER, disconnect_on_error=False)
            except ResponseError as exc:
                session.last_progress = anyio.current_time()
                self._on_error(session, exc)
                continue
            except SESSION_ERRORS as exc:
                session.fail(f"read failed: {type(exc).__name__}: {exc}")
                return
            session.last_progress = anyio.current_time()
            await self._on_reply(session, reply, handler)

    def _on_error(self, session: ShardSession, exc: ResponseError) -> None:
        channels = session.on_error()
        if isinstance(exc, MovedError):
            self._moved(exc.slot_id, f"{exc.host}:{exc.port}")
        else:
            logger.warning("cluster broker: shard %s refused: %s", session.address, exc)
        self._resync.update(c for c in channels if c in self._wanted)
        self._wake_up(stale=True)

    async def _on_reply(
        self, session: ShardSession, reply: object, handler: MessageHandler
    ) -> None:
        if isinstance(reply, bytes | str):  # PING outside subscribed mode
            token = reply.encode() if isinstance(reply, str) else reply
            self._on_pong(session, b"" if token == b"PONG" else token)
            return
        if not isinstance(reply, list) or len(reply) < 2:
            session.fail(f"unexpected reply on a shard connection: {reply!r}")
            return
        kind, name = reply[0], reply[1]
        if kind == b"smessage" and len(reply) == 3:
            channel = name.decode("utf-8", "replace")
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
        elif kind in (SUBSCRIBE, UNSUBSCRIBE):
            channel = name.decode("utf-8", "replace")
            outcome = session.on_confirmation(kind, channel)
            if outcome == "live" and self._owner(channel) == session.address:
                event = self._events.pop(channel, None)
                if event is not None:
                    event.set()
            elif outcome == "dropped" and channel in self._wanted:
                self._resync.add(channel)
                self._wake_up(stale=True)
        elif kind == PING:
            self._on_pong(session, bytes(name))
        else:
            session.fail(f"unexpected reply on a shard connection: {reply!r}")

    def _on_pong(self, session: ShardSession, token: bytes) -> None:
        session.on_pong()
        if token != RESYNC:
            session.ping_sent_at = None
            return
        session.healthy = True
        self._blocked.pop(session.address, None)
        self.stats.connects += 1
        if session.address in self._ever_live:
            self.stats.reconnects += 1
            logger.warning("cluster broker: shard %s live again", session.address)
        self._ever_live.add(session.address)
