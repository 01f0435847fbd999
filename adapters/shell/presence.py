"""Presence keeping: a user's status across instances (PROTOCOL section 7).

The store holds the sessions behind each user's status; this room opens and closes
this instance's sessions in it, keeps the instance alive in it, reaps dead instances
and broadcasts every change of the *visible* status once per server of the user.
What failed while a backend was down is retried, never lost: closes that did not
reach the store (so no session leaks while the instance lives), and broadcasts of
reaped users whose servers could not be read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import anyio
import anyio.lowlevel

from adapters.deadline import fail_after
from adapters.shell.live import Announce, LiveSession, Work
from adapters.shell.metrics import Metrics
from adapters.shell.publisher import BACKEND_ERRORS, Publisher
from adapters.shell.settings import GatewaySettings, seconds
from domain.codec import ErrorCode
from domain.effects import SetPresence
from domain.model import InstanceId, PresenceChange, Server, SessionId, Status, UserId
from domain.ports import Clock, Directory, PresenceStore

log = logging.getLogger("gateway")


class PresenceKeeper:
    def __init__(
        self,
        *,
        store: PresenceStore,
        directory: Directory,
        publisher: Publisher,
        instance_id: InstanceId,
        settings: GatewaySettings,
        metrics: Metrics,
        clock: Clock,
        sessions: Callable[[], Iterable[LiveSession]],
        draining: Callable[[], bool],
    ) -> None:
        self._store = store
        self._directory = directory
        self._publisher = publisher
        self._instance_id = instance_id
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._sessions = sessions
        self._draining = draining
        self._timeout = seconds(settings.backend_timeout_ms)
        self._pending_closes: list[tuple[UserId, SessionId, tuple[Server, ...]]] = []
        self._pending_broadcasts: list[PresenceChange] = []

    # --- a session's presence ------------------------------------------------------

    async def open(self, live: LiveSession, user_id: UserId) -> PresenceChange:
        """Open the session in the store (before READY; the caller bounds the time)."""
        change = await self._store.session_opened(self._instance_id, user_id, live.session_id)
        live.presence_open = True
        return change

    async def close(self, live: LiveSession, user_id: UserId) -> None:
        """The session ended; on a drain it is left to expire with the instance."""
        if not live.presence_open or self._draining():
            return
        live.presence_open = False
        try:
            change = await self._store.session_closed(self._instance_id, user_id, live.session_id)
        except BACKEND_ERRORS as exc:
            log.error("presence: session_closed failed for %s (will retry): %r", user_id, exc)
            self._pending_closes.append((user_id, live.session_id, live.servers))
        else:
            await self.changed(change, live.servers)

    async def set_status(self, live: LiveSession, effect: SetPresence) -> Sequence[Work]:
        user_id = live.session.user_id
        assert user_id is not None
        try:
            with fail_after(self._timeout):
                change = await self._store.set_status(user_id, effect.status)
        except BACKEND_ERRORS as exc:
            self._metrics.backend_failures.labels("presence").inc()
            log.error(
                "presence failed, backend unavailable: %r",
                exc,
                extra={"session_id": live.session_id},
            )
            # PROTOCOL 15: answered, never a close; nothing changed, the client may retry.
            return live.session.refuse(
                ErrorCode.UNAVAILABLE, "presence unavailable, retry", "PRESENCE_UPDATE"
            )
        await self.changed(change, live.servers)
        return ()

    async def announce(self, live: LiveSession, effect: Announce) -> Sequence[Work]:
        # Let the sender put READY (queued just before) on the wire before the
        # broadcast (one publish per server of the user) runs in this task.
        await anyio.lowlevel.checkpoint()
        await self.changed(effect.change, effect.servers)
        return ()

    # --- changes and broadcasts ---------------------------------------------------

    async def changed(self, change: PresenceChange, servers: Iterable[Server] | None) -> None:
        """Record a transition in the directory and broadcast it if it was visible;
        ``servers`` None means unknown (a reaped user): they are read first."""
        if change.before is change.after:
            return
        try:
            with fail_after(self._timeout):
                await self._directory.set_user_status(change.user_id, change.after)
                if change.visible_changed and servers is None:
                    servers = await self._directory.get_user_servers(change.user_id)
        except BACKEND_ERRORS as exc:
            self._metrics.backend_failures.labels("directory").inc()
            log.warning("presence: directory write failed for %s: %r", change.user_id, exc)
            if servers is None:
                # A reaped user's servers are unknown: broadcast later, not never.
                self._pending_broadcasts.append(change)
                return
        if change.visible_changed and servers is not None:
            await self._broadcast(change.user_id, change.after, servers)

    async def _broadcast(self, user_id: UserId, after: Status, servers: Iterable[Server]) -> None:
        self._metrics.presence_broadcasts.inc()
        status = after.visible.value
        for server in servers:
            await self._publisher.publish_to_server(
                server.id,
                {
                    "op": "PRESENCE_UPDATE",
                    "d": {"userId": user_id, "serverId": server.id, "status": status},
                },
            )

    # --- liveness, reaping and retries (the instance's loop) ----------------------

    async def keep_alive(self) -> None:
        """Refresh this instance's liveness; if the store had lost it, open the
        sessions of every live connection again (users shown online again, once)."""
        with fail_after(self._timeout):
            known = await self._store.keep_alive(self._instance_id, self._settings.presence_ttl_ms)
        if not known:
            await self._reopen()

    async def expire_soon(self) -> None:
        """Drain: this instance's sessions stay in the store only for the grace, so
        that users who reconnect to another instance never flap offline."""
        try:
            await self._store.keep_alive(self._instance_id, self._settings.presence_grace_ms)
        except BACKEND_ERRORS as exc:
            log.warning("drain: could not shorten presence liveness: %s", exc)

    async def _reopen(self) -> None:
        for live in list(self._sessions()):
            user_id = live.session.user_id
            if not live.presence_open or user_id is None:
                continue
            with fail_after(self._timeout):
                change = await self._store.session_opened(
                    self._instance_id, user_id, live.session_id
                )
            await self.changed(change, live.servers)

    async def run(self) -> None:
        ttl = self._settings.presence_ttl_ms / 1000.0
        next_reap = self._clock.monotonic() + ttl / 2
        while True:
            await anyio.sleep(ttl / 3)
            if self._draining():
                continue
            try:
                await self.keep_alive()
                await self._retry_closes()
                await self._retry_broadcasts()
                if self._clock.monotonic() >= next_reap:
                    next_reap = self._clock.monotonic() + ttl / 2
                    with fail_after(self._timeout):
                        changes = await self._store.reap()
                    for change in changes:
                        await self.changed(change, None)
            except BACKEND_ERRORS as exc:
                self._metrics.backend_failures.labels("presence").inc()
                log.warning("presence liveness/reap failed: %r", exc)

    async def _retry_closes(self) -> None:
        while self._pending_closes:
            user_id, session_id, servers = self._pending_closes[0]
            with fail_after(self._timeout):
                change = await self._store.session_closed(self._instance_id, user_id, session_id)
            self._pending_closes.pop(0)
            await self.changed(change, servers)

    async def _retry_broadcasts(self) -> None:
        """Broadcasts of reaped users that failed on the directory: resend them unless
        a newer transition of the same user has been broadcast since."""
        while self._pending_broadcasts:
            change = self._pending_broadcasts[0]
            with fail_after(self._timeout):
                current = await self._store.get_status(change.user_id)
                servers = await self._directory.get_user_servers(change.user_id)
                if current is change.after:
                    await self._directory.set_user_status(change.user_id, current)
            self._pending_broadcasts.pop(0)
            # Queued for its status write too: broadcast only a visible change (a reaped
            # invisible user goes offline without a PRESENCE_UPDATE).
            if change.visible_changed and current.visible is change.after.visible:
                await self._broadcast(change.user_id, change.after, servers)
