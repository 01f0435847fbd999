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

``publish`` sends SPUBLISH to the slot's owner on a pooled connection, follows
``MOVED`` (the map is patched, then refreshed; three tries) and ``ASK``, and fails
with ``BackendUnavailable`` like the standalone broker, at once while a publish to the
same shard failed a moment ago and it is still down (other shards unaffected).
"""

from __future__ import annotations

import logging
from collections import defaultdict

import anyio
import anyio.abc
import anyio.lowlevel

from adapters.redis._common import unavailable_as
from adapters.redis.cluster_loops import ShardLoops
from adapters.redis.cluster_router import SlotRouter
from adapters.redis.cluster_shard import (
    ShardSession,
    SlotMap,
)
from adapters.redis.subscriber import (
    BrokerStats,
    disconnect,
)
from adapters.redis.wanted import WantedChannels
from domain.ports import BackendUnavailable, MessageHandler

logger = logging.getLogger(__name__)


class RedisClusterBroker(ShardLoops, WantedChannels):
    """:class:`domain.ports.Broker` on Redis Cluster sharded pub/sub. Arguments as
    :class:`~.broker.RedisBroker`'s; ``refresh_interval``: how often the slot map is
    read again when nothing asked for it."""

    _live_what = "shard"

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
        self._client_name = client_name
        self._router = SlotRouter(
            url,
            timeout=publish_timeout,
            connect_timeout=connect_timeout,
            max_connections=max_connections,
            on_moved=self._moved,
        )
        self._sessions: dict[str, ShardSession] = {}
        self._runners: dict[str, anyio.CancelScope] = {}
        self._wanted: set[str] = set()
        self._events: dict[str, anyio.Event] = {}
        self._subscribing: defaultdict[str, int] = defaultdict(int)
        self._dirty: set[str] = set()
        self._write_lock = anyio.Lock()
        self._wake = anyio.Event()
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
        slot_map = self._router.map
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
                await self._router.spublish(channel, payload)
        except BackendUnavailable:
            self.stats.publish_failures += 1
            if not self._shard_live(owner):
                self._blocked[owner] = anyio.current_time() + self._publish_timeout
            raise
        self.stats.publishes += 1

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
        self._release_waiters()
        for session in list(self._sessions.values()):
            session.fail("broker closed")
            await disconnect(session.conn)
        await self._router.aclose()

    async def __aenter__(self) -> RedisClusterBroker:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def subscribed_channels(self) -> frozenset[str]:
        return frozenset(self._wanted)

    @property
    def slot_map(self) -> SlotMap | None:
        return self._router.map

    def is_live_on(self, channel: str, address: str) -> bool:
        """Whether the channel is live on that master's connection (tests, metrics)."""
        session = self._sessions.get(address)
        return session is not None and channel in session.live

    # -- routing ----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise BackendUnavailable("broker closed")

    def _owner(self, channel: str) -> str | None:
        return self._router.owner(channel)

    def _shard_live(self, address: str) -> bool:
        session = self._sessions.get(address)
        return session is not None and session.healthy and session.failure is None

    def _is_live(self, channel: str) -> bool:
        owner = self._owner(channel)
        session = self._sessions.get(owner) if owner is not None else None
        return session is not None and channel in session.live

    def _moved(self, slot: int) -> None:
        self._resync.update(c for c in self._wanted if self._router.slot(c) == slot)
        self._wake_up()

    def _wake_up(self) -> None:
        """Have the maintainer read the slot map and re-route now."""
        self._wake.set()

    # -- the maintainer: slot map, shard runners, re-routing --------------------

    async def _maintain(self, tg: anyio.abc.TaskGroup, handler: MessageHandler) -> None:
        failures = 0
        while True:
            try:
                if await self._router.refresh():
                    self._resync.update(self._wanted)
                failures = 0
            except ConnectionError as exc:
                failures += 1
                if failures == 1 or failures % 20 == 0:
                    logger.warning("cluster broker: %s", exc)
            if self._router.map is not None:
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
        assert self._router.map is not None
        masters = self._router.map.masters()
        for address in masters - self._runners.keys():
            scope = self._runners[address] = anyio.CancelScope()
            tg.start_soon(self._run_shard, address, scope, handler)
        for address in self._runners.keys() - masters:
            self._runners.pop(address).cancel()
