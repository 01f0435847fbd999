"""The shard half of :class:`~.cluster.RedisClusterBroker` (see its theory of
operation): the subscription writes (``_reconcile``, ``_sync``) and, per master, the
session loop: connect, then reader, watchdog and resubscriber in one task group,
reconnecting with a capped, jittered backoff. A mixin: the state it works on is the
broker's, declared here.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Iterable

import anyio
import anyio.lowlevel
from redis.exceptions import MovedError, ResponseError

from adapters.redis.cluster_router import SlotRouter
from adapters.redis.cluster_shard import PING, SUBSCRIBE, UNSUBSCRIBE, ShardSession, node_url
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
from domain.ports import MessageHandler

logger = logging.getLogger("adapters.redis.cluster")


class ShardLoops:
    """Subscription writes and shard sessions; mixed into the cluster broker."""

    _router: SlotRouter
    _sessions: dict[str, ShardSession]
    _wanted: set[str]
    _events: dict[str, anyio.Event]
    _dirty: set[str]
    _resync: set[str]
    _write_lock: anyio.Lock
    _wake: anyio.Event
    _closed: bool
    _url: str
    _client_name: str | None
    _connect_timeout: float
    _write_timeout: float
    _ping_interval: float
    _ping_timeout: float
    _reconnect_base: float
    _reconnect_max: float
    _batch: int
    _ever_live: set[str]
    _blocked: dict[str, float]
    _handler_error: BaseException | None
    _run_scope: anyio.CancelScope | None
    stats: BrokerStats

    def _backoff(self, failures: int) -> float:
        delay = min(self._reconnect_max, self._reconnect_base * 2.0 ** min(failures, 30))
        return delay * random.uniform(0.5, 1.0)

    async def _reconcile(self, channels: Iterable[str]) -> None:
        """Caller holds the write lock. For each channel: SSUBSCRIBE on its owner if
        wanted, SUNSUBSCRIBE on every other connection that has it; one command per
        (shard, slot, kind)."""
        commands: defaultdict[tuple[str, int, bool], list[str]] = defaultdict(list)
        for channel in channels:
            owner = self._router.owner(channel)
            wanted = channel in self._wanted
            for address, session in self._sessions.items():
                if session.failure is None and session.send(channel, wanted and address == owner):
                    commands[(address, self._router.slot(channel), session.sent[channel])].append(
                        channel
                    )
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
                self._wake.set()
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
            self._router.moved(exc.slot_id, f"{exc.host}:{exc.port}")
        else:
            logger.warning("cluster broker: shard %s refused: %s", session.address, exc)
        self._resync.update(c for c in channels if c in self._wanted)
        self._wake.set()

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
            if outcome == "live" and self._router.owner(channel) == session.address:
                event = self._events.pop(channel, None)
                if event is not None:
                    event.set()
            elif outcome == "dropped" and channel in self._wanted:
                self._resync.add(channel)
                self._wake.set()
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
