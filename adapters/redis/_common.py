"""What the Redis adapters share: how a client is built and how failures are named.

Every call into Redis is bounded twice: by the socket timeout of the connection and
by an overall deadline around the whole call, and retries are off (a caller that
wants to retry decides so itself). A backend that is down, hung or refusing shows up
as :class:`domain.ports.BackendUnavailable`, never as a hang or a library error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import anyio
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from domain.ports import BackendUnavailable

#: Errors that mean "the backend did not answer in time or refused", as opposed to a
#: bug (a wrong command, a broken script), which is left to propagate.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,  # includes authentication, loading, too many connections
    RedisTimeoutError,
    ReadOnlyError,  # failover in progress: we talk to a replica
    OutOfMemoryError,
    OSError,
    TimeoutError,
)

DEFAULT_TIMEOUT = 1.0
DEFAULT_MAX_CONNECTIONS = 64


def create_client(
    url: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    connect_timeout: float | None = None,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> Redis:
    """A pooled client for request/response commands, with short timeouts and no
    retries. Waiting for a free pooled connection is bounded by ``timeout`` too.
    Close it with ``await client.aclose()`` (which also closes its pool)."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=connect_timeout if connect_timeout is not None else timeout,
        socket_keepalive=True,
        retry=Retry(NoBackoff(), 0),
        # RESP2, explicitly: with RESP3 (redis-py 8's default) the pool enables
        # "maintenance notifications" ("auto"), and then skips its check-out test
        # for connections the server closed while they sat idle in the pool. After a
        # Redis restart each such connection would fail one call (retries are off):
        # a PUBLISH lost, an IDENTIFY closed with 4000.
        protocol=2,
    )
    return Redis.from_pool(pool)


@contextmanager
def unavailable_as(what: str, timeout: float) -> Iterator[None]:
    """Bound the enclosed Redis call by ``timeout`` seconds and translate backend
    failures into :class:`BackendUnavailable`."""
    try:
        with anyio.fail_after(timeout):
            yield
    except UNAVAILABLE_ERRORS as exc:
        raise BackendUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc
