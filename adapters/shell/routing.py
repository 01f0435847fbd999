"""Routing: which local sessions an instance's broker channels reach.

Two indexes (server -> sessions, user -> sessions) say where an event goes, and
:class:`ChannelInterest` keeps the broker subscribed to ``ws:server:{id}`` /
``ws:user:{id}`` while at least one local session needs it. Every published event
goes through the broker, so an instance receives each event once per channel and
routes it to each local session once: exactly once per session, in broker order.

A route is dropped in one place, :meth:`Routes.drop_route`. When a session leaves a
server while it lives (UNSUBSCRIBE_SERVER, SERVER_MEMBER_REMOVE) the route goes at
once and the broker unsubscribe runs in the instance's task group: a handler never
waits for the broker, whichever task runs it (the broker's reader may be the one
running it, and an unsubscribe can wait for a subscribe whose confirmation that
reader reads).
"""

from __future__ import annotations

import anyio.abc

from adapters.shell.interest import ChannelInterest
from adapters.shell.live import LiveSession
from domain import keys
from domain.model import ServerId, SessionId, UserId
from domain.ports import Broker


class Routes:
    def __init__(self, broker: Broker) -> None:
        self.interest = ChannelInterest(broker)
        self.by_user: dict[UserId, set[LiveSession]] = {}
        self.by_server: dict[ServerId, set[LiveSession]] = {}
        self._tasks: anyio.abc.TaskGroup | None = None
        self._deferred: list[ServerId] = []

    def bind(self, tasks: anyio.abc.TaskGroup | None) -> None:
        """The task group that runs deferred broker unsubscribes (the instance's)."""
        self._tasks = tasks
        if tasks is not None:
            for server_id in self._deferred:
                tasks.start_soon(self.unwatch_server, server_id)
            self._deferred.clear()

    # --- users --------------------------------------------------------------------

    def user_sessions(self, user_id: UserId) -> int:
        return len(self.by_user.get(user_id, ()))

    async def route_user(self, live: LiveSession, user_id: UserId) -> None:
        """Route ``ws:user:{id}`` here; returns once its events reach the session."""
        self.by_user.setdefault(user_id, set()).add(live)
        live.user_routed = True
        try:
            await self.interest.acquire(keys.user_channel(user_id))
        except BaseException:
            # acquire released its own reference: the route goes too, so that the
            # teardown does not release a reference another session holds.
            live.user_routed = False
            sessions = self.by_user.get(user_id)
            if sessions is not None:
                sessions.discard(live)
                if not sessions:
                    del self.by_user[user_id]
            raise

    async def unroute_user(self, live: LiveSession, user_id: UserId) -> None:
        if not live.user_routed:
            return
        live.user_routed = False
        sessions = self.by_user.get(user_id)
        if sessions is not None:
            sessions.discard(live)
            if not sessions:
                del self.by_user[user_id]
        await self.interest.release(keys.user_channel(user_id))

    # --- servers ------------------------------------------------------------------

    async def watch_server(self, server_id: ServerId) -> None:
        """Subscribe the broker to the server (reference counted); returns once live."""
        await self.interest.acquire(keys.server_channel(server_id))

    async def unwatch_server(self, server_id: ServerId) -> None:
        await self.interest.release(keys.server_channel(server_id))

    def add_route(self, live: LiveSession, server_id: ServerId) -> None:
        """Route the server's events to the session (after :meth:`watch_server`)."""
        self.by_server.setdefault(server_id, set()).add(live)

    def drop_route(self, live: LiveSession, server_id: ServerId) -> bool:
        """Stop routing; True when the session was routed (it then held interest)."""
        routed = self.by_server.get(server_id)
        if routed is None or live not in routed:
            return False
        routed.discard(live)
        if not routed:
            del self.by_server[server_id]
        return True

    def unroute(self, live: LiveSession, server_id: ServerId) -> None:
        """The session left the server: no event reaches it from now on; the broker
        unsubscribe (if this was the last local session) follows in the background."""
        if self.drop_route(live, server_id):
            if self._tasks is not None:
                self._tasks.start_soon(self.unwatch_server, server_id)
            else:  # the instance's task group is not up yet: released once it is
                self._deferred.append(server_id)

    async def unroute_now(self, live: LiveSession, server_id: ServerId) -> None:
        """Teardown: drop the route and wait for the interest to be released."""
        if self.drop_route(live, server_id):
            await self.unwatch_server(server_id)

    # --- introspection ------------------------------------------------------------

    def servers(self) -> dict[ServerId, frozenset[SessionId]]:
        return {sid: frozenset(s.session_id for s in ss) for sid, ss in self.by_server.items()}

    def users(self) -> dict[UserId, frozenset[SessionId]]:
        return {uid: frozenset(s.session_id for s in ss) for uid, ss in self.by_user.items()}
