"""The ports: what the core needs from the world, in domain terms.

Adapters implement these protocols (``adapters.memory`` for the in-process fakes,
``adapters.redis``, ``adapters.postgres``, ``adapters.jwt``, ``adapters.websocket``).
Every adapter of a port passes the same contract tests (``tests/contract``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Protocol

from domain.model import (
    Channel,
    ChannelId,
    DirectoryData,
    InstanceId,
    Member,
    PresenceChange,
    Server,
    ServerContext,
    ServerId,
    SessionId,
    Status,
    User,
    UserId,
)


class BackendUnavailable(Exception):
    """A backend (broker, key store, directory) did not answer in time or refused."""


class InvalidToken(Exception):
    """The token was refused: bad signature, expired, wrong algorithm, no ``sub``."""


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on the clock that timers and sleeps use (never goes back)."""
        ...

    def wall_ms(self) -> int:
        """Milliseconds since the Unix epoch (for timestamps shown to clients)."""
        ...


class TokenVerifier(Protocol):
    def verify(self, token: str, now: float) -> UserId:
        """Return the ``sub`` of a valid token, else raise :class:`InvalidToken`.

        ``now`` is seconds since the epoch, so that expiry is checked against the
        injected clock.
        """
        ...


#: Called by a broker for every message on a channel this instance subscribed to.
MessageHandler = Callable[[str, bytes], Awaitable[None]]


class Broker(Protocol):
    """Pub/sub between instances (Redis channels ``ws:server:*`` and ``ws:user:*``).

    Delivery is at most once; messages published while a subscriber is disconnected
    are lost (a documented limit). Channel reference counting is done by the caller:
    the broker sees one ``subscribe`` per channel per instance.
    """

    async def publish(self, channel: str, payload: bytes) -> None:
        """Publish; raise :class:`BackendUnavailable` at once when the broker is down."""
        ...

    async def subscribe(self, channel: str) -> None:
        """Return once the subscription is confirmed live (events published after
        this returns reach the handler)."""
        ...

    async def unsubscribe(self, channel: str) -> None: ...

    async def run(self, handler: MessageHandler) -> None:
        """Deliver messages to ``handler`` in order until cancelled; reconnect and
        resubscribe after outages."""
        ...

    def is_healthy(self) -> bool: ...


class TypingGate(Protocol):
    async def claim(self, key: str, ttl_ms: int) -> bool:
        """Set ``key`` if absent with a TTL; True when it was new (``SET NX PX``)."""
        ...


class PresenceStore(Protocol):
    """Per-user status and the live sessions behind it, shared by all instances.

    Every method is one atomic transition and returns what changed, following
    :func:`domain.presence.transition`.
    """

    async def session_opened(
        self, instance_id: InstanceId, user_id: UserId, session_id: SessionId
    ) -> PresenceChange: ...

    async def session_closed(
        self, instance_id: InstanceId, user_id: UserId, session_id: SessionId
    ) -> PresenceChange: ...

    async def set_status(self, user_id: UserId, status: Status) -> PresenceChange:
        """Set the status of a user with at least one live session."""
        ...

    async def get_status(self, user_id: UserId) -> Status: ...

    async def get_statuses(self, user_ids: Sequence[UserId]) -> list[Status]:
        """The status of each user, in order (one round trip, for PRESENCE_SNAPSHOT)."""
        ...

    async def keep_alive(self, instance_id: InstanceId, ttl_ms: int) -> bool:
        """Mark this instance's sessions alive for another ``ttl_ms``. Return True when
        the instance was registered already, False when it is new or was reaped (its
        sessions are gone: the caller must open its live sessions again)."""
        ...

    async def reap(self) -> list[PresenceChange]:
        """Drop the sessions of instances whose liveness expired; return the users
        whose status changed because of it (each change is returned to one caller)."""
        ...

    async def ping(self) -> None: ...


class Directory(Protocol):
    """Users, servers, members, roles, channels (Postgres in production)."""

    async def get_user(self, user_id: UserId) -> User | None: ...

    async def find_user(self, id_or_username: str) -> User | None: ...

    async def get_user_servers(self, user_id: UserId) -> list[Server]: ...

    async def get_server_context(self, server_id: ServerId) -> ServerContext | None: ...

    async def get_channel(self, channel_id: ChannelId) -> Channel | None: ...

    async def get_members(
        self, server_id: ServerId, user_ids: Collection[UserId]
    ) -> Mapping[UserId, Member]:
        """The members among ``user_ids`` (absent ids are not members)."""
        ...

    async def set_user_status(self, user_id: UserId, status: Status) -> None: ...

    async def load(self, data: DirectoryData) -> None:
        """Upsert a whole fixture; loading the same data twice changes nothing."""
        ...

    async def ping(self) -> None: ...


class Transport(Protocol):
    """One client connection (a WebSocket, or an in-memory pipe in the simulation)."""

    async def receive(self) -> str | bytes:
        """The next whole message; raise :class:`TransportClosed` when it is gone."""
        ...

    async def send(self, text: str) -> None: ...

    async def send_many(self, texts: Sequence[str]) -> None:
        """Send these frames in order, as one write where the transport can."""
        ...

    def try_send_many(self, texts: Sequence[str]) -> bool:
        """Send these frames now, without waiting, if that cannot block; else write
        nothing and return False (the caller then awaits :meth:`send_many`)."""
        ...

    async def close(self, code: int, reason: str = "") -> None:
        """Send the close frame (the peer's answer arrives through ``receive``)."""
        ...

    def abort(self) -> None:
        """Drop the connection now, whatever is unsent (a close deadline passed)."""
        ...


class TransportClosed(Exception):
    def __init__(self, code: int | None = None) -> None:
        super().__init__(code)
        self.code = code


class MessageTooBig(Exception):
    """The assembled message exceeded the payload limit (close 1009)."""
