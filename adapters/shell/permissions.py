"""Cached directory reads for permission checks and channel-scoped fan-out.

A fan-out must never query per recipient: members are fetched in one batch for the
recipients not yet cached, and server contexts (roles and channels) once per server.
Entries expire after a TTL and are dropped at once by the invalidation events of
PROTOCOL section 7 (``CHANNEL_*``, ``ROLE_*``, ``SERVER_MEMBER_*``).
"""

from __future__ import annotations

import enum
from collections.abc import Collection

from domain.model import Channel, ChannelId, Member, ServerContext, ServerId, UserId
from domain.permissions import can_read
from domain.ports import Clock, Directory


class Miss(enum.Enum):
    MISS = "miss"


#: Not in the cache (or expired): the directory must be asked.
MISS = Miss.MISS


class PermissionCache:
    def __init__(self, directory: Directory, clock: Clock, ttl: float) -> None:
        self._directory = directory
        self._clock = clock
        self._ttl = ttl
        self._contexts: dict[ServerId, tuple[float, ServerContext | None]] = {}
        self._channels: dict[ChannelId, tuple[float, Channel | None]] = {}
        self._members: dict[ServerId, dict[UserId, tuple[float, Member | None]]] = {}
        #: server -> ids of its channels in ``_channels`` (invalidation without a scan)
        self._server_channels: dict[ServerId, set[ChannelId]] = {}

    def _fresh(self, expires: float) -> bool:
        return expires > self._clock.monotonic()

    def cached_server(self, server_id: ServerId) -> ServerContext | Miss | None:
        """The cached context (``None``: no such server), or MISS: no directory call."""
        hit = self._contexts.get(server_id)
        if hit is not None and self._fresh(hit[0]):
            return hit[1]
        return MISS

    async def server(self, server_id: ServerId) -> ServerContext | None:
        hit = self._contexts.get(server_id)
        if hit is not None and self._fresh(hit[0]):
            return hit[1]
        context = await self._directory.get_server_context(server_id)
        self._contexts[server_id] = (self._clock.monotonic() + self._ttl, context)
        if context is not None:
            expires = self._clock.monotonic() + self._ttl
            for channel in context.channels.values():
                self._remember_channel(channel.id, expires, channel)
        return context

    def _remember_channel(
        self, channel_id: ChannelId, expires: float, channel: Channel | None
    ) -> None:
        self._channels[channel_id] = (expires, channel)
        if channel is not None:
            self._server_channels.setdefault(channel.server_id, set()).add(channel_id)

    async def channel(self, channel_id: ChannelId) -> Channel | None:
        hit = self._channels.get(channel_id)
        if hit is not None and self._fresh(hit[0]):
            return hit[1]
        channel = await self._directory.get_channel(channel_id)
        self._remember_channel(channel_id, self._clock.monotonic() + self._ttl, channel)
        return channel

    async def members(
        self, server_id: ServerId, user_ids: Collection[UserId]
    ) -> dict[UserId, Member]:
        """Members among ``user_ids``; one directory call for all the uncached ones."""
        cache = self._members.setdefault(server_id, {})
        now = self._clock.monotonic()
        found: dict[UserId, Member] = {}
        missing: list[UserId] = []
        for uid in user_ids:
            hit = cache.get(uid)
            if hit is not None and hit[0] > now:
                if hit[1] is not None:
                    found[uid] = hit[1]
            else:
                missing.append(uid)
        if missing:
            fetched = await self._directory.get_members(server_id, missing)
            expires = self._clock.monotonic() + self._ttl
            for uid in missing:
                member = fetched.get(uid)
                cache[uid] = (expires, member)
                if member is not None:
                    found[uid] = member
        return found

    async def member(self, server_id: ServerId, user_id: UserId) -> Member | None:
        return (await self.members(server_id, (user_id,))).get(user_id)

    def cached_readers(
        self, server_id: ServerId, channel_id: ChannelId, user_ids: Collection[UserId]
    ) -> set[UserId] | None:
        """:meth:`readers` when the cache holds every answer it needs (``None``: it
        does not, ask :meth:`readers`); the fan-out then needs no deadline."""
        hit = self._contexts.get(server_id)
        now = self._clock.monotonic()
        if hit is None or hit[0] <= now:
            return None
        context = hit[1]
        if context is None:
            return set()
        channel = context.channels.get(channel_id)
        if channel is None:
            return None
        cache = self._members.get(server_id)
        if cache is None:
            return None
        members: list[tuple[UserId, Member]] = []
        for uid in user_ids:
            entry = cache.get(uid)
            if entry is None or entry[0] <= now:
                return None
            if entry[1] is not None:
                members.append((uid, entry[1]))
        return {
            uid for uid, m in members if can_read(context.server, m, context.roles, channel)
        }

    async def readers(
        self, server_id: ServerId, channel_id: ChannelId, user_ids: Collection[UserId]
    ) -> set[UserId]:
        """Those of ``user_ids`` with READ_MESSAGES on the channel."""
        context = await self.server(server_id)
        if context is None:
            return set()
        channel = context.channels.get(channel_id)
        if channel is None:
            channel = await self.channel(channel_id)
            if channel is None or channel.server_id != server_id:
                return set()
        members = await self.members(server_id, user_ids)
        return {
            uid for uid, m in members.items() if can_read(context.server, m, context.roles, channel)
        }

    def invalidate_server(self, server_id: ServerId) -> None:
        self._contexts.pop(server_id, None)
        self._members.pop(server_id, None)
        for channel_id in self._server_channels.pop(server_id, ()):
            self._channels.pop(channel_id, None)

    def invalidate_member(self, server_id: ServerId, user_id: UserId) -> None:
        members = self._members.get(server_id)
        if members is not None:
            members.pop(user_id, None)
