"""One gateway instance: lifecycle and wiring of the shell's rooms.

Each concept has its own module: :mod:`~adapters.shell.connection` (the socket side
and the one effect interpreter), :mod:`~adapters.shell.live` (the session side),
:mod:`~adapters.shell.handlers` (effects that need the world),
:mod:`~adapters.shell.routing` (indexes and broker interest),
:mod:`~adapters.shell.fanout`, :mod:`~adapters.shell.presence`,
:mod:`~adapters.shell.typing_indicators`, :mod:`~adapters.shell.drain` and
:mod:`~adapters.shell.publisher`. The :class:`Gateway` builds them, runs the
instance's background tasks, serves connections, and reports a :meth:`snapshot`.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Callable, Iterator

import anyio
from anyio.abc import TaskStatus

from adapters.shell.admission import Admission
from adapters.shell.connection import Connection, SocketLimits
from adapters.shell.drain import Drain
from adapters.shell.fanout import FanOut
from adapters.shell.handlers import Handlers
from adapters.shell.handoff import Handoff
from adapters.shell.lag import NOISE_S, LoopLag
from adapters.shell.live import LiveSession
from adapters.shell.metrics import Metrics
from adapters.shell.outbound import Flusher
from adapters.shell.permissions import PermissionCache
from adapters.shell.presence import PresenceKeeper
from adapters.shell.presence_interest import PresenceInterest, PresenceWatch
from adapters.shell.publisher import BACKEND_ERRORS, Publisher
from adapters.shell.resume import Resumer
from adapters.shell.routing import Routes
from adapters.shell.settings import GatewaySettings, seconds
from adapters.shell.snapshot import GatewaySnapshot
from adapters.shell.typing_indicators import TypingIndicators
from domain.codec import CloseCode
from domain.model import InstanceId, SessionId
from domain.ports import (
    Broker,
    Clock,
    Directory,
    PresenceStore,
    TokenVerifier,
    Transport,
    TypingGate,
)
from domain.session import Session, State

log = logging.getLogger("gateway")


class Gateway:
    """One instance: build the rooms, run their background work, serve connections."""

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
        new_session_id: Callable[[], SessionId] | None = None,
    ) -> None:
        self.broker = broker
        self.presence = presence
        self.directory = directory
        self.clock = clock
        self.settings = s = settings or GatewaySettings()
        self.metrics = metrics or Metrics()
        self.loop_lag = LoopLag(window=s.session.heartbeat_timeout)
        self.instance_id = instance_id or uuid.uuid4().hex
        self._new_session_id = new_session_id or (lambda: str(uuid.uuid4()))
        close_timeout, timeout = seconds(s.close_timeout_ms), seconds(s.backend_timeout_ms)
        self._limits = SocketLimits(s.outbound_max_frames, s.outbound_max_bytes, close_timeout)
        self.running = False
        #: Writes every connection's queued frames (adapters.shell.outbound).
        self.flusher = Flusher()
        self._drained: anyio.Event | None = None
        permissions = PermissionCache(directory, clock, seconds(s.permission_cache_ttl_ms))
        self.publisher = Publisher(broker, self.metrics, timeout)
        self.routes = Routes(broker)
        self.interest = PresenceInterest()
        #: PROTOCOL 15: the bounded IDENTIFY (and RESUME) queue of this instance.
        self.queue = Admission(s.identify_concurrency)
        #: PROTOCOL 15: the bound on client operations' backend calls in flight.
        self.backend_slots = Admission(s.backend_concurrency)
        self.fanout = FanOut(
            self.routes,
            permissions,
            self.metrics,
            timeout,
            interest=self.interest,
            large_server_members=s.session.large_server_members,
        )
        self.keeper = PresenceKeeper(
            store=presence,
            directory=directory,
            publisher=self.publisher,
            instance_id=self.instance_id,
            settings=s,
            metrics=self.metrics,
            clock=clock,
            sessions=self._sessions,
            draining=lambda: self.admission.draining,
        )
        self.admission = Drain(self.keeper, s.max_connections)
        typing = TypingIndicators(
            gate=typing_gate,
            permissions=permissions,
            publisher=self.publisher,
            clock=clock,
            ttl_ms=s.typing_ttl_ms,
            backend_timeout=timeout,
            metrics=self.metrics,
        )
        self.resumer = Resumer(
            tokens=tokens,
            directory=directory,
            clock=clock,
            settings=s,
            metrics=self.metrics,
            release=self._release,
        )
        self.handoff = Handoff(
            broker=broker,
            routes=self.routes,
            resumer=self.resumer,
            keeper=self.keeper,
            interest=self.interest,
            instance_id=self.instance_id,
            clock=clock,
            config=s.session,
            timeout=timeout,
            ask_timeout=seconds(s.handoff_ask_ms),
        )
        self.resumer.remote = self.handoff.take
        self.resumer.on_handed_off = self.interest.drop_all
        self.fanout.intercept = self.handoff.intercept
        self.handlers = Handlers(
            tokens=tokens,
            directory=directory,
            clock=clock,
            settings=s,
            metrics=self.metrics,
            routes=self.routes,
            permissions=permissions,
            presence=self.keeper,
            typing=typing,
            resumer=self.resumer,
            interest=self.interest,
            watch=PresenceWatch(self.interest, permissions, presence, self.metrics, timeout),
            admission=self.queue,
            backend=self.backend_slots,
            on_closed=self.closed,
        )
        # The in-process publishing API (PROTOCOL section 8).
        self.publish_to_server = self.publisher.publish_to_server
        self.publish_to_channel = self.publisher.publish_to_channel
        self.publish_to_user = self.publisher.publish_to_user

    def _sessions(self) -> Iterator[LiveSession]:
        yield from (conn.live for conn in self.admission.connections)
        yield from self.resumer.all_parked()

    # --- lifecycle ----------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Background work of the instance: broker reader, heartbeat sweep, presence
        liveness and reaping, deferred unsubscribes. Runs until cancelled."""
        async with anyio.create_task_group() as group:
            await group.start(self.flusher.run)
            try:
                await self.keeper.keep_alive()
            except BACKEND_ERRORS as exc:
                log.warning("presence store unavailable at start: %s", exc)
            self.routes.bind(group)
            group.start_soon(self.broker.run, self.fanout.on_message)
            group.start_soon(self._sweep_loop)
            group.start_soon(self.keeper.run)
            group.start_soon(self.resumer.run)
            if self.resumer.enabled:
                group.start_soon(self.handoff.start, group)
            self.running = True
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                self.running = False
                self.routes.bind(None)

    async def serve(self, transport: Transport) -> None:
        """Serve one client connection until it ends (called per WebSocket)."""
        session = Session(self._new_session_id(), self.settings.session, self.clock.monotonic())
        conn = Connection(
            transport,
            LiveSession(session),
            self.handlers,
            limits=self._limits,
            metrics=self.metrics,
            clock=self.clock,
            flusher=self.flusher,
        )
        await conn.perform(session.hello())
        self.admission.admit(conn)
        self.metrics.connections_opened.inc()
        log.debug("connection opened", extra={"session_id": session.session_id})
        await conn.run()

    async def drain(self, timeout: float | None = None) -> None:
        """Graceful shutdown of this instance (see :mod:`adapters.shell.drain`)."""
        if self._drained is not None:  # once per instance (serve.py and the lifespan)
            await self._drained.wait()
            return
        self._drained = anyio.Event()
        try:
            budget = seconds(self.settings.drain_timeout_ms) if timeout is None else timeout
            deadline = anyio.current_time() + budget
            await self.admission.drain(budget)
            if self.settings.drain_keeps_parked:
                # The parked sessions (the 1001s above among them) stay until they are
                # resumed on another instance, within the same budget.
                with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
                    await self.resumer.wait_empty()
        finally:
            self._drained.set()

    async def _sweep_loop(self) -> None:
        interval = seconds(self.settings.heartbeat_sweep_ms)
        while True:
            due = self.clock.monotonic() + interval
            await anyio.sleep(interval)
            now = self.clock.monotonic()
            self.loop_lag.observe(now, now - due)
            if now - due > NOISE_S:
                self.metrics.loop_stall.inc(now - due)
            if now - due > 1.0:
                log.warning("event loop stalled %.2f s: heartbeat deadlines wait", now - due)
            await self.sweep()

    async def sweep(self) -> None:
        """Close every connection whose heartbeat (or identify) deadline passed. Time
        the loop was stalled (``loop_lag``) is not counted against clients."""
        clock_now = self.clock.monotonic()
        now = clock_now - self.loop_lag.recent(clock_now)
        for conn in list(self.admission.connections):
            # A handshake still queued for admission is not timed out (PROTOCOL 15): the
            # HEARTBEATs it sent meanwhile are held, and count once it is done.
            if not conn.handshaking:
                await conn.perform(conn.live.session.check_timers(now))

    # --- connection lifecycle ----------------------------------------------------

    async def closed(self, conn: Connection) -> None:
        """Release everything a connection's session held (shielded by the caller)."""
        live = conn.live
        session = live.session
        if session.state is not State.CLOSED:
            session.close(conn.close_code or CloseCode.GOING_AWAY, "gone")
        # Parked, the session keeps its presence interest with its routes (13, 14): it
        # goes in _release, when the session ends.
        parked = self.resumer.park(live, conn.close_code, conn.close_side == "client")
        try:
            if not parked:  # parked: routes and presence stay until it ends (section 13)
                self.resumer.forget(live)
                await self._release(live)
        finally:
            if not parked:
                live.detach()
            self.admission.left(conn)
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

    async def _release(self, live: LiveSession) -> None:
        """Release what a session held: its presence interest, its routes, then its
        presence."""
        self.interest.drop_all(live)
        with anyio.move_on_after(2 * seconds(self.settings.backend_timeout_ms)):
            # In a fixed order: a set of strings iterates in string-hash order, which
            # differs from process to process, and each release may wait.
            for server_id in sorted(live.session.subscriptions):
                await self.routes.unroute_now(live, server_id)
            # The user is routed (and may hold a presence session) before READY sets
            # session.user_id: an IDENTIFY that failed after routing must clean up too.
            user_id = live.user_id
            if user_id is not None:
                await self.routes.unroute_user(live, user_id)
                await self.keeper.close(live, user_id)

    # --- introspection ------------------------------------------------------------

    def snapshot(self) -> GatewaySnapshot:
        conns = self.admission.connections
        states = Counter(conn.live.session.state for conn in conns)
        return GatewaySnapshot(
            running=self.running,
            draining=self.admission.draining,
            broker_healthy=self.broker.is_healthy(),
            connections=frozenset(conn.live.session_id for conn in conns),
            closing=frozenset(conn.live.session_id for conn in conns if conn.closing),
            states={state: states.get(state, 0) for state in State},
            outbound_queued=sum(len(conn.outbound) for conn in conns),
            servers=self.routes.servers(),
            users=self.routes.users(),
            interest={  # the clients' channels (not the handoff's own, gw:*)
                c: n for c, n in self.routes.interest.channels().items() if c[:3] != "gw:"
            },
            parked=frozenset(live.session_id for live in self.resumer.parked),
        )
