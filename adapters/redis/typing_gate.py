"""Typing dedup on Redis: ``SET key 1 NX PX ttl`` (PROTOCOL section 7)."""

from __future__ import annotations

from redis.asyncio import Redis

from adapters.redis._common import DEFAULT_TIMEOUT, create_client, unavailable_as


class RedisTypingGate:
    """:class:`domain.ports.TypingGate` on Redis. The key is used exactly as given
    (the caller passes ``typing:{channelId}:{userId}``, see :mod:`domain.keys`)."""

    def __init__(self, client: Redis) -> None:
        """``client``'s own bounds (:func:`create_client`) bound every call."""
        self._client = client
        self._owns_client = False

    @classmethod
    def from_url(cls, url: str, *, timeout: float = DEFAULT_TIMEOUT) -> RedisTypingGate:
        """A gate with its own client, closed by :meth:`close`."""
        gate = cls(create_client(url, timeout=timeout))
        gate._owns_client = True
        return gate

    async def claim(self, key: str, ttl_ms: int) -> bool:
        if ttl_ms <= 0:
            raise ValueError(f"ttl_ms must be positive, got {ttl_ms}")
        with unavailable_as(f"SET {key} NX PX"):
            created = await self._client.set(key, b"1", nx=True, px=ttl_ms)
        return bool(created)

    async def ping(self) -> None:
        with unavailable_as("PING"):
            await self._client.ping()

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> RedisTypingGate:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
