"""One client connection: the socket side of a session.

A connection owns the transport and a bounded outbound queue (written by the
instance's flusher, :mod:`adapters.shell.outbound`: no task of its own at rest beyond
the reader), and runs the one effect interpreter (:meth:`Connection.perform`): frames
read from the socket go to the session, and the effects that come back run in one
flat loop, in the shape of hypercorn's ``WSStream._handle_events``. Effects that need
the world are handed to the :class:`SessionHost`, which does the I/O and *returns*
the session's answer as more effects for the same loop (it never calls back).

Fan-out never awaits a socket: it stamps the session's next ``s`` into a frame
encoded once per event and appends it to the queue (:meth:`Connection.enqueue`). A
queue over its frame or byte bound means a slow consumer: the queue is dropped and
the connection is closed with 4010, without ever stalling the broadcast.

Every close has a deadline (PROTOCOL section 6): once the gateway decides to close,
the queued frames, the close frame and the peer's answer must fit in ``close_timeout``,
then the transport is aborted. The reader keeps reading and discarding meanwhile.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import anyio

from adapters.shell.live import Adopt, LiveSession, Work
from adapters.shell.metrics import Metrics
from adapters.shell.outbound import Flusher, Outbound, SocketLimits

__all__ = ["Connection", "SessionHost", "SocketLimits"]
from domain.codec import CloseCode, Heartbeat, decode_command
from domain.effects import Authenticate, Close, Reattach, Reclaim, Send
from domain.ports import Clock, MessageTooBig, Transport, TransportClosed
from domain.session import Session, State


class SessionHost(Protocol):
    """What a connection needs from the instance that serves it."""

    async def handle(self, live: LiveSession, effect: Work) -> Sequence[Work]:
        """Carry out one effect that needs the world; return the session's answer."""
        ...

    async def closed(self, conn: Connection) -> None:
        """The connection ended: release what its session held (runs shielded)."""
        ...


#: Effects run beside the reader rather than in it: handshakes (IDENTIFY, RESUME),
#: which may wait long in the admission queue (PROTOCOL 15).
OFF_READER: tuple[type, ...] = (Authenticate, Reclaim)


class Connection(Outbound):
    __slots__ = (
        "_asides",
        "_asides_done",
        "_clock",
        "_held",
        "_host",
        "_resume",
        "live",
        "opened_at",
    )

    def __init__(
        self,
        transport: Transport,
        live: LiveSession,
        host: SessionHost,
        *,
        limits: SocketLimits,
        metrics: Metrics,
        clock: Clock,
        flusher: Flusher,
    ) -> None:
        super().__init__(transport, limits, metrics, flusher)
        self.live = live
        self._host = host
        self._clock = clock
        self.opened_at = live.session.connected_at
        #: Tasks beside the reader (a handshake, an identify timer): their scopes.
        self._asides: list[anyio.CancelScope] | None = None
        self._asides_done: anyio.Event | None = None
        self._failure: BaseException | None = None
        #: While a handshake runs beside the reader: the frames read meanwhile.
        self._held: deque[str | bytes] | None = None
        self._resume: anyio.Event | None = None
        live.attach(self)

    # --- the interpreter ----------------------------------------------------------

    async def perform(self, effects: Sequence[Work]) -> None:
        """Run effects in order; a host's answer runs before the effects after it."""
        pending = deque(effects)
        while pending:
            effect = pending.popleft()
            if isinstance(effect, Send):
                self.enqueue(effect.text)
                if effect.error is not None:
                    self._metrics.errors.labels(effect.error).inc()
            elif isinstance(effect, Close):
                self._closed_by_session(effect)
            elif isinstance(effect, Adopt):
                pending.extendleft(reversed(self._adopt(effect)))
            elif isinstance(effect, OFF_READER) and self._reader is not None and self._held is None:
                # A handshake may queue long for admission (PROTOCOL 15): it runs in its
                # own task and the reader goes on reading (a client that leaves cancels
                # it). Frames read meanwhile wait in ``_held`` and run after it, in order;
                # a handshake one of them starts (after INVALID_SESSION) runs inline there.
                self._held = deque()
                self._aside(self._perform_handled, effect)
            else:
                live = self.live
                answer = await self._host.handle(live, effect)
                if self.live is not live:
                    # Taken over while the handler ran (a RESUME on another connection):
                    # its answer belongs to the session, wherever it is now.
                    await self._forward(live, answer)
                    return
                pending.extendleft(reversed(answer))

    def _adopt(self, adopt: Adopt) -> list[Work]:
        """RESUME: serve the resumed session from now on; its replay goes first."""
        fresh, live = self.live.session, adopt.live
        self.live = live
        live.attach(self)
        reattach = Reattach(adopt.seq, self._clock.monotonic(), fresh.rate.stamps)
        answer = live.session.report(reattach)
        # The replayed frames were already kept in memory (within the outbound bounds):
        # queued without the slow-consumer check, which counts them for what follows.
        replay = [w for w in answer[:-1] if isinstance(w, Send)]
        for effect in replay:
            self.outbound.append(effect.text)
            self.queued_bytes += len(effect.text)
        self._metrics.replayed_frames.inc(len(replay))
        self._schedule()
        return list(answer[len(replay) :])

    async def _forward(self, live: LiveSession, answer: Sequence[Work]) -> None:
        outlet = live.outlet
        if outlet is not None:
            await outlet.perform(answer)
            return
        # Parked: its dispatches were kept when stamped; the rest still runs.
        for effect in answer:
            if not isinstance(effect, (Send, Close, Adopt)):
                await self._host.handle(live, effect)

    def let_go(self, code: int, reason: str) -> None:
        """The session was taken over by a RESUME elsewhere: keep a closed stand-in
        (so this connection's end releases nothing of the session) and close."""
        old = self.live.session
        stand_in = LiveSession(Session(old.session_id, old.config, old.connected_at))
        stand_in.session.close(code, reason)
        self.live = stand_in
        stand_in.attach(self)
        if self._close is None:  # already closing (a drain's 1001): that close stands
            self._decided(Close(code, reason))
            self.outbound.clear()
            self.queued_bytes = 0
        self._schedule()

    @property
    def handshaking(self) -> bool:
        """A handshake runs beside the reader (its frames are held until it is done)."""
        return self._held is not None

    async def _perform_handled(self, effect: Work) -> None:
        try:
            live = self.live
            answer = await self._host.handle(live, effect)
            if self.live is live:
                await self.perform(answer)
            else:  # taken over while the handler ran: as in perform
                await self._forward(live, answer)
            held = self._held
            while held:  # no await between the last check and the reset below
                await self._handle_frame(held.popleft())
        finally:
            self._held = None
            resume, self._resume = self._resume, None
            if resume is not None:
                resume.set()
        session = self.live.session
        if session.state is State.AWAITING_IDENTIFY and self._reader is not None:
            # INVALID_SESSION (13): IDENTIFY is due in time again; the reader has no deadline.
            self._aside(self._identify_timer, session)

    async def _identify_timer(self, session: Session) -> None:
        clock = self._clock
        while self.live.session is session and session.state is State.AWAITING_IDENTIFY:
            await anyio.sleep(max(0.0, session.identify_deadline - clock.monotonic()))
            await self.perform(session.check_timers(clock.monotonic()))

    def _aside(self, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        """Run ``fn`` beside the reader (a task of the flusher's), ended with the connection."""
        scope = anyio.CancelScope()
        if self._asides is None:
            self._asides = []
        self._asides.append(scope)
        self._flusher.spawn(self._run_aside, scope, fn, args)

    async def _run_aside(
        self, scope: anyio.CancelScope, fn: Callable[..., Awaitable[None]], args: tuple[object, ...]
    ) -> None:
        try:
            with scope:
                await fn(*args)
        except Exception as exc:  # ends the connection; its reader raises it (run)
            self._fail(exc)
        finally:
            asides = self._asides
            if asides is not None:
                asides.remove(scope)
                if not asides:
                    self._asides = None
                    if self._asides_done is not None:
                        self._asides_done.set()

    # --- inbound -------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until either side closes it: the reader is its one
        task at rest (the flusher writes, see :mod:`adapters.shell.outbound`)."""
        try:
            with anyio.CancelScope() as self._reader:
                if self.ended:  # gone (or failed) before the reader started
                    self._reader.cancel()
                try:
                    await self._read()
                except TransportClosed as closed:
                    if self._close is None:  # the client's close: record its code
                        self.close_code = 1006 if closed.code is None else closed.code
        finally:
            self._reader = None
            self.ended = True
            if self._sender_scope is not None:
                self._sender_scope.cancel()
            with anyio.CancelScope(shield=True):
                for scope in self._asides or ():
                    scope.cancel()
                while self._asides:
                    done = self._asides_done = anyio.Event()
                    await done.wait()
                await self._host.closed(self)
        if self._failure is not None:
            raise self._failure

    async def _read(self) -> None:
        clock = self._clock
        while (session := self.live.session).state is not State.CLOSED:
            raw: str | bytes | None = None
            if session.state is State.AWAITING_IDENTIFY:
                with anyio.move_on_after(max(0.0, session.identify_deadline - clock.monotonic())):
                    raw = await self._receive_one()
                if raw is None:
                    await self.perform(session.check_timers(clock.monotonic()))
                    continue
            else:
                raw = await self._receive_one()
                if raw is None:
                    continue
            held = self._held
            if held is None or (
                self.live.session.state is State.IDENTIFYING
                and isinstance(decode_command(raw), Heartbeat)
            ):
                await self._handle_frame(raw)  # PROTOCOL 15: ACKed at once while queued
                continue
            held.append(raw)
            if len(held) > session.config.rate_limit_count and self._held is not None:
                # Over the rate limit anyway: stop reading until the handshake is done
                # (the held frames then close the connection 4008, in order).
                resume = self._resume = anyio.Event()
                await resume.wait()
        # Closed by us: the sender finishes the close; read and discard until the end.
        receive = self.transport.receive
        while True:
            with contextlib.suppress(MessageTooBig):
                await receive()

    async def _handle_frame(self, raw: str | bytes) -> None:
        session = self.live.session
        hot = self._metrics.hot
        hot.bytes_in += len(raw)
        effects = session.receive(raw, self._clock.monotonic())
        hot.frames_in[session.last_op or "none"] += 1
        await self.perform(effects)

    async def _receive_one(self) -> str | bytes | None:
        try:
            return await self.transport.receive()
        except MessageTooBig:
            await self.perform(
                self.live.session.close(CloseCode.MESSAGE_TOO_BIG, "message too big")
            )
            return None
