"""Typing dedup on Redis: ``SET key 1 NX PX ttl`` (PROTOCOL section 7)."""

from __future__ import annotations

from redis.asyncio import Redis, RedisCluster

from adapters.redis._common import (
    DEFAULT_TIMEOUT,
    cluster_ready,
    create_client,
    create_cluster_client,
    unavailable_as,
)


class RedisTypingGate:
    """:class:`domain.ports.TypingGate` on Redis. The key is used exactly as given
    (the caller passes ``typing:{channelId}:{userId}``, see :mod:`domain.keys`)."""

    def __init__(self, client: Redis | RedisCluster, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        """On a standalone client, ``client``'s own bounds (:func:`create_client`)
        bound every call; on a cluster client, ``timeout`` does (see ``unavailable_as``)."""
        self._client = client
        self._timeout = timeout if isinstance(client, RedisCluster) else None
        self._owns_client = False

    @classmethod
    def from_url(
        cls, url: str, *, timeout: float = DEFAULT_TIMEOUT, cluster: bool = False
    ) -> RedisTypingGate:
        """A gate with its own client (of a Redis Cluster if ``cluster``), closed by
        :meth:`close`."""
        client = (create_cluster_client if cluster else create_client)(url, timeout=timeout)
        gate = cls(client, timeout=timeout)
        gate._owns_client = True
        return gate

    async def claim(self, key: str, ttl_ms: int) -> bool:
        if ttl_ms <= 0:
            raise ValueError(f"ttl_ms must be positive, got {ttl_ms}")
        with unavailable_as(f"SET {key} NX PX", self._timeout):
            await cluster_ready(self._client)
            created = await self._client.set(key, b"1", nx=True, px=ttl_ms)
        return bool(created)

    async def ping(self) -> None:
        with unavailable_as("PING", self._timeout):
            await cluster_ready(self._client)
            if isinstance(self._client, RedisCluster):
                await self._client.ping(target_nodes=RedisCluster.PRIMARIES)
            else:
                await self._client.ping()

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> RedisTypingGate:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
