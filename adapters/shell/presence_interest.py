"""Presence interest: which local sessions asked for whose presence (PROTOCOL 14).

In a *large* server a PRESENCE_UPDATE reaches only the sessions that asked for that
user with SUBSCRIBE_PRESENCE, plus the user's own sessions. The interest is per
connection and lives on the connection's own instance: the broadcast still goes over
the server's broker channel, and each instance's fan-out filters it with
:meth:`PresenceInterest.interested` and the pure rule
:func:`domain.recipients.presence_recipients`.

The index holds two views that always agree: (server, user) -> sessions for the
fan-out, and session -> server -> users for replacing and cleaning up. A session's
interest in a server ends with an empty list, with UNSUBSCRIBE_SERVER (or a member
removal) and with its close; nothing is left behind (:meth:`size` says so in tests).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence, Set

from adapters.deadline import fail_after
from adapters.shell.live import LiveSession, Work
from adapters.shell.metrics import Metrics
from adapters.shell.permissions import PermissionCache
from adapters.shell.publisher import BACKEND_ERRORS
from domain.codec import ErrorCode
from domain.effects import PresenceSnapshot, WatchPresence
from domain.model import ServerId, UserId
from domain.ports import PresenceStore

log = logging.getLogger("gateway")

_OP = "SUBSCRIBE_PRESENCE"
_EMPTY: frozenset[LiveSession] = frozenset()


class PresenceInterest:
    def __init__(self) -> None:
        self._watchers: dict[tuple[ServerId, UserId], set[LiveSession]] = {}
        self._by_session: dict[LiveSession, dict[ServerId, frozenset[UserId]]] = {}

    def interested(self, server_id: ServerId, user_id: UserId) -> Set[LiveSession]:
        """The local sessions that asked for ``user_id`` in ``server_id``."""
        return self._watchers.get((server_id, user_id), _EMPTY)

    def replace(self, live: LiveSession, server_id: ServerId, user_ids: Sequence[UserId]) -> None:
        """The session's interest in the server becomes exactly ``user_ids``."""
        self.drop(live, server_id)
        if not user_ids:
            return
        wanted = frozenset(user_ids)
        self._by_session.setdefault(live, {})[server_id] = wanted
        for user_id in wanted:
            self._watchers.setdefault((server_id, user_id), set()).add(live)

    def drop(self, live: LiveSession, server_id: ServerId) -> None:
        servers = self._by_session.get(live)
        if servers is None:
            return
        users = servers.pop(server_id, None)
        if not servers:
            del self._by_session[live]
        for user_id in users or ():
            key = (server_id, user_id)
            watchers = self._watchers.get(key)
            if watchers is not None:
                watchers.discard(live)
                if not watchers:
                    del self._watchers[key]

    def of(self, live: LiveSession) -> dict[ServerId, list[UserId]]:
        """The session's interest, server -> users (sorted): what a handoff carries."""
        return {s: sorted(users) for s, users in self._by_session.get(live, {}).items()}

    def install(self, live: LiveSession, raw: object, subscriptions: Sequence[ServerId]) -> None:
        """A handoff's interest (another instance's :meth:`of`), checked: only servers
        the session is subscribed to, at most 100 string ids each, as SUBSCRIBE_PRESENCE.
        Installed before the handoff's markers: from the moment the new instance routes
        a large server's channel, its PRESENCE_UPDATEs are filtered as on the old one."""
        if not isinstance(raw, dict):
            return
        for server_id, users in raw.items():
            if server_id in subscriptions and isinstance(users, list):
                self.replace(live, server_id, [u for u in users if isinstance(u, str)][:100])

    def drop_all(self, live: LiveSession) -> None:
        """The session closed: every interest it held goes."""
        for server_id in list(self._by_session.get(live, ())):
            self.drop(live, server_id)

    def size(self) -> tuple[int, int]:
        """(sessions with interest, (server, user) pairs watched): for leak checks."""
        return len(self._by_session), len(self._watchers)


class PresenceWatch:
    """The handler of :class:`WatchPresence` (SUBSCRIBE_PRESENCE)."""

    def __init__(
        self,
        interest: PresenceInterest,
        permissions: PermissionCache,
        store: PresenceStore,
        metrics: Metrics,
        backend_timeout: float,
    ) -> None:
        self._interest = interest
        self._permissions = permissions
        self._store = store
        self._metrics = metrics
        self._timeout = backend_timeout

    async def watch(self, live: LiveSession, effect: WatchPresence) -> Sequence[Work]:
        session = live.session
        server_id = effect.server_id
        try:
            with fail_after(self._timeout):
                if await self._permissions.server(server_id) is None:
                    return session.refuse(ErrorCode.NOT_FOUND, "unknown server", _OP)
                if not effect.subscribed:
                    return session.refuse(
                        ErrorCode.NOT_SUBSCRIBED, "subscribe to the server first", _OP
                    )
                asked = list(dict.fromkeys(effect.user_ids))  # each once, in the order asked
                members = await self._permissions.members(server_id, asked) if asked else {}
                listed = [u for u in asked if u in members]
                # Interest before the read: a change after the read still arrives.
                if server_id not in session.subscriptions:  # left the server meanwhile
                    return ()
                self._interest.replace(live, server_id, listed)
                statuses = await self._store.get_statuses(listed) if listed else []
        except BACKEND_ERRORS as exc:
            self._metrics.backend_failures.labels("presence_interest").inc()
            log.warning(
                "subscribe_presence failed, backend unavailable: %r",
                exc,
                extra={"session_id": session.session_id},
            )
            return session.refuse(ErrorCode.UNAVAILABLE, "backend unavailable, retry", _OP)
        presences = tuple(zip(listed, statuses, strict=True))
        return session.report(PresenceSnapshot(server_id, presences))
