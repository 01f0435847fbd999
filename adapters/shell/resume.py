"""Resume (PROTOCOL section 13): the sessions an instance can hand to a RESUME.

Every READY session of this instance is registered here by its session id, attached
(a RESUME of it is a zombie takeover: the old connection closes 4014) or *parked*
(its connection ended in a way :func:`domain.replay.parks` keeps: it holds its routes
and presence, and keeps every dispatch in its replay buffer). A parked session ends
when its TTL runs out or when it kept more than the outbound bounds; it is then
released like a closed connection (presence offline if it was the user's last).

:meth:`Resumer.reclaim` carries out a RESUME: the token as for IDENTIFY (4004), then
the session's checks (known here, the token's user, ``seq`` within what it kept, no
other RESUME of it under way). A failure answers INVALID_SESSION and leaves the
session as it was. Success returns :class:`~adapters.shell.live.Adopt`: the
connection attaches the session, replays ``s > seq`` and sends RESUMED, all without
an await between the checks and the takeover, so exactly one of two RESUMEs wins.

Across instances nothing is handed over yet: a RESUME of a session this instance
does not hold is answered INVALID_SESSION (never a partial replay).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TypeAlias

import anyio

from adapters.deadline import fail_after
from adapters.shell.live import Adopt, LiveSession, Work
from adapters.shell.metrics import Metrics
from adapters.shell.publisher import BACKEND_ERRORS
from adapters.shell.settings import GatewaySettings, seconds
from domain.codec import CloseCode
from domain.effects import Adopted, Dropped, IdentifyFailed, Reclaim, ResumeRefused, TimerFired
from domain.model import Server, SessionId, User, UserId
from domain.ports import Clock, Directory, InvalidToken, TokenVerifier
from domain.session import State

log = logging.getLogger("gateway")

#: Takes a session over from the instance that holds it (adapters.shell.handoff).
Remote: TypeAlias = Callable[[SessionId, User, list[Server], int], Awaitable[LiveSession | None]]

_AUTH_FAILED = IdentifyFailed(CloseCode.AUTHENTICATION_FAILED, "authentication failed")


class Resumer:
    def __init__(
        self,
        *,
        tokens: TokenVerifier,
        directory: Directory,
        clock: Clock,
        settings: GatewaySettings,
        metrics: Metrics,
        release: Callable[[LiveSession], Awaitable[None]],
    ) -> None:
        self._tokens = tokens
        self._directory = directory
        self._clock = clock
        self._metrics = metrics
        self._release = release
        self._ttl = settings.session.resume_ttl
        self._timeout = seconds(settings.backend_timeout_ms)
        #: Every READY session of this instance, attached or parked.
        self.sessions: dict[SessionId, LiveSession] = {}
        self.parked: set[LiveSession] = set()
        #: (deadline, session) in parking order (one TTL for all: deadlines ascend).
        self._deadlines: deque[tuple[float, LiveSession]] = deque()
        self._overflowed: list[LiveSession] = []
        self._claims: set[SessionId] = set()
        self._wake = anyio.Event()
        self.remote: Remote | None = None
        #: What else a session handed to another instance leaves here (its interest).
        self.on_handed_off: Callable[[LiveSession], None] | None = None
        self._emptied: anyio.Event | None = None

    @property
    def enabled(self) -> bool:
        return self._ttl > 0

    # --- registry -----------------------------------------------------------------

    def register(self, live: LiveSession) -> None:
        """A session became READY here."""
        if self.enabled:
            self.sessions[live.session_id] = live
            live.on_overflow = self._on_overflow

    def forget(self, live: LiveSession) -> None:
        if self.sessions.get(live.session_id) is live:
            del self.sessions[live.session_id]
        self._unpark(live)

    def park(self, live: LiveSession, code: int | None, by_client: bool) -> bool:
        """The session's connection ended: park it if section 13 says so."""
        if live in self.parked:  # parked already, when a RESUME came during the close
            return True
        if self.sessions.get(live.session_id) is not live:
            return False
        session = live.session
        session.report(Dropped(code, by_client, self._clock.monotonic()))
        if session.state is not State.PARKED:
            return False
        live.detach()
        self.parked.add(live)
        self._deadlines.append((session.parked_at + self._ttl, live))
        self._metrics.parked_sessions.set(len(self.parked))
        self._wake.set()
        return True

    def _adopt_arrival(self, live: LiveSession) -> None:
        self.sessions[live.session_id] = live
        live.on_overflow = self._on_overflow
        self.parked.add(live)
        self._deadlines.append((live.session.parked_at + self._ttl, live))

    def claim_for_handoff(self, live: LiveSession, user_id: UserId, seq: int) -> bool:
        """Another instance asks for this session: claim it (parked; a zombie's
        connection closes 4014 and the session parks as if it had dropped)."""
        self._settle(live)
        if self._refusal(live, user_id, seq) is not None:
            return False
        self._claims.add(live.session_id)
        old = live.outlet
        if old is not None:
            old.let_go(CloseCode.SESSION_TAKEN_OVER, "session taken over")
            live.detach()
            live.session.close(CloseCode.SESSION_TAKEN_OVER, "handed off")
            self.park(live, None, True)
        return live.session.state is State.PARKED

    def handed_off(self, live: LiveSession) -> None:
        """Shipped to another instance: it is not ours any more (nothing to release)."""
        self._claims.discard(live.session_id)
        self.forget(live)
        if self.on_handed_off is not None:
            self.on_handed_off(live)
        self._metrics.resumes.labels("handed_off").inc()

    async def wait_empty(self) -> None:
        while self.parked:
            self._emptied = anyio.Event()
            await self._emptied.wait()

    def _settle(self, live: LiveSession | None) -> None:
        """A session whose connection is still closing (a drain's RECONNECT and 1001
        were sent, the close handshake is under way) parks now if that close parks:
        the client may well RESUME before its old connection is gone."""
        if live is None or live.session.state is not State.CLOSED:
            return
        old = live.outlet
        if old is not None and old.closing and self.park(live, old.close_code, False):
            old.let_go(CloseCode.SESSION_TAKEN_OVER, "session taken over")

    def _unpark(self, live: LiveSession) -> None:
        if live in self.parked:
            self.parked.discard(live)
            self._metrics.parked_sessions.set(len(self.parked))
            if not self.parked and self._emptied is not None:
                self._emptied.set()

    def _on_overflow(self, live: LiveSession) -> None:
        self._overflowed.append(live)
        self._wake.set()

    def all_parked(self) -> Iterator[LiveSession]:
        return iter(list(self.parked))

    # --- RESUME -------------------------------------------------------------------

    def _refusal(self, target: LiveSession | None, user_id: UserId, seq: int) -> str | None:
        if not self.enabled or target is None:
            return "unknown"
        if target.session.user_id != user_id:
            return "other_user"
        if target.session_id in self._claims:
            return "concurrent"
        if not target.session.can_resume(seq):
            return "seq"
        return None

    async def reclaim(self, live: LiveSession, effect: Reclaim) -> Sequence[Work]:
        fresh = live.session
        metrics = self._metrics
        try:
            user_id = self._tokens.verify(effect.token, self._clock.wall_ms() / 1000.0)
        except InvalidToken as exc:
            log.info("resume refused: %s", exc, extra={"session_id": fresh.session_id})
            metrics.resumes.labels("auth_failed").inc()
            return fresh.report(_AUTH_FAILED)
        sid = effect.session_id
        self._settle(self.sessions.get(sid))
        why = self._refusal(self.sessions.get(sid), user_id, effect.seq)
        if why is None:
            self._claims.add(sid)  # a second RESUME meanwhile is "concurrent"
        try:
            with fail_after(self._timeout):
                user = await self._directory.get_user(user_id)
        except BACKEND_ERRORS as exc:
            metrics.backend_failures.labels("identify").inc()
            log.error("resume failed, backend unavailable: %r", exc)
            return fresh.report(IdentifyFailed(CloseCode.UNEXPECTED, "backend unavailable"))
        finally:
            if why is None:
                self._claims.discard(sid)
        if user is None:
            metrics.resumes.labels("auth_failed").inc()
            return fresh.report(_AUTH_FAILED)
        target = self.sessions.get(sid)
        if target is None and why == "unknown" and self.enabled and self.remote is not None:
            # Not held here: ask the instance that holds it (never a partial replay).
            try:
                with fail_after(self._timeout):
                    servers = await self._directory.get_user_servers(user_id)
            except BACKEND_ERRORS:
                servers = None
            target = None if servers is None else await self.remote(sid, user, servers, effect.seq)
            if target is not None:
                self._adopt_arrival(target)
                why = None
            metrics.resumes.labels("handed_in" if target else "remote_unknown").inc()
        self._settle(target)
        if why is None:  # again: the session may have ended or moved while we waited
            why = self._refusal(target, user_id, effect.seq)
        if why is not None or target is None:
            metrics.resumes.labels(why or "unknown").inc()
            return fresh.report(ResumeRefused(self._clock.monotonic()))
        # The takeover: no await from the checks above to the Adopt the connection runs.
        old = target.outlet
        if old is not None:
            old.let_go(CloseCode.SESSION_TAKEN_OVER, "session taken over")
            target.detach()
            metrics.resumes.labels("taken_over").inc()
        else:
            self._unpark(target)
            metrics.resumes.labels("resumed").inc()
        log.debug("resumed", extra={"session_id": sid, "user_id": user_id})
        return [*fresh.report(Adopted()), Adopt(target, effect.seq)]

    # --- ending parked sessions (the instance's loop) -----------------------------

    async def run(self) -> None:
        while True:
            self._wake = anyio.Event()  # before: a park while ending others wakes us
            await self._end_due(self._clock.monotonic())
            if self._deadlines:
                wait = self._deadlines[0][0] - self._clock.monotonic()
                with anyio.move_on_after(max(0.0, wait)):
                    await self._wake.wait()
            else:
                await self._wake.wait()

    async def _end_due(self, now: float) -> None:
        while self._overflowed:
            await self._end(self._overflowed.pop(), "overflow")
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, live = deadlines.popleft()
            if live in self.parked:
                live.session.report(TimerFired(now), now)
                if live.session.state is State.CLOSED:
                    await self._end(live, "ttl")

    async def end_all(self) -> None:
        """End every parked session now (tests, and operators who turn resume off)."""
        for live in list(self.parked):
            await self._end(live, "ended")

    async def _end(self, live: LiveSession, reason: str) -> None:
        if live not in self.parked:
            return
        live.session.state = State.CLOSED
        self._claims.discard(live.session_id)
        self.forget(live)
        self._metrics.parked_ended.labels(reason).inc()
        with anyio.CancelScope(shield=True):
            await self._release(live)
