"""One gateway instance: connections, routing, fan-out, presence and timers.

The instance keeps two routing indexes (server -> connections, user -> connections)
and subscribes the broker to ``ws:server:{id}`` / ``ws:user:{id}`` while at least one
local connection needs them (:class:`ChannelInterest`). Every published event goes
through the broker, so an instance receives each event once per channel and routes
it to each local connection once: exactly once per connection, in broker order.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskStatus

from adapters.shell.connection import Connection
from adapters.shell.interest import ChannelInterest
from adapters.shell.metrics import Metrics
from adapters.shell.permissions import PermissionCache
from adapters.shell.settings import GatewaySettings
from domain import keys
from domain.codec import (
    RECONNECT_FRAME,
    CloseCode,
    Envelope,
    ErrorCode,
    InvalidEnvelope,
    decode_envelope,
    dispatch_template,
    encode_envelope,
)
from domain.model import (
    ChannelId,
    InstanceId,
    PresenceChange,
    Server,
    ServerId,
    Status,
    UserId,
)
from domain.ports import (
    BackendUnavailable,
    Broker,
    Clock,
    Directory,
    InvalidToken,
    PresenceStore,
    TokenVerifier,
    Transport,
    TypingGate,
)
from domain.session import Session, State

log = logging.getLogger("gateway")

#: Events that invalidate cached permissions of their server (PROTOCOL section 7).
INVALIDATING_OPS = frozenset(
    {"CHANNEL_UPDATE", "CHANNEL_DELETE", "ROLE_UPDATE", "ROLE_DELETE", "SERVER_MEMBER_UPDATE"}
)
MEMBER_REMOVE = "SERVER_MEMBER_REMOVE"

_BACKEND_ERRORS = (BackendUnavailable, TimeoutError, OSError)


class Gateway:
    def __init__(
        self,
        *,
        broker: Broker,
        typing_gate: TypingGate,
        presence: PresenceStore,
        directory: Directory,
        tokens: TokenVerifier,
        clock: Clock,
        settings: GatewaySettings | None = None,
        metrics: Metrics | None = None,
        instance_id: InstanceId | None = None,
        new_session_id: Any = None,
    ) -> None:
        self.broker = broker
        self.typing_gate = typing_gate
        self.presence = presence
        self.directory = directory
        self.tokens = tokens
        self.clock = clock
        self.settings = settings or GatewaySettings()
        self.metrics = metrics or Metrics()
        self.instance_id = instance_id or uuid.uuid4().hex
        self._new_session_id = new_session_id or (lambda: str(uuid.uuid4()))
        self.permissions = PermissionCache(directory, clock, self.settings.permission_cache_ttl)
        self.interest = ChannelInterest(broker)
        self.connections: set[Connection] = set()
        self.by_user: dict[UserId, set[Connection]] = {}
        self.by_server: dict[ServerId, set[Connection]] = {}
        self.draining = False
        self.running = False
        #: Presence closes that failed (backend down), retried by the presence loop so
        #: that no session leaks in the registry while this instance stays alive.
        self._pending_closes: list[tuple[UserId, str, tuple[Server, ...]]] = []
        self._pending_broadcasts: list[PresenceChange] = []
        self._idle = anyio.Event()
        self._idle.set()
        #: Set once the (single) drain of this instance has finished.
        self._drained: anyio.Event | None = None
        self._tasks: anyio.abc.TaskGroup | None = None
        self._event_class: type[anyio.Event] | None = None

    def new_event(self) -> anyio.Event:
        """``anyio.Event()`` without the per-call backend lookup (a sender makes one
        per wake-up): the running backend's Event class, found once."""
        if self._event_class is None:
            self._event_class = type(anyio.Event())
        return self._event_class()

    # --- lifecycle ----------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Background work of the instance: broker reader, heartbeat sweep, presence
        liveness and reaping. Runs until cancelled."""
        try:
            await self._keep_alive()
        except _BACKEND_ERRORS as exc:
            log.warning("presence store unavailable at start: %s", exc)
        async with anyio.create_task_group() as group:
            self._tasks = group
            group.start_soon(self.broker.run, self._on_message)
            group.start_soon(self._sweep_loop)
            group.start_soon(self._presence_loop)
            self.running = True
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                self.running = False

    async def serve(self, transport: Transport) -> None:
        """Serve one client connection until it ends (called per WebSocket)."""
        session = Session(self._new_session_id(), self.settings.session, self.clock.monotonic())
        conn = Connection(self, transport, session)
        conn.enqueue_effects(session.hello())
        cap = self.settings.max_connections
        if self.draining or (cap and len(self.connections) >= cap):
            code = CloseCode.GOING_AWAY if self.draining else CloseCode.TOO_MANY_CONNECTIONS
            if self.draining:
                conn.enqueue(RECONNECT_FRAME)
            conn.request_close(
                code, "server shutting down" if self.draining else "too many connections"
            )
        self.connections.add(conn)
        self._idle = anyio.Event() if self._idle.is_set() else self._idle
        self.metrics.connections_opened.inc()
        log.info("connection opened", extra={"session_id": session.session_id})
        await conn.run()

    async def drain(self, timeout: float | None = None) -> None:
        """Graceful shutdown of this instance: refuse new connections, tell every
        client to RECONNECT, close with 1001, and wait (bounded) for them to go.
        Presence sessions are left to expire after a short grace so that users who
        reconnect to another instance never flap offline."""
        if self._drained is not None:  # a drain is under way or done: wait for it
            await self._drained.wait()
            return
        self._drained = anyio.Event()
        try:
            await self._drain(timeout)
        finally:
            self._drained.set()

    async def _drain(self, timeout: float | None) -> None:
        self.draining = True
        try:
            await self.presence.keep_alive(self.instance_id, self.settings.presence_grace_ms)
        except _BACKEND_ERRORS as exc:
            log.warning("drain: could not shorten presence liveness: %s", exc)
        for conn in list(self.connections):
            conn.enqueue(RECONNECT_FRAME)
            conn.request_close(CloseCode.GOING_AWAY, "server shutting down")
        with anyio.move_on_after(timeout if timeout is not None else self.settings.drain_timeout):
            await self._idle.wait()

    # --- identify -----------------------------------------------------------------

    async def authenticate(self, conn: Connection, token: str) -> None:
        session = conn.session
        try:
            user_id = self.tokens.verify(token, self.clock.wall_ms() / 1000.0)
        except InvalidToken as exc:
            log.info("identify refused: %s", exc, extra={"session_id": session.session_id})
            await conn.apply(
                session.identify_failed(CloseCode.AUTHENTICATION_FAILED, "authentication failed")
            )
            return
        try:
            with anyio.fail_after(self.settings.backend_timeout):
                started = time.perf_counter()
                user = await self.directory.get_user(user_id)
                if user is None:
                    await conn.apply(
                        session.identify_failed(
                            CloseCode.AUTHENTICATION_FAILED, "authentication failed"
                        )
                    )
                    return
                servers = await self.directory.get_user_servers(user_id)
                self.metrics.directory_seconds.observe(time.perf_counter() - started)
                per_user = self.settings.max_connections_per_user
                if per_user and len(self.by_user.get(user_id, ())) >= per_user:
                    await conn.apply(
                        session.identify_failed(
                            CloseCode.TOO_MANY_CONNECTIONS, "too many connections for this user"
                        )
                    )
                    return
                conn.user = user
                conn.servers = tuple(servers)
                # READY only once ws:user:{id} events reach this connection (7a).
                self.by_user.setdefault(user_id, set()).add(conn)
                conn.user_routed = True
                await self.interest.acquire(keys.user_channel(user_id))
                change = await self.presence.session_opened(
                    self.instance_id, user_id, session.session_id
                )
                conn.presence_open = True
        except _BACKEND_ERRORS as exc:
            self.metrics.backend_failures.labels("identify").inc()
            log.error(
                "identify failed, backend unavailable: %r",
                exc,
                extra={"session_id": session.session_id},
            )
            await conn.apply(session.identify_failed(CloseCode.UNEXPECTED, "backend unavailable"))
            return
        await conn.apply(session.identified(user, servers, change.after))
        log.debug("identified", extra={"session_id": session.session_id, "user_id": user_id})
        # Let the sender put READY on the wire before the presence broadcast (one
        # publish per server of the user) runs in this task.
        await anyio.lowlevel.checkpoint()
        await self._presence_changed(change, servers)

    # --- subscriptions ------------------------------------------------------------

    async def subscribe(self, conn: Connection, server_id: ServerId) -> None:
        session = conn.session
        user_id = session.user_id
        assert user_id is not None
        try:
            with anyio.fail_after(self.settings.backend_timeout):
                context = await self.permissions.server(server_id)
                if context is None:
                    await conn.apply(
                        session.refuse(ErrorCode.NOT_FOUND, "unknown server", "SUBSCRIBE_SERVER")
                    )
                    return
                if await self.permissions.member(server_id, user_id) is None:
                    await conn.apply(
                        session.refuse(
                            ErrorCode.FORBIDDEN, "not a member of this server", "SUBSCRIBE_SERVER"
                        )
                    )
                    return
                await self.interest.acquire(keys.server_channel(server_id))
        except _BACKEND_ERRORS as exc:
            self._backend_failed(conn, "subscribe", exc)
            return
        if session.state is not State.READY:  # closed while we waited
            await self.interest.release(keys.server_channel(server_id))
            return
        # No await between routing and SUBSCRIBED: nothing can slip in between.
        self.by_server.setdefault(server_id, set()).add(conn)
        await conn.apply(session.subscribe_confirmed(server_id))

    async def unroute(self, conn: Connection, server_id: ServerId) -> None:
        if self._drop_route(conn, server_id):
            await self.interest.release(keys.server_channel(server_id))

    def _drop_route(self, conn: Connection, server_id: ServerId) -> bool:
        routed = self.by_server.get(server_id)
        if routed is None or conn not in routed:
            return False
        routed.discard(conn)
        if not routed:
            del self.by_server[server_id]
        return True

    # --- typing and presence ------------------------------------------------------

    async def start_typing(self, conn: Connection, channel_id: ChannelId) -> None:
        session = conn.session
        user = conn.user
        assert user is not None
        try:
            with anyio.fail_after(self.settings.backend_timeout):
                channel = await self.permissions.channel(channel_id)
                if channel is None:
                    await conn.apply(
                        session.refuse(ErrorCode.NOT_FOUND, "unknown channel", "TYPING_START")
                    )
                    return
                readers = await self.permissions.readers(channel.server_id, channel_id, (user.id,))
                if user.id not in readers:
                    await conn.apply(
                        session.refuse(
                            ErrorCode.FORBIDDEN,
                            "missing READ_MESSAGES on this channel",
                            "TYPING_START",
                        )
                    )
                    return
                claimed = await self.typing_gate.claim(
                    keys.typing_key(channel_id, user.id), self.settings.typing_ttl_ms
                )
        except _BACKEND_ERRORS as exc:
            # Typing is best effort: a backend hiccup drops the indicator, not the session.
            self.metrics.backend_failures.labels("typing").inc()
            log.warning("typing dropped, backend unavailable: %r", exc)
            return
        if not claimed:
            return
        self.metrics.typing_dispatched.inc()
        event = {
            "op": "TYPING_START",
            "d": {
                "channelId": channel_id,
                "serverId": channel.server_id,
                "userId": user.id,
                "username": user.username,
                "timestamp": self.clock.wall_ms(),
            },
        }
        await self.publish_to_channel(channel_id, channel.server_id, event, exclude_user_id=user.id)

    async def set_presence(self, conn: Connection, status: Status) -> None:
        user_id = conn.session.user_id
        assert user_id is not None
        try:
            with anyio.fail_after(self.settings.backend_timeout):
                change = await self.presence.set_status(user_id, status)
        except _BACKEND_ERRORS as exc:
            self._backend_failed(conn, "presence", exc)
            return
        await self._presence_changed(change, conn.servers)

    async def _presence_changed(
        self, change: PresenceChange, servers: Iterable[Server] | None
    ) -> None:
        if change.before is change.after:
            return
        try:
            with anyio.fail_after(self.settings.backend_timeout):
                await self.directory.set_user_status(change.user_id, change.after)
                if change.visible_changed and servers is None:
                    servers = await self.directory.get_user_servers(change.user_id)
        except _BACKEND_ERRORS as exc:
            self.metrics.backend_failures.labels("directory").inc()
            log.warning("presence: directory write failed for %s: %r", change.user_id, exc)
            if servers is None:
                # A reaped user's servers are unknown: broadcast later, not never.
                self._pending_broadcasts.append(change)
                return
        if change.visible_changed and servers is not None:
            await self._broadcast_presence(change.user_id, change.after, servers)

    async def _retry_pending_broadcasts(self) -> None:
        """Broadcasts of reaped users that failed on the directory: resend them unless
        a newer transition of the same user has been broadcast since."""
        while self._pending_broadcasts:
            change = self._pending_broadcasts[0]
            with anyio.fail_after(self.settings.backend_timeout):
                current = await self.presence.get_status(change.user_id)
                servers = await self.directory.get_user_servers(change.user_id)
                if current is change.after:
                    await self.directory.set_user_status(change.user_id, current)
            self._pending_broadcasts.pop(0)
            # Queued for its status write too: broadcast only a visible change (a reaped
            # invisible user goes offline without a PRESENCE_UPDATE).
            if change.visible_changed and current.visible is change.after.visible:
                await self._broadcast_presence(change.user_id, change.after, servers)

    async def _broadcast_presence(
        self, user_id: UserId, status_after: Status, servers: Iterable[Server]
    ) -> None:
        self.metrics.presence_broadcasts.inc()
        status = status_after.visible.value
        for server in servers:
            await self.publish_to_server(
                server.id,
                {
                    "op": "PRESENCE_UPDATE",
                    "d": {"userId": user_id, "serverId": server.id, "status": status},
                },
            )

    def _backend_failed(self, conn: Connection, what: str, exc: BaseException) -> None:
        self.metrics.backend_failures.labels(what).inc()
        log.error(
            "%s failed, backend unavailable: %r",
            what,
            exc,
            extra={"session_id": conn.session.session_id},
        )
        conn.request_close(CloseCode.UNEXPECTED, "backend unavailable")

    # --- publishing (PROTOCOL section 8) ------------------------------------------

    async def publish_to_server(
        self, server_id: ServerId, event: dict[str, Any], exclude_user_id: UserId | None = None
    ) -> bool:
        return await self._publish(
            keys.server_channel(server_id), encode_envelope(event, None, exclude_user_id)
        )

    async def publish_to_channel(
        self,
        channel_id: ChannelId,
        server_id: ServerId,
        event: dict[str, Any],
        exclude_user_id: UserId | None = None,
    ) -> bool:
        return await self._publish(
            keys.server_channel(server_id), encode_envelope(event, channel_id, exclude_user_id)
        )

    async def publish_to_user(self, user_id: UserId, event: dict[str, Any]) -> bool:
        return await self._publish(keys.user_channel(user_id), encode_envelope(event))

    async def _publish(self, channel: str, payload: bytes) -> bool:
        """Publish; during a broker outage log, count and return False (never block)."""
        try:
            with anyio.fail_after(self.settings.backend_timeout):
                await self.broker.publish(channel, payload)
        except _BACKEND_ERRORS as exc:
            self.metrics.publish_failures.inc()
            log.error("publish to %s failed: %r", channel, exc)
            return False
        return True

    # --- fan-out ------------------------------------------------------------------

    async def _on_message(self, channel: str, payload: bytes) -> None:
        self.metrics.broker_messages.inc()
        started = time.perf_counter()
        try:
            envelope = decode_envelope(payload)
        except InvalidEnvelope as exc:
            self.metrics.invalid_envelopes.inc()
            log.warning("dropped invalid envelope on %s: %s", channel, exc)
            return
        try:
            if channel.startswith(keys.SERVER_CHANNEL_PREFIX):
                await self._fan_out_server(channel[len(keys.SERVER_CHANNEL_PREFIX) :], envelope)
            elif channel.startswith(keys.USER_CHANNEL_PREFIX):
                conns = self.by_user.get(channel[len(keys.USER_CHANNEL_PREFIX) :])
                if conns:
                    template = dispatch_template(envelope.op, envelope.d)
                    for conn in conns:
                        conn.deliver(template)
        except _BACKEND_ERRORS as exc:
            self.metrics.backend_failures.labels("fanout").inc()
            log.error("fan-out on %s failed: %r", channel, exc)
        self.metrics.fanout_seconds.observe(time.perf_counter() - started)

    async def _fan_out_server(self, server_id: ServerId, envelope: Envelope) -> None:
        op = envelope.op
        if op in INVALIDATING_OPS:
            self.permissions.invalidate_server(server_id)
        removed_user = None
        if op == MEMBER_REMOVE and isinstance(envelope.d, dict):
            uid = envelope.d.get("userId")
            if isinstance(uid, str):
                removed_user = uid
                self.permissions.invalidate_member(server_id, uid)
        conns = self.by_server.get(server_id)
        if conns:
            targets: Iterable[Connection] = conns
            exclude = envelope.exclude_user_id
            if envelope.channel_id is not None:
                candidates = {c.session.user_id for c in conns} - {exclude}
                with anyio.fail_after(self.settings.backend_timeout):
                    readers = await self.permissions.readers(
                        server_id, envelope.channel_id, [u for u in candidates if u is not None]
                    )
                targets = [c for c in conns if c.session.user_id in readers]
            elif exclude is not None:
                targets = [c for c in conns if c.session.user_id != exclude]
            template = dispatch_template(op, envelope.d)
            for conn in targets:
                conn.deliver(template)
        if removed_user is not None:
            for conn in list(self.by_user.get(removed_user, ())):
                if server_id not in conn.session.subscriptions:
                    continue
                # Routing changes now; the broker unsubscribe runs outside this handler:
                # the broker's reader is the task running it, and an unsubscribe may wait
                # for a subscribe of the same channel whose confirmation that reader reads.
                conn.enqueue_effects(conn.session.unsubscribe(server_id))
                if self._drop_route(conn, server_id):
                    self._release_later(keys.server_channel(server_id))

    def _release_later(self, channel: str) -> None:
        if self._tasks is not None:
            self._tasks.start_soon(self.interest.release, channel)

    # --- timers -------------------------------------------------------------------

    async def _sweep_loop(self) -> None:
        while True:
            await anyio.sleep(self.settings.heartbeat_sweep)
            self.sweep()

    def sweep(self) -> None:
        """Close every connection whose heartbeat (or identify) deadline passed."""
        now = self.clock.monotonic()
        for conn in list(self.connections):
            conn.enqueue_effects(conn.session.check_timers(now))

    async def _keep_alive(self) -> None:
        with anyio.fail_after(self.settings.backend_timeout):
            known = await self.presence.keep_alive(self.instance_id, self.settings.presence_ttl_ms)
        if not known:
            await self._reopen_presence()

    async def _reopen_presence(self) -> None:
        """The registry lost this instance (reaped after an outage longer than its
        TTL): open the sessions of every live connection again, so that connected
        users are shown online again (once: the store reports the transitions)."""
        for conn in list(self.connections):
            user_id = conn.session.user_id
            if not conn.presence_open or user_id is None:
                continue
            with anyio.fail_after(self.settings.backend_timeout):
                change = await self.presence.session_opened(
                    self.instance_id, user_id, conn.session.session_id
                )
            await self._presence_changed(change, conn.servers)

    async def _presence_loop(self) -> None:
        ttl = self.settings.presence_ttl_ms / 1000.0
        next_reap = self.clock.monotonic() + ttl / 2
        while True:
            await anyio.sleep(ttl / 3)
            if self.draining:
                continue
            try:
                await self._keep_alive()
                await self._retry_pending_closes()
                await self._retry_pending_broadcasts()
                if self.clock.monotonic() >= next_reap:
                    next_reap = self.clock.monotonic() + ttl / 2
                    with anyio.fail_after(self.settings.backend_timeout):
                        changes = await self.presence.reap()
                    for change in changes:
                        await self._presence_changed(change, None)
            except _BACKEND_ERRORS as exc:
                self.metrics.backend_failures.labels("presence").inc()
                log.warning("presence liveness/reap failed: %r", exc)

    async def _retry_pending_closes(self) -> None:
        while self._pending_closes:
            user_id, session_id, servers = self._pending_closes[0]
            with anyio.fail_after(self.settings.backend_timeout):
                change = await self.presence.session_closed(self.instance_id, user_id, session_id)
            self._pending_closes.pop(0)
            await self._presence_changed(change, servers)

    # --- teardown -----------------------------------------------------------------

    async def teardown(self, conn: Connection) -> None:
        """Release everything a connection held (shielded by the caller)."""
        session = conn.session
        if session.state is not State.CLOSED:
            session.close(conn.close_code or CloseCode.GOING_AWAY, "gone")
        try:
            with anyio.move_on_after(self.settings.backend_timeout * 2):
                for server_id in list(session.subscriptions):
                    await self.unroute(conn, server_id)
                # The user is routed (and may hold a presence session) before READY sets
                # session.user_id: an IDENTIFY that failed after routing must clean up too.
                user_id = conn.user.id if conn.user is not None else session.user_id
                if conn.user_routed and user_id is not None:
                    conns = self.by_user.get(user_id)
                    if conns is not None:
                        conns.discard(conn)
                        if not conns:
                            del self.by_user[user_id]
                    conn.user_routed = False
                    await self.interest.release(keys.user_channel(user_id))
                if conn.presence_open and user_id is not None and not self.draining:
                    conn.presence_open = False
                    try:
                        change = await self.presence.session_closed(
                            self.instance_id, user_id, session.session_id
                        )
                    except _BACKEND_ERRORS as exc:
                        log.error(
                            "presence: session_closed failed for %s (will retry): %r", user_id, exc
                        )
                        self._pending_closes.append((user_id, session.session_id, conn.servers))
                    else:
                        await self._presence_changed(change, conn.servers)
        finally:
            self.connections.discard(conn)
            self.metrics.closes.labels(str(conn.close_code), conn.close_side).inc()
            log.info(
                "connection closed",
                extra={
                    "session_id": session.session_id,
                    "user_id": session.user_id,
                    "close_code": conn.close_code,
                    "close_side": conn.close_side,
                    "duration_s": round(self.clock.monotonic() - conn.opened_at, 3),
                },
            )
            if not self.connections:
                self._idle.set()

    # --- introspection ------------------------------------------------------------

    def is_healthy(self) -> bool:
        return self.broker.is_healthy()
