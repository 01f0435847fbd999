"""The instance's flusher: one task writes the queued frames of every connection.

A connection at rest holds no task of its own beyond its reader: when frames are
queued for it (or it must close), it puts itself on the flusher's ready list, once.
The flusher wakes once for however many connections became ready, and for each one
hands its queued batch to the transport's non-blocking write
(:meth:`domain.ports.Transport.try_send_many`), one write per connection.

A write that could block (the peer stopped reading: the socket's buffer is over its
high-water mark) is never attempted by the flusher. That connection then gets a
sender task of its own, which awaits the write (and the close, with its deadline)
and ends once the queue is empty again; meanwhile its queue keeps its bounds
(slow consumer: close 4010). So one peer that does not read never holds up the
others' writes.

The flusher is also where a connection's short-lived tasks run (that sender, a
handshake beside the reader): every task belongs to the flusher, none per connection
at rest. Each enters a cancel scope of the connection's, which is how it is ended; on
asyncio it is a plain task the flusher keeps (anyio's ``start_soon`` costs about 20 us
since anyio 4.14 made a task handle, a cancel scope and an event for every task; a
plain task about 3 us), and when the flusher stops it cancels their scopes (so their
shielded clean-ups run, as anyio's cancellation would let them) and waits for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.abc import TaskStatus

from adapters.shell.live import LiveSession
from adapters.shell.metrics import Metrics
from domain.codec import CloseCode
from domain.effects import Close
from domain.ports import Transport, TransportClosed

#: At most this many frames in one write to the transport.
MAX_BATCH_FRAMES = MAX_BATCH = 256

log = logging.getLogger("gateway")


class Flushable(Protocol):
    def flush(self) -> None:
        """Write what is queued now, without awaiting (the flusher's turn)."""
        ...


class Flusher:
    """The instance's writer. On asyncio (what the gateway runs on) a round is a loop
    callback, not a task step: the rounds are the loop's callbacks at the very places
    where the task would have resumed (after the wake-up, after the checkpoint that
    lets the readers and the broker run before the next round), without an event, a
    future and a coroutine resumption per round. On another backend, the same rounds
    in a task (:meth:`_loop`)."""

    __slots__ = (
        "_call_soon",
        "_context",
        "_group",
        "_idle",
        "_loop",
        "_owned",
        "_pending",
        "_ready",
        "_wake",
        "rounds",
    )

    def __init__(self) -> None:
        self._ready: list[Flushable] = []
        self._wake: anyio.Event | None = None
        self._group: anyio.abc.TaskGroup | None = None
        #: Tasks asked for before the flusher runs (started as soon as it does).
        self._pending: list[tuple[Callable[..., Coroutine[Any, Any, None]], tuple[Any, ...]]] = []
        #: Wake-ups of the flusher so far (each one writes every ready connection).
        self.rounds = 0
        #: Rounds as loop callbacks: the loop's ``call_soon`` and the context they run in.
        self._call_soon: Callable[..., object] | None = None
        self._context: contextvars.Context | None = None
        #: Callback rounds only: nothing is scheduled, the next ``ready`` schedules one.
        self._idle = False
        #: On asyncio: the loop, and the plain tasks of :meth:`spawn` with their scopes.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._owned: dict[asyncio.Task[None], anyio.CancelScope] = {}

    @property
    def running(self) -> bool:
        return self._group is not None

    def waiting(self) -> list[Flushable]:
        """The connections on the ready list now (checks and tests)."""
        return list(self._ready)

    def ready(self, conn: Flushable) -> None:
        """``conn`` has frames to write or a close to start (the caller asks once)."""
        self._ready.append(conn)
        if self._idle:
            self._idle = False
            assert self._call_soon is not None
            self._call_soon(self._round, context=self._context)
            return
        wake = self._wake
        if wake is not None:
            self._wake = None
            wake.set()

    def spawn(
        self,
        fn: Callable[..., Coroutine[Any, Any, None]],
        scope: anyio.CancelScope,
        *args: Any,
    ) -> None:
        """Run ``fn(scope, *args)``, which enters ``scope`` and must not raise; it is
        ended by cancelling ``scope``."""
        if self._group is None:
            self._pending.append((fn, (scope, *args)))
        elif self._loop is not None:
            task = self._loop.create_task(fn(scope, *args))
            self._owned[task] = scope
            task.add_done_callback(self._done)
        else:
            self._group.start_soon(fn, scope, *args)

    def _done(self, task: asyncio.Task[None]) -> None:
        del self._owned[task]
        if not task.cancelled() and (exc := task.exception()) is not None:
            assert self._loop is not None
            self._loop.call_exception_handler(
                {"message": "a connection task raised", "exception": exc, "task": task}
            )

    async def _end_owned(self) -> None:
        """Stopping: end the plain tasks through their scopes, and wait for them."""
        with anyio.CancelScope(shield=True):
            while self._owned:
                for scope in list(self._owned.values()):
                    scope.cancel()
                await asyncio.wait(list(self._owned))

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as group:
            self._group = group
            pending, self._pending = self._pending, []
            for fn, args in pending:
                group.start_soon(fn, *args)
            task_status.started()
            # asyncio's token is its loop: rounds as callbacks (else the task loop).
            token = anyio.lowlevel.current_token().native_token
            call_soon = getattr(token, "call_soon", None)
            try:
                if call_soon is None:
                    await self._task_loop()
                else:
                    self._call_soon = call_soon
                    self._context = contextvars.copy_context()
                    if isinstance(token, asyncio.AbstractEventLoop):
                        self._loop = token
                    self._round()  # the first pass, as the task loop's
                    await anyio.sleep_forever()
            finally:
                try:
                    await self._end_owned()
                finally:
                    self._loop = None
                    self._group = None
                    self._idle = False
                    self._call_soon = self._context = None

    def _round(self) -> None:
        """One pass: write every ready connection, then pass again once the loop ran
        what is ready now (the checkpoint); with nothing ready, go idle."""
        if self._group is None:  # stopped (a callback scheduled before the end)
            return
        ready = self._ready
        if not ready:
            self._idle = True
            return
        try:
            self._write(ready)
        finally:  # after the writes, as the task's checkpoint; and never a lost pass
            assert self._call_soon is not None
            self._call_soon(self._round, context=self._context)

    def _write(self, ready: list[Flushable]) -> None:
        self._ready = []
        self.rounds += 1
        for conn in ready:
            try:
                conn.flush()
            except Exception:  # backstop: a bug in one must not stop the others
                log.exception("flush failed")

    async def _task_loop(self) -> None:
        # The backend looked up once: anyio.Event() and anyio.lowlevel.checkpoint() look
        # it up on every call, and this loop makes one of each per round.
        backend = anyio.lowlevel.current_token().backend_class
        new_event, checkpoint = backend.create_event, backend.checkpoint
        while True:
            ready = self._ready
            if not ready:
                wake = self._wake = new_event()
                await wake.wait()
                continue
            self._write(ready)
            # Let the loop run the readers and the broker before the next round.
            await checkpoint()


@dataclass(frozen=True, slots=True)
class SocketLimits:
    outbound_max_frames: int
    outbound_max_bytes: int
    #: Seconds a close handshake may take before the socket is abandoned.
    close_timeout: float


class Outbound:
    """The writing half of a connection: its bounded queue, its turn in the flusher,
    the sender task it gets only while a write would block or it closes, and the
    close with its deadline (PROTOCOL section 6). :class:`~adapters.shell.connection.
    Connection` is the rest (the reader and the interpreter)."""

    __slots__ = (
        "_close",
        "_close_deadline",
        "_failure",
        "_flusher",
        "_limits",
        "_max_bytes",
        "_max_frames",
        "_metrics",
        "_reader",
        "_ready",
        "_send_scope",
        "_sender_scope",
        "close_code",
        "closing",
        "ended",
        "outbound",
        "queued_bytes",
        "transport",
    )

    live: LiveSession

    def __init__(
        self, transport: Transport, limits: SocketLimits, metrics: Metrics, flusher: Flusher
    ) -> None:
        self.transport = transport
        self._limits = limits
        # The bounds, read on every delivery: plain slots.
        self._max_frames = limits.outbound_max_frames
        self._max_bytes = limits.outbound_max_bytes
        self._metrics = metrics
        self._flusher = flusher
        #: A list, not a deque: an empty one is small, and batches are slices.
        self.outbound: list[str] = []
        self.queued_bytes = 0
        self.close_code: int | None = None
        self._close: Close | None = None
        #: anyio time by which the transport must be gone once ``_close`` is set.
        self._close_deadline = 0.0
        #: Set once the gateway decided to close (read on every delivery: a plain slot).
        self.closing = False
        #: On the flusher's ready list (asked once until it flushes).
        self._ready = False
        #: While a sender task owns the queue: its scope, and the scope of its pump.
        self._sender_scope: anyio.CancelScope | None = None
        self._send_scope: anyio.CancelScope | None = None
        #: While the reader runs: its scope (cancelled to end the connection).
        self._reader: anyio.CancelScope | None = None
        #: Set once the connection ended (nothing more is written or started).
        self.ended = False
        self._failure: BaseException | None = None

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
        self._end_reader()

    def _end_reader(self) -> None:
        self.ended = True  # nothing more is written from now on
        if self._reader is not None:
            self._reader.cancel()

    # --- outbound -----------------------------------------------------------------

    def enqueue(self, text: str) -> None:
        if self._close is not None:
            return
        outbound = self.outbound
        outbound.append(text)
        self.queued_bytes += len(text)
        if len(outbound) > self._max_frames or self.queued_bytes > self._max_bytes:
            self._metrics.slow_consumers.inc()
            self.abort(CloseCode.SLOW_CONSUMER, "slow consumer")
            return
        if not self._ready:
            self._ready = True
            self._flusher.ready(self)

    def _schedule(self) -> None:
        if not self._ready:
            self._ready = True
            self._flusher.ready(self)

    def request_close(self, code: int, reason: str) -> None:
        """Close after the frames already queued have been sent."""
        if self._close is None:
            self.live.session.close(code, reason)
            self._decided(Close(code, reason))
            self._schedule()

    def abort(self, code: int, reason: str) -> None:
        """Close now, dropping whatever is queued (slow consumer)."""
        if self._close is None:
            self.live.session.close(code, reason)
            self._decided(Close(code, reason))
        self.outbound.clear()
        self.queued_bytes = 0
        if self._send_scope is not None:
            self._send_scope.cancel()
        self._schedule()

    def _closed_by_session(self, close: Close) -> None:
        # The session already moved to CLOSED; remember why and start the close.
        if self._close is None:
            self._decided(close)
            if close.code == CloseCode.RATE_LIMITED:
                self._metrics.rate_limited.inc()
            self._schedule()

    @property
    def close_side(self) -> str:
        """Who started the close: ``server`` once the gateway decided, else ``client``."""
        return "server" if self._close is not None else "client"

    @property
    def scheduled(self) -> bool:
        """Put on the flusher's ready list and not flushed since."""
        return self._ready

    @property
    def sending(self) -> bool:
        """A sender task of this connection's own runs (a blocked write, or the close)."""
        return self._sender_scope is not None

    def _decided(self, close: Close) -> None:
        """The gateway decided to close: start the close deadline."""
        self._close = close
        self.closing = True
        self.close_code = close.code
        self._close_deadline = anyio.current_time() + self._limits.close_timeout
        if self._send_scope is not None:
            self._send_scope.deadline = self._close_deadline

    def flush(self) -> None:
        """The flusher's turn: write the queue now where that cannot block; else (or
        to close) hand it to a sender task of the connection's own."""
        self._ready = False
        if self.ended or self._sender_scope is not None:
            return  # gone, or the sender owns the queue (it ends once it is empty)
        outbound = self.outbound
        try_send = self.transport.try_send_many
        hot = self._metrics.hot
        try:
            while outbound:
                batch = outbound if len(outbound) <= MAX_BATCH_FRAMES else outbound[:MAX_BATCH]
                if not try_send(batch):
                    break
                size = sum(map(len, batch))
                hot.frames_out += len(batch)
                del outbound[: len(batch)]
                self.queued_bytes -= size
                hot.bytes_out += size
        except (TransportClosed, OSError):
            self._end_reader()  # the peer is gone: nothing more to send or close
            return
        except Exception as exc:  # a bug: it ends this connection (its reader raises it)
            self._fail(exc)
            return
        if outbound or self._close is not None:
            self._sender_scope = anyio.CancelScope()
            self._flusher.spawn(self._sender, self._sender_scope)

    async def _sender(self, outer: anyio.CancelScope) -> None:
        try:
            with outer:
                await self._send_and_close()
        except Exception as exc:
            self._fail(exc)
        finally:
            self._sender_scope = None
            if self.outbound and not self.ended:
                self._schedule()

    async def _send_and_close(self) -> None:
        with anyio.CancelScope() as self._send_scope:
            if self._close is not None:
                self._send_scope.deadline = self._close_deadline
            try:
                await self._pump()
            except (TransportClosed, OSError):
                # The peer is gone: nothing more to send or close.
                self._end_reader()
                return
        self._send_scope = None
        close = self._close
        if close is None:
            return  # the queue is empty: back to rest, no task
        with anyio.CancelScope(deadline=self._close_deadline):
            with contextlib.suppress(TransportClosed, OSError, RuntimeError):
                await self.transport.close(close.code, close.reason)
            # The reader ends the connection when the peer answers the close.
            await anyio.sleep_forever()
        # The deadline passed: the peer did not answer, or could not be written to.
        self.transport.abort()
        self._end_reader()

    async def _pump(self) -> None:
        hot = self._metrics.hot
        send_many = self.transport.send_many
        while self.outbound:
            # Everything queued goes out in one write (bounded, so that a batch in
            # flight never holds more than MAX_BATCH_FRAMES beside the queue).
            outbound = self.outbound
            if len(outbound) <= MAX_BATCH_FRAMES:
                batch, self.outbound = outbound, []
            else:
                batch = outbound[:MAX_BATCH_FRAMES]
                del outbound[:MAX_BATCH_FRAMES]
            size = sum(map(len, batch))
            self.queued_bytes -= size
            await send_many(batch)
            hot.frames_out += len(batch)
            hot.bytes_out += size
