"""What the Redis adapters share: how a client is built and how failures are named.

Every call into Redis is bounded, and retries are off (a caller that wants to retry
decides so itself). Two bounds, kept apart (PROTOCOL 15):

* the **command** bound (``timeout``): each connect, write and read on the socket,
  counted from the moment the command has its connection;
* the **pool wait** bound (``pool_timeout``, longer): how long a call may wait for one
  of the pool's connections. A storm that queues for the pool is not a slow command,
  and its wait does not eat the command's time.

The adapters open no deadline scope of their own: the one deadline of an operation
is the shell's (one scope per client operation), and the bounds above guarantee
that a call never hangs without one. A scope here, nested in the shell's, expired
together with thousands of others in a storm, and every command it cancelled in
flight made redis-py discard its pooled connection (the reconnects caused more
timeouts). A backend that is down, hung or refusing shows up as
:class:`domain.ports.BackendUnavailable`, never as a hang or a library error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
#: A pooled connection is waited for this long at most (the shell's slots keep the
#: client operations within the pool, so only an unbounded burst, session closes of a
#: mass disconnect, say, waits here).
DEFAULT_POOL_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 64


def create_client(
    url: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    pool_timeout: float = DEFAULT_POOL_TIMEOUT,
    connect_timeout: float | None = None,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> Redis:
    """A pooled client for request/response commands, with short timeouts and no
    retries: ``timeout`` bounds each socket operation of a command, ``pool_timeout``
    the wait for a free pooled connection (apart: see the module's docstring).
    Close it with ``await client.aclose()`` (which also closes its pool)."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=pool_timeout,
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
def unavailable_as(what: str) -> Iterator[None]:
    """Translate backend failures of the enclosed Redis call into
    :class:`BackendUnavailable`. No deadline scope: the client's own bounds apply."""
    try:
        yield
    except UNAVAILABLE_ERRORS as exc:
        raise BackendUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc
