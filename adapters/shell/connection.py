"""One client connection: a reader that feeds the session, and a sender task that
drains a bounded outbound queue.

Fan-out never awaits a socket: it stamps the connection's next ``s`` into a frame
encoded once per event and appends it to the queue (:meth:`Connection.deliver`). A
queue over its frame or byte bound means a slow consumer: the queue is dropped and
the connection is closed with 4010, without ever stalling the broadcast.

Every close has a deadline (PROTOCOL section 6): from the moment the gateway decides
to close, the frames still queued, the close frame and the peer's answer must all
fit in ``close_timeout``; when it passes the transport is aborted, whatever the peer
does. Meanwhile the reader keeps reading and discarding, so a peer that keeps
sending cannot wedge the server's read side, and the peer's own close ends it early.
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import TYPE_CHECKING

import anyio

from domain.codec import CloseCode, DispatchTemplate
from domain.model import Server, User, UserId
from domain.ports import MessageTooBig, Transport, TransportClosed
from domain.session import (
    Authenticate,
    Close,
    Effect,
    Send,
    Session,
    SetPresence,
    StartTyping,
    State,
    Subscribe,
    Unsubscribe,
)

if TYPE_CHECKING:
    from adapters.shell.gateway import Gateway


class Connection:
    __slots__ = (
        "_close",
        "_close_deadline",
        "_group",
        "_send_scope",
        "_wake",
        "close_code",
        "gateway",
        "opened_at",
        "outbound",
        "presence_open",
        "queued_bytes",
        "servers",
        "session",
        "transport",
        "user",
        "user_routed",
    )

    def __init__(self, gateway: Gateway, transport: Transport, session: Session) -> None:
        self.gateway = gateway
        self.transport = transport
        self.session = session
        self.opened_at = session.connected_at
        self.user: User | None = None
        #: The servers the user was a member of at READY (for presence broadcasts).
        self.servers: tuple[Server, ...] = ()
        #: Set once the shell routed ``ws:user:{id}`` here / opened a presence session.
        self.user_routed = False
        self.presence_open = False
        self.outbound: deque[str] = deque()
        self.queued_bytes = 0
        self.close_code: int | None = None
        self._close: Close | None = None
        #: anyio time by which the transport must be gone once ``_close`` is set.
        self._close_deadline = 0.0
        self._wake = gateway.new_event()
        self._send_scope: anyio.CancelScope | None = None
        self._group: anyio.abc.TaskGroup | None = None

    @property
    def user_id(self) -> UserId | None:
        return self.session.user_id

    @property
    def closing(self) -> bool:
        return self._close is not None

    @property
    def close_side(self) -> str:
        """Who started the close: ``server`` once the gateway decided, else ``client``."""
        return "server" if self._close is not None else "client"

    # --- outbound -----------------------------------------------------------------

    def deliver(self, template: DispatchTemplate) -> None:
        """Queue a dispatch for this connection (READY sessions only)."""
        if self.session.state is State.READY and self._close is None:
            self.enqueue(self.session.stamp(template))
            self.gateway.metrics.hot.deliveries += 1

    def enqueue(self, text: str) -> None:
        if self._close is not None:
            return
        settings = self.gateway.settings
        self.outbound.append(text)
        self.queued_bytes += len(text)
        if (
            len(self.outbound) > settings.outbound_max_frames
            or self.queued_bytes > settings.outbound_max_bytes
        ):
            self.gateway.metrics.slow_consumers.inc()
            self.abort(CloseCode.SLOW_CONSUMER, "slow consumer")
            return
        self._wake.set()

    def request_close(self, code: int, reason: str) -> None:
        """Close after the frames already queued have been sent."""
        if self._close is None:
            self.session.close(code, reason)
            self._decided(Close(code, reason))
            self._wake.set()

    def abort(self, code: int, reason: str) -> None:
        """Close now, dropping whatever is queued (slow consumer)."""
        if self._close is None:
            self.session.close(code, reason)
            self._decided(Close(code, reason))
        self.outbound.clear()
        self.queued_bytes = 0
        if self._send_scope is not None:
            self._send_scope.cancel()
        self._wake.set()

    def _decided(self, close: Close) -> None:
        """The gateway decided to close: start the close deadline."""
        self._close = close
        self.close_code = close.code
        self._close_deadline = anyio.current_time() + self.gateway.settings.close_timeout
        if self._send_scope is not None:
            self._send_scope.deadline = self._close_deadline

    async def _sender(self) -> None:
        with anyio.CancelScope() as self._send_scope:
            if self._close is not None:
                self._send_scope.deadline = self._close_deadline
            try:
                await self._pump()
            except (TransportClosed, OSError):
                # The peer is gone: nothing more to send or close.
                if self._group is not None:
                    self._group.cancel_scope.cancel()
                return
        close = self._close
        if close is not None:
            with anyio.CancelScope(deadline=self._close_deadline):
                with contextlib.suppress(TransportClosed, OSError, RuntimeError):
                    await self.transport.close(close.code, close.reason)
                # The reader ends the connection when the peer answers the close.
                await anyio.sleep_forever()
            # The deadline passed: the peer did not answer, or could not be written to.
            self.transport.abort()
        if self._group is not None:
            self._group.cancel_scope.cancel()

    async def _pump(self) -> None:
        outbound = self.outbound
        hot = self.gateway.metrics.hot
        send = self.transport.send
        while True:
            while outbound:
                text = outbound.popleft()
                self.queued_bytes -= len(text)
                await send(text)
                hot.frames_out += 1
                hot.bytes_out += len(text)
            if self._close is not None:
                return
            self._wake = self.gateway.new_event()
            await self._wake.wait()

    # --- inbound ------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until either side closes it."""
        try:
            async with anyio.create_task_group() as group:
                self._group = group
                group.start_soon(self._sender)
                try:
                    await self._read()
                except TransportClosed as closed:
                    if self._close is None:  # the client's close: record its code
                        self.close_code = 1006 if closed.code is None else closed.code
                    group.cancel_scope.cancel()
        finally:
            self._group = None
            with anyio.CancelScope(shield=True):
                await self.gateway.teardown(self)

    async def _read(self) -> None:
        session = self.session
        clock = self.gateway.clock
        hot = self.gateway.metrics.hot
        while session.state is not State.CLOSED:
            if session.state is State.AWAITING_IDENTIFY:
                raw: str | bytes | None = None
                with anyio.move_on_after(max(0.0, session.identify_deadline - clock.monotonic())):
                    raw = await self._receive_one()
                if raw is None:
                    await self.apply(session.check_timers(clock.monotonic()))
                    continue
            else:
                raw = await self._receive_one()
                if raw is None:
                    continue
            hot.bytes_in += len(raw)
            effects = session.receive(raw, clock.monotonic())
            hot.frames_in[session.last_op or "none"] += 1
            await self.apply(effects)
        # Closed by us: the sender finishes the close handshake. Keep reading (and
        # discarding) until the peer's close or the end of the transport.
        receive = self.transport.receive
        while True:
            with contextlib.suppress(MessageTooBig):
                await receive()

    async def _receive_one(self) -> str | bytes | None:
        try:
            raw = await self.transport.receive()
        except MessageTooBig:
            await self.apply(self.session.close(CloseCode.MESSAGE_TOO_BIG, "message too big"))
            return None
        return raw

    # --- effects ------------------------------------------------------------------

    def enqueue_effects(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Send):
                self.enqueue(effect.text)
            elif isinstance(effect, Close):
                self.request_close(effect.code, effect.reason)

    async def apply(self, effects: list[Effect]) -> None:
        gateway = self.gateway
        for effect in effects:
            if isinstance(effect, Send):
                self.enqueue(effect.text)
                if effect.error is not None:
                    gateway.metrics.errors.labels(effect.error).inc()
            elif isinstance(effect, Close):
                self._close_from_session(effect)
            elif isinstance(effect, Authenticate):
                await gateway.authenticate(self, effect.token)
            elif isinstance(effect, Subscribe):
                await gateway.subscribe(self, effect.server_id)
            elif isinstance(effect, Unsubscribe):
                await gateway.unroute(self, effect.server_id)
            elif isinstance(effect, StartTyping):
                await gateway.start_typing(self, effect.channel_id)
            elif isinstance(effect, SetPresence):
                await gateway.set_presence(self, effect.status)

    def _close_from_session(self, close: Close) -> None:
        # The session already moved to CLOSED; remember why and wake the sender.
        if self._close is None:
            self._decided(close)
            if close.code == CloseCode.RATE_LIMITED:
                self.gateway.metrics.rate_limited.inc()
            self._wake.set()
