"""The shell's handlers: one per effect that needs the world.

:class:`Handlers` is the host of every connection (``SessionHost``). A handler
takes the live session and the effect, does its I/O, and returns the
session's answer as effects (``session.report(...)`` or ``session.refuse(...)``),
which the connection's interpreter runs next. :data:`Handlers.table` is the whole
map from effect to handler; identify and subscribe live here, typing and presence in
their own rooms.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from adapters.deadline import fail_after
from adapters.shell.admission import Admission
from adapters.shell.connection import Connection
from adapters.shell.live import Announce, LiveSession, Work
from adapters.shell.metrics import Metrics
from adapters.shell.permissions import PermissionCache
from adapters.shell.presence import PresenceKeeper
from adapters.shell.presence_interest import PresenceInterest, PresenceWatch
from adapters.shell.publisher import BACKEND_ERRORS
from adapters.shell.resume import Resumer
from adapters.shell.routing import Routes
from adapters.shell.settings import GatewaySettings, seconds
from adapters.shell.typing_indicators import TypingIndicators
from domain.codec import CloseCode, ErrorCode
from domain.effects import (
    Authenticate,
    Identified,
    IdentifyFailed,
    Reclaim,
    SetPresence,
    StartTyping,
    Subscribe,
    SubscribeConfirmed,
    Unsubscribe,
    WatchPresence,
)
from domain.ports import Clock, Directory, InvalidToken, TokenVerifier
from domain.session import State

log = logging.getLogger("gateway")

E = TypeVar("E")
Handler = Callable[[LiveSession, Any], Awaitable[Sequence[Work]]]


def _entry(
    kind: type[E], handler: Callable[[LiveSession, E], Awaitable[Sequence[Work]]]
) -> tuple[type, Handler]:
    """A typed entry: mypy checks that ``handler`` takes a ``kind``."""
    return kind, handler


_SUB = "SUBSCRIBE_SERVER"
#: Client operations bounded by the shell-wide backend slots (handshakes have their
#: own admission queue; UNSUBSCRIBE_SERVER never waits for a backend).
_GATED: frozenset[type] = frozenset(
    {Subscribe, StartTyping, SetPresence, WatchPresence, Announce}
)
_AUTH_FAILED = IdentifyFailed(CloseCode.AUTHENTICATION_FAILED, "authentication failed")


class Handlers:
    def __init__(
        self,
        *,
        tokens: TokenVerifier,
        directory: Directory,
        clock: Clock,
        settings: GatewaySettings,
        metrics: Metrics,
        routes: Routes,
        permissions: PermissionCache,
        presence: PresenceKeeper,
        typing: TypingIndicators,
        resumer: Resumer,
        interest: PresenceInterest,
        watch: PresenceWatch,
        admission: Admission,
        backend: Admission,
        on_closed: Callable[[Connection], Awaitable[None]],
    ) -> None:
        self._on_closed = on_closed
        self._tokens = tokens
        self._directory = directory
        self._clock = clock
        self._settings = settings
        self._metrics = metrics
        self._routes = routes
        self._permissions = permissions
        self._interest = interest
        self._admission = admission
        self._backend = backend
        self._timeout = seconds(settings.backend_timeout_ms)
        self.table: dict[type, Handler] = dict(
            [
                _entry(Authenticate, self.identify),
                _entry(Subscribe, self.subscribe),
                _entry(Unsubscribe, self.unsubscribe),
                _entry(StartTyping, typing.start),
                _entry(SetPresence, presence.set_status),
                _entry(Announce, presence.announce),
                _entry(Reclaim, self.resume),
                _entry(WatchPresence, watch.watch),
            ]
        )
        self._presence = presence
        self._resumer = resumer

    # --- adapters.shell.connection.SessionHost -------------------------------------

    async def handle(self, live: LiveSession, effect: Work) -> Sequence[Work]:
        handler = self.table[type(effect)]
        if type(effect) not in _GATED:
            return await handler(live, effect)
        # PROTOCOL 15: a bounded number of operations call the backends at once; this
        # one waits for a slot with no timer running (its deadline starts inside), and
        # its connection's reader meanwhile takes no frame: the rest wait in the socket.
        async with self._backend.slot():
            return await handler(live, effect)

    async def closed(self, conn: Connection) -> None:
        await self._on_closed(conn)

    async def identify(self, live: LiveSession, effect: Authenticate) -> Sequence[Work]:
        session = live.session
        try:
            user_id = self._tokens.verify(effect.token, self._clock.wall_ms() / 1000.0)
        except InvalidToken as exc:
            log.info("identify refused: %s", exc, extra={"session_id": session.session_id})
            return session.report(_AUTH_FAILED)
        try:
            # PROTOCOL 15: queued (FIFO, no timer) until admitted; one deadline from then.
            async with self._admission.slot():
                with fail_after(self._timeout):
                    started = time.perf_counter()
                    user = await self._directory.get_user(user_id)
                    if user is None:
                        return session.report(_AUTH_FAILED)
                    servers = await self._directory.get_user_servers(user_id)
                    self._metrics.directory_seconds.observe(time.perf_counter() - started)
                    per_user = self._settings.max_connections_per_user
                    if per_user and self._routes.user_sessions(user_id) >= per_user:
                        return session.report(
                            IdentifyFailed(
                                CloseCode.TOO_MANY_CONNECTIONS, "too many connections for this user"
                            )
                        )
                    live.user = user
                    live.servers = tuple(servers)
                    # READY only once ws:user:{id} events reach this session (7a).
                    await self._routes.route_user(live, user_id)
                    change = await self._presence.open(live, user_id)
        except BACKEND_ERRORS as exc:
            self._metrics.backend_failures.labels("identify").inc()
            log.error(
                "identify failed, backend unavailable: %r",
                exc,
                extra={"session_id": session.session_id},
            )
            return session.report(IdentifyFailed(CloseCode.UNEXPECTED, "backend unavailable"))
        log.debug("identified", extra={"session_id": session.session_id, "user_id": user_id})
        self._resumer.register(live)
        return [
            *session.report(Identified(user, servers, change.after)),
            Announce(change, live.servers),
        ]

    async def resume(self, live: LiveSession, effect: Reclaim) -> Sequence[Work]:
        """RESUME enters where IDENTIFY does (section 13; see adapters.shell.resume),
        through the same admission queue (PROTOCOL 15: a storm of IDENTIFY or RESUME).
        The resumer bounds each of its backend calls itself."""
        async with self._admission.slot():
            return await self._resumer.reclaim(live, effect)

    async def subscribe(self, live: LiveSession, effect: Subscribe) -> Sequence[Work]:
        session = live.session
        server_id = effect.server_id
        user_id = session.user_id
        assert user_id is not None
        try:
            with fail_after(self._timeout):
                if await self._permissions.server(server_id) is None:
                    return session.refuse(ErrorCode.NOT_FOUND, "unknown server", "SUBSCRIBE_SERVER")
                if await self._permissions.member(server_id, user_id) is None:
                    return session.refuse(
                        ErrorCode.FORBIDDEN, "not a member of this server", "SUBSCRIBE_SERVER"
                    )
                await self._routes.watch_server(server_id)
        except BACKEND_ERRORS as exc:
            self._metrics.backend_failures.labels("subscribe").inc()
            log.error(
                "subscribe failed, backend unavailable: %r",
                exc,
                extra={"session_id": session.session_id},
            )
            # PROTOCOL 15: answered, never a close; the client may subscribe again.
            return session.refuse(ErrorCode.UNAVAILABLE, "backend unavailable, retry", _SUB)
        if session.state is not State.READY:  # closed while we waited
            await self._routes.unwatch_server(server_id)
            return ()
        # No await between routing and SUBSCRIBED: nothing can slip in between.
        self._routes.add_route(live, server_id)
        return session.report(SubscribeConfirmed(server_id))

    async def unsubscribe(self, live: LiveSession, effect: Unsubscribe) -> Sequence[Work]:
        self._routes.unroute(live, effect.server_id)
        self._interest.drop(live, effect.server_id)  # UNSUBSCRIBE_SERVER ends it (14)
        return ()
