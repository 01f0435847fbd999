"""The gateway client: one supervisor task that keeps a session alive across
connections, and an async iterator of everything it observes.

Theory of operation. :func:`connect` starts the supervisor in a task group owned by
the ``async with`` block. The supervisor loops: open a WebSocket to the next URL, read
HELLO, start heartbeats (the first after a random fraction of the interval, then every
interval), send RESUME when it holds a resumable session (else IDENTIFY), and read
frames until the connection ends; then wait a full-jitter backoff delay and go again.

* Heartbeats: a heartbeat that is due while the previous one has no HEARTBEAT_ACK
  means the connection is a zombie: it is closed with 4900 and resumed elsewhere.
* RESUME: PROTOCOL section 13. RESUMED continues the session (the dispatches replayed
  before it keep their original ``s``). INVALID_SESSION, or an ERROR whose ``op`` is
  RESUME (a gateway without resume), means "cannot resume": the client IDENTIFYs on the
  same connection and then restores what it holds (subscriptions, presence interest,
  status).
* ``s`` is checked on every dispatch: anything but the previous ``s + 1`` is a
  :class:`ProtocolFault`; the connection is dropped and resumed from the last good ``s``.
* RECONNECT: the server is draining; the client waits for the close (bounded) and
  reconnects, to the next URL when several are given.
* 4004 (bad token) and 4014 (session taken over) stop the client: the iterator raises
  :class:`AuthenticationFailed` / :class:`SessionTakenOver`.

Events are buffered (``max_buffered_events``); when the consumer falls that far behind
the reader stops reading (backpressure, as for any TCP client), and heartbeat ACKs not
read meanwhile are not taken for a zombie.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from entrypoints.client.events import (
    CLIENT_RECONNECT_CLOSE,
    FATAL_CLOSE_CODES,
    SESSION_ENDING_CLOSE_CODES,
    AuthenticationFailed,
    ClientClosed,
    ClientEvent,
    Connected,
    Disconnected,
    Dispatch,
    GatewayUnavailable,
    NotConnected,
    ProtocolFault,
    ServerError,
    SessionLost,
    SessionTakenOver,
)
from entrypoints.client.transport import HandshakeError, WebSocketClosed, WebSocketConnection

Status = Literal["online", "idle", "dnd", "invisible"]
STATUSES: frozenset[str] = frozenset({"online", "idle", "dnd", "invisible"})
#: A token, or an async callable that returns one (called before every IDENTIFY and
#: RESUME, so a short-lived token is fresh on every reconnect).
TokenSource = str | Callable[[], Awaitable[str]]

CONTROL_OPS = frozenset({"HELLO", "HEARTBEAT_ACK", "ERROR", "RECONNECT", "INVALID_SESSION"})
#: ERROR codes answering SUBSCRIBE_SERVER that mean "this subscription will never work".
_REFUSED_SUBSCRIBE = frozenset({"FORBIDDEN", "NOT_FOUND", "TOO_MANY_SUBSCRIPTIONS"})


@dataclass(frozen=True, slots=True)
class Backoff:
    """Full-jitter exponential backoff: attempt ``n`` (from 0) waits a uniformly random
    time in ``[0, min(cap, base * 2**n)]`` (AWS Architecture Blog, "Exponential Backoff
    And Jitter")."""

    base: float = 0.5
    cap: float = 30.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        ceiling = min(self.cap, self.base * math.pow(2.0, min(attempt, 64)))
        return rng.uniform(0.0, ceiling)


class _Drop(Exception):
    """Internal: the client drops the current connection (code, reason)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass
class _Link:
    """State of one connection (the session outlives it)."""

    url: str
    conn: WebSocketConnection
    scope: anyio.CancelScope
    awaiting_ack: bool = False
    #: IDENTIFY or RESUME sent, READY or RESUMED not yet: no zombie check then. This
    #: gateway ACKs at once while queued (PROTOCOL 15); an older one held the ACKs.
    handshaking: bool = False
    ready: bool = False
    resuming: bool = False
    reconnect_requested: bool = False
    #: SUBSCRIBE_SERVER ids sent and not yet answered, in order (answers come in order).
    pending_subscribes: deque[str] = field(default_factory=deque)
    drop: _Drop | None = None


class GatewayClient:
    """A resilient connection to the gateway. Use :func:`connect` to run one.

    Iterate it (``async for event in client``) for :data:`ClientEvent` values. The
    helpers (:meth:`subscribe`, :meth:`typing_start`, ...) send client ops; what a
    session holds (subscriptions, presence interest, status) is remembered and restored
    after a fresh IDENTIFY.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        token: TokenSource,
        *,
        subscribe: Iterable[str] = (),
        backoff: Backoff | None = None,
        max_attempts: int | None = None,
        open_timeout: float = 10.0,
        close_timeout: float = 2.0,
        hello_timeout: float = 10.0,
        reconnect_close_timeout: float = 5.0,
        max_buffered_events: int = 10_000,
        max_message_bytes: int = 16 << 20,
        rng: random.Random | None = None,
    ) -> None:
        urls = (url,) if isinstance(url, str) else tuple(url)
        if not urls:
            raise ValueError("at least one gateway URL is needed")
        self.urls: tuple[str, ...] = urls
        self._token = token
        self._backoff = backoff or Backoff()
        self._max_attempts = max_attempts
        self._open_timeout = open_timeout
        self._close_timeout = close_timeout
        self._hello_timeout = hello_timeout
        self._reconnect_close_timeout = reconnect_close_timeout
        self._max_message_bytes = max_message_bytes
        self._rng = rng or random.Random()
        # What the session holds, restored after a fresh IDENTIFY.
        self._subscriptions: dict[str, None] = dict.fromkeys(subscribe)
        self._presence_interest: dict[str, tuple[str, ...]] = {}
        self._status: Status | None = None
        # The session.
        self.session_id: str | None = None
        self.seq = 0
        self._resumable = False
        self.user: dict[str, Any] | None = None
        self.servers: list[dict[str, Any]] = []
        # Plumbing.
        self._link: _Link | None = None
        self._events_in: MemoryObjectSendStream[ClientEvent]
        self._events_out: MemoryObjectReceiveStream[ClientEvent]
        self._events_in, self._events_out = anyio.create_memory_object_stream[ClientEvent](
            max_buffered_events
        )
        self._stalled = False
        self._closing = False
        self._failure: BaseException | None = None
        self._scope: anyio.CancelScope | None = None
        self._stopped = anyio.Event()
        self._ready_event = anyio.Event()

    # --- public state --------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a connection is READY (or RESUMED)."""
        return self._link is not None and self._link.ready

    @property
    def subscriptions(self) -> frozenset[str]:
        """Servers this client subscribes to (and resubscribes after a fresh IDENTIFY)."""
        return frozenset(self._subscriptions)

    @property
    def failure(self) -> BaseException | None:
        """Why the client stopped, if it stopped on an error."""
        return self._failure

    async def wait_connected(self) -> None:
        """Until a connection is READY; raises the client's failure if it stopped."""
        while not self.connected:
            if self._stopped.is_set():
                raise self._failure or ClientClosed("the client is closed")
            await self._ready_event.wait()  # set on READY and on stop

    # --- client ops -----------------------------------------------------------------

    async def subscribe(self, server_id: str) -> None:
        """SUBSCRIBE_SERVER. Answered by a SUBSCRIBED dispatch (or a ServerError)."""
        self._subscriptions[server_id] = None
        await self._send_if_ready("SUBSCRIBE_SERVER", {"serverId": server_id})

    async def unsubscribe(self, server_id: str) -> None:
        """UNSUBSCRIBE_SERVER (also ends the presence interest for that server)."""
        self._subscriptions.pop(server_id, None)
        self._presence_interest.pop(server_id, None)
        await self._send_if_ready("UNSUBSCRIBE_SERVER", {"serverId": server_id})

    async def typing_start(self, channel_id: str) -> None:
        """TYPING_START; raises :class:`NotConnected` when no connection is READY."""
        await self._send_now("TYPING_START", {"channelId": channel_id})

    async def set_status(self, status: Status) -> None:
        """PRESENCE_UPDATE; the status is set again after a fresh IDENTIFY."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {sorted(STATUSES)}, got {status!r}")
        self._status = status
        await self._send_if_ready("PRESENCE_UPDATE", {"status": status})

    async def subscribe_presence(self, server_id: str, user_ids: Sequence[str]) -> None:
        """SUBSCRIBE_PRESENCE (PROTOCOL 14): replaces the presence interest for a
        server (an empty list ends it). Answered by PRESENCE_SNAPSHOT."""
        ids = tuple(user_ids)
        if len(ids) > 100:
            raise ValueError("at most 100 user ids")
        if ids:
            self._presence_interest[server_id] = ids
        else:
            self._presence_interest.pop(server_id, None)
        await self._send_if_ready(
            "SUBSCRIBE_PRESENCE", {"serverId": server_id, "userIds": list(ids)}
        )

    async def aclose(self) -> None:
        """Close with 1000 (the session ends) and stop; the iterator then ends."""
        self._closing = True
        link = self._link
        if link is not None:
            link.drop = link.drop or _Drop(1000, "client closing")
        if self._scope is not None:
            self._scope.cancel()
        await self._stopped.wait()

    # --- the iterator ---------------------------------------------------------------

    def __aiter__(self) -> GatewayClient:
        return self

    async def __anext__(self) -> ClientEvent:
        try:
            return await self._events_out.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            if self._failure is not None:
                raise self._failure from None
            raise StopAsyncIteration from None

    # --- the supervisor ---------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep a session alive until :meth:`aclose` or a fatal close code."""
        if self._scope is not None or self._stopped.is_set():
            raise RuntimeError("a GatewayClient runs once")
        attempt = 0
        index = 0
        try:
            with anyio.CancelScope() as self._scope:
                task_status.started()
                while not self._closing:
                    url = self.urls[index % len(self.urls)]
                    code, reason, was_ready = await self._connect_once(url)
                    if self._failure is not None or self._closing:
                        await self._emit(Disconnected(code, reason, None))
                        break
                    attempt = 0 if was_ready else attempt + 1
                    if self._max_attempts is not None and attempt >= self._max_attempts:
                        self._failure = GatewayUnavailable(
                            f"{attempt} connection attempts failed; last: {reason}"
                        )
                        await self._emit(Disconnected(code, reason, None))
                        break
                    index += 1
                    delay = self._backoff.delay(attempt, self._rng)
                    await self._emit(Disconnected(code, reason, delay))
                    await anyio.sleep(delay)
        finally:
            self._events_in.close()
            self._stopped.set()
            self._ready_event.set()

    async def _connect_once(self, url: str) -> tuple[int | None, str, bool]:
        """One connection, start to end: (close code, reason, whether it got READY)."""
        try:
            conn = await WebSocketConnection.open(
                url, timeout=self._open_timeout, max_message_bytes=self._max_message_bytes
            )
        except (OSError, TimeoutError, ValueError) as exc:
            if isinstance(exc, ValueError) and not isinstance(exc, HandshakeError):
                self._failure = exc  # a malformed URL will not get better
            return None, f"cannot connect to {url}: {exc}", False
        link: _Link | None = None
        closed: WebSocketClosed | None = None
        try:
            with anyio.CancelScope() as scope:
                link = _Link(url, conn, scope)
                self._link = link
                async with anyio.create_task_group() as group:
                    try:
                        await self._session(link, group)
                    except WebSocketClosed as exc:
                        closed = exc
                    except _Drop as drop:
                        link.drop = link.drop or drop
                    finally:
                        group.cancel_scope.cancel()
            if link is not None and link.reconnect_requested and not (closed or link.drop):
                link.drop = _Drop(CLIENT_RECONNECT_CLOSE, "RECONNECT not followed by a close")
        finally:
            self._link = None
            self._ready_event = anyio.Event()
            if link is not None and link.drop is not None and closed is None:
                if link.drop.code == 1000:
                    self._resumable = False
                await conn.close(link.drop.code, link.drop.reason, timeout=self._close_timeout)
            else:
                await conn.abort()
        assert link is not None
        was_ready = link.ready
        if closed is not None:
            code, reason = closed.code, closed.reason
        elif link.drop is not None:
            code, reason = link.drop.code, link.drop.reason
        else:  # pragma: no cover - the session loop only ends by closing or dropping
            code, reason = None, "connection ended"
        if code in FATAL_CLOSE_CODES:
            message = f"the gateway closed with {code}: {reason or 'no reason'}"
            self._failure = (
                AuthenticationFailed(message) if code == 4004 else SessionTakenOver(message)
            )
        if code in SESSION_ENDING_CLOSE_CODES:
            self._resumable = False
        return code, reason or "connection lost", was_ready

    async def _session(self, link: _Link, group: anyio.abc.TaskGroup) -> None:
        with anyio.move_on_after(self._hello_timeout) as waiting:
            hello = await self._receive(link)
        if waiting.cancelled_caught:
            raise _Drop(CLIENT_RECONNECT_CLOSE, "no HELLO from the gateway")
        d = hello.get("d")
        interval = d.get("heartbeatInterval") if isinstance(d, dict) else None
        if (
            hello.get("op") != "HELLO"
            or not isinstance(interval, int | float)
            or isinstance(interval, bool)
            or interval <= 0
        ):
            await self._fault(f"expected HELLO with a positive heartbeatInterval, got {hello!r}")
        assert isinstance(interval, int | float)
        group.start_soon(self._heartbeats, link, interval / 1000.0)
        await self._authenticate(link, resume=self._resumable and self.session_id is not None)
        while True:
            await self._handle(link, await self._receive(link))

    async def _receive(self, link: _Link) -> dict[str, Any]:
        raw = await link.conn.receive()
        if not isinstance(raw, str):
            await self._fault("binary frame from the gateway")
        try:
            frame = json.loads(raw)
        except (ValueError, RecursionError):
            await self._fault(f"frame is not JSON: {raw[:200]!r}")
        if not isinstance(frame, dict) or not isinstance(frame.get("op"), str):
            await self._fault(f"frame is not an object with a string op: {raw[:200]!r}")
        return frame

    async def _fault(self, message: str) -> NoReturn:
        await self._emit(ProtocolFault(message))
        raise _Drop(CLIENT_RECONNECT_CLOSE, f"protocol fault: {message[:80]}")

    async def _heartbeats(self, link: _Link, interval: float) -> None:
        await anyio.sleep(interval * self._rng.random())  # jitter: no herd after a drain
        while True:
            if link.awaiting_ack and not self._stalled and not link.handshaking:
                link.drop = _Drop(CLIENT_RECONNECT_CLOSE, "no HEARTBEAT_ACK: zombie connection")
                link.scope.cancel()
                return
            link.awaiting_ack = True
            try:
                await link.conn.send('{"op":"HEARTBEAT","d":null}')
            except WebSocketClosed:
                return  # the reader reports it
            await anyio.sleep(interval)

    async def _token_value(self) -> str:
        if isinstance(self._token, str):
            return self._token
        try:
            token = await self._token()
        except (AuthenticationFailed, ClientClosed) as exc:
            self._failure = exc
            raise _Drop(1000, f"token provider: {exc}") from exc
        except Exception as exc:
            raise _Drop(CLIENT_RECONNECT_CLOSE, f"token provider failed: {exc!r}") from exc
        if not isinstance(token, str):
            raise TypeError("the token provider must return a str")
        return token

    async def _authenticate(self, link: _Link, *, resume: bool) -> None:
        token = await self._token_value()
        link.handshaking = True
        if resume:
            assert self.session_id is not None
            link.resuming = True
            await self._send(
                link, "RESUME", {"token": token, "sessionId": self.session_id, "seq": self.seq}
            )
        else:
            link.resuming = False
            self.seq = 0
            await self._send(link, "IDENTIFY", {"token": token})

    async def _session_lost(self, link: _Link, reason: str) -> None:
        self.session_id = None
        self._resumable = False
        await self._emit(SessionLost(reason))
        await self._authenticate(link, resume=False)

    async def _handle(self, link: _Link, frame: dict[str, Any]) -> None:
        op: str = frame["op"]
        d = frame.get("d")
        s = frame.get("s")
        if op in CONTROL_OPS:
            if op == "HEARTBEAT_ACK":
                link.awaiting_ack = False
            elif op == "ERROR":
                await self._on_error(link, d)
            elif op == "RECONNECT":  # the close (1001) follows; bounded wait for it
                link.reconnect_requested = True
                link.scope.deadline = min(
                    link.scope.deadline, anyio.current_time() + self._reconnect_close_timeout
                )
            elif op == "INVALID_SESSION":
                await self._session_lost(link, "INVALID_SESSION: the session cannot be resumed")
            else:
                await self._fault(f"unexpected {op} after HELLO")
            return
        if not isinstance(s, int) or isinstance(s, bool):
            await self._fault(f"dispatch {op} without an integer s")
        assert isinstance(s, int)
        if s != self.seq + 1:
            await self._fault(f"sequence gap: {op} has s={s} after s={self.seq}")
        self.seq = s
        await self._on_dispatch(link, op, d)
        await self._emit(Dispatch(op, d, s))
        if op == "READY" and isinstance(d, dict):
            await self._emit(
                Connected(
                    session_id=self.session_id or "",
                    resumed=False,
                    url=link.url,
                    user=self.user,
                    servers=self.servers,
                )
            )
        elif op == "RESUMED" and isinstance(d, dict):
            replayed = d.get("replayed")
            await self._emit(
                Connected(
                    session_id=self.session_id or "",
                    resumed=True,
                    url=link.url,
                    replayed=replayed if isinstance(replayed, int) else 0,
                    user=self.user,
                    servers=self.servers,
                )
            )

    async def _on_error(self, link: _Link, d: Any) -> None:
        if not isinstance(d, dict):
            await self._fault(f"ERROR without an object d: {d!r}")
        code, message, op = d.get("code"), d.get("message"), d.get("op")
        if op == "RESUME" and link.resuming and not link.ready:
            # A gateway without RESUME answers UNKNOWN_OP: the same as INVALID_SESSION.
            await self._session_lost(link, f"the gateway cannot resume ({code}: {message})")
            return
        if op == "SUBSCRIBE_SERVER" and link.pending_subscribes:
            refused = link.pending_subscribes.popleft()
            if code in _REFUSED_SUBSCRIBE:
                self._subscriptions.pop(refused, None)
                self._presence_interest.pop(refused, None)
        text = str(message) if message is not None else ""
        await self._emit(ServerError(str(code), text, op if isinstance(op, str) else None))

    async def _on_dispatch(self, link: _Link, op: str, d: Any) -> None:
        if op == "READY":
            if not isinstance(d, dict) or not isinstance(d.get("sessionId"), str):
                await self._fault(f"READY without a sessionId: {d!r}")
            self.session_id = d["sessionId"]
            self._resumable = True
            user = d.get("user")
            self.user = user if isinstance(user, dict) else None
            servers = d.get("servers")
            listed = servers if isinstance(servers, list) else []
            self.servers = [x for x in listed if isinstance(x, dict)]
            link.ready = True
            link.resuming = False
            link.handshaking = False
            self._ready_event.set()
            await self._restore(link)
        elif op == "RESUMED":
            if isinstance(d, dict) and isinstance(d.get("sessionId"), str):
                self.session_id = d["sessionId"]
            link.ready = True
            link.resuming = False
            link.handshaking = False
            self._ready_event.set()
        elif op == "SUBSCRIBED" and isinstance(d, dict):
            server_id = d.get("serverId")
            if isinstance(server_id, str) and server_id in link.pending_subscribes:
                link.pending_subscribes.remove(server_id)
        elif op == "UNSUBSCRIBED" and isinstance(d, dict):
            # Also sent when the user was removed from the server: do not resubscribe.
            server_id = d.get("serverId")
            if isinstance(server_id, str):
                self._subscriptions.pop(server_id, None)
                self._presence_interest.pop(server_id, None)

    async def _restore(self, link: _Link) -> None:
        """After READY: subscriptions, presence interest and status, as the session
        held them (a resumed session keeps them server-side)."""
        for server_id in list(self._subscriptions):
            link.pending_subscribes.append(server_id)
            await self._send(link, "SUBSCRIBE_SERVER", {"serverId": server_id})
        for server_id, user_ids in list(self._presence_interest.items()):
            await self._send(
                link, "SUBSCRIBE_PRESENCE", {"serverId": server_id, "userIds": list(user_ids)}
            )
        current = self.user.get("status") if self.user else None
        if self._status is not None and self._status != current:
            await self._send(link, "PRESENCE_UPDATE", {"status": self._status})

    # --- sending ---------------------------------------------------------------------

    async def _send(self, link: _Link, op: str, d: Any) -> None:
        await link.conn.send(json.dumps({"op": op, "d": d}, separators=(",", ":")))

    async def _send_now(self, op: str, d: Any) -> None:
        link = self._link
        if self._stopped.is_set():
            raise self._failure or ClientClosed("the client is closed")
        if link is None or not link.ready:
            raise NotConnected(f"{op} needs a READY connection")
        try:
            await self._send(link, op, d)
        except WebSocketClosed as exc:
            raise NotConnected(f"{op}: the connection closed ({exc.code})") from None

    async def _send_if_ready(self, op: str, d: Any) -> None:
        """Send now if READY; otherwise the op is applied by the restore after READY."""
        if self._stopped.is_set():
            raise self._failure or ClientClosed("the client is closed")
        link = self._link
        if link is None or not link.ready:
            return
        if op == "SUBSCRIBE_SERVER":
            link.pending_subscribes.append(d["serverId"])
        with contextlib.suppress(WebSocketClosed):  # else restored on the next READY
            await self._send(link, op, d)

    async def _emit(self, event: ClientEvent) -> None:
        try:
            self._events_in.send_nowait(event)
        except anyio.WouldBlock:
            self._stalled = True
            try:
                await self._events_in.send(event)
            finally:
                self._stalled = False
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # nobody iterates any more


@asynccontextmanager
async def connect(
    url: str | Sequence[str], token: TokenSource, **options: Any
) -> AsyncIterator[GatewayClient]:
    """Run a :class:`GatewayClient` for the duration of the block::

        async with connect("ws://127.0.0.1:8000/ws/gateway", token) as client:
            await client.subscribe("s1")
            async for event in client:
                ...

    ``url`` may be a list: each reconnect moves to the next one. ``options`` are
    :class:`GatewayClient`'s keyword arguments. Leaving the block closes with 1000.
    """
    client = GatewayClient(url, token, **options)
    async with anyio.create_task_group() as group:
        await group.start(client.run)
        try:
            yield client
        finally:
            with anyio.CancelScope(shield=True):
                await client.aclose()
