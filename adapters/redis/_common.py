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

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from adapters.deadline import fail_after
from domain.ports import BackendUnavailable

#: Errors that mean "the backend did not answer in time or refused", as opposed to a
#: bug (a wrong command, a broken script), which is left to propagate.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,  # includes authentication, loading, too many connections
    RedisTimeoutError,
    ReadOnlyError,  # failover in progress: we talk to a replica
    OutOfMemoryError,
    # Redis Cluster: a master down or failing over, a slot not served, the cluster
    # unreachable at all (RedisClusterException is not a RedisError).
    ClusterDownError,
    TryAgainError,
    RedisClusterException,
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


def create_cluster_client(
    url: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    connect_timeout: float | None = None,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> RedisCluster:
    """:func:`create_client` for a Redis Cluster that ``url`` names any node of: the
    same timeouts, RESP2 and no retries on a connection; a slot whose master is
    down fails alone (``require_full_coverage=False``). Its redirections (MOVED,
    ASK) are followed within ``timeout``. Close with ``await client.aclose()``."""
    return RedisCluster.from_url(
        url,
        max_connections=max_connections,
        socket_timeout=timeout,
        socket_connect_timeout=connect_timeout if connect_timeout is not None else timeout,
        socket_keepalive=True,
        retry=Retry(NoBackoff(), 0),
        require_full_coverage=False,
        protocol=2,
    )


async def cluster_ready(client: Redis | RedisCluster) -> None:
    """Before a command on a Redis Cluster client: (re)read the topology first if the
    client needs to. Adjustment for redis-py 8.1's asyncio ``RedisCluster``: when
    several commands start at once on a client that must initialize (new, or after a
    connection error), some fail with "Connection lost" while the topology refresh
    recycles the node's connections; initializing before the command, which waits
    on the client's own lock, avoids that. A no-op when already initialized, and for
    a standalone client."""
    if isinstance(client, RedisCluster) and client._initialize:
        await client.initialize()


@contextmanager
def unavailable_as(what: str, timeout: float | None = None) -> Iterator[None]:
    """Translate backend failures of the enclosed Redis call into
    :class:`BackendUnavailable`. No deadline scope unless ``timeout`` is given: the
    standalone client's own bounds apply (pool wait and socket, kept apart). The
    cluster adapters pass one: redis-py's ``RedisCluster`` follows redirections and
    refreshes its topology inside a call, which its socket timeout alone does not
    bound."""
    try:
        if timeout is None:
            yield
        else:
            with fail_after(timeout):
                yield
    except UNAVAILABLE_ERRORS as exc:
        raise BackendUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc
