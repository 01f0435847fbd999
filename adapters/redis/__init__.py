"""Redis implementations of the broker, typing gate and presence store ports.

Built on ``redis.asyncio``. Every call is bounded in time and a backend that is down,
hung or refusing surfaces as :class:`domain.ports.BackendUnavailable`.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

from redis.asyncio import Redis, RedisCluster

from adapters.redis._common import (
    DEFAULT_POOL_TIMEOUT,
    DEFAULT_TIMEOUT,
    create_client,
    create_cluster_client,
)
from adapters.redis.broker import RedisBroker
from adapters.redis.cluster import RedisClusterBroker
from adapters.redis.cluster_presence import RedisClusterPresenceStore
from adapters.redis.presence import RedisPresenceStore
from adapters.redis.subscriber import BrokerStats
from adapters.redis.typing_gate import RedisTypingGate

__all__ = [
    "BrokerStats",
    "RedisBroker",
    "RedisClusterBroker",
    "RedisClusterPresenceStore",
    "RedisMode",
    "RedisPresenceStore",
    "RedisTypingGate",
    "create_client",
    "create_cluster_client",
    "open_redis_backends",
]

RedisMode = Literal["standalone", "cluster"]


@asynccontextmanager
async def open_redis_backends(
    url: str,
    *,
    call_timeout: float = DEFAULT_TIMEOUT,
    pool_timeout: float = DEFAULT_POOL_TIMEOUT,
    client_name: str = "gateway-pubsub",
    mode: RedisMode = "standalone",
) -> AsyncIterator[
    tuple[
        RedisBroker | RedisClusterBroker,
        RedisTypingGate,
        RedisPresenceStore | RedisClusterPresenceStore,
    ]
]:
    """The three Redis-backed ports of one instance: a broker (its own pool and
    subscriber connection) and a typing gate and presence store sharing one pool.
    Nothing is contacted here: the instance starts even when Redis is down, and
    ``broker.run`` connects (and reconnects) in the background. Everything is
    closed on exit. ``call_timeout`` bounds every Redis command (publish included) from
    the moment it has a pooled connection; ``pool_timeout`` the wait for one (standalone).
    ``mode="cluster"``: ``url`` names any node of a Redis Cluster (PROTOCOL 16)."""
    client: Redis | RedisCluster
    broker: RedisBroker | RedisClusterBroker
    presence: RedisPresenceStore | RedisClusterPresenceStore
    if mode == "cluster":
        client = create_cluster_client(url, timeout=call_timeout)
        broker = RedisClusterBroker(url, publish_timeout=call_timeout, client_name=client_name)
        presence = RedisClusterPresenceStore(client, timeout=call_timeout)
    else:
        client = create_client(url, timeout=call_timeout, pool_timeout=pool_timeout)
        broker = RedisBroker(
            url, publish_timeout=call_timeout, pool_timeout=pool_timeout, client_name=client_name
        )
        presence = RedisPresenceStore(client)
    try:
        yield broker, RedisTypingGate(client, timeout=call_timeout), presence
    finally:
        try:
            await broker.close()
        finally:
            await client.aclose()
