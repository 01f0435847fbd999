"""The directory in memory, loaded from the fixture format (PROTOCOL section 11)."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping

from domain.model import (
    Channel,
    ChannelId,
    DirectoryData,
    Member,
    Role,
    Server,
    ServerContext,
    ServerId,
    Status,
    User,
    UserId,
)
from domain.ports import BackendUnavailable


class MemoryDirectory:
    def __init__(self, data: DirectoryData | None = None) -> None:
        self._users: dict[UserId, User] = {}
        self._servers: dict[ServerId, Server] = {}
        self._roles: dict[str, Role] = {}
        self._members: dict[tuple[ServerId, UserId], Member] = {}
        self._channels: dict[ChannelId, Channel] = {}
        self._servers_of: dict[UserId, set[ServerId]] = {}
        self._roles_of: dict[ServerId, dict[str, Role]] = {}
        self._channels_of: dict[ServerId, dict[ChannelId, Channel]] = {}
        #: Members per server, kept with the data (PROTOCOL 14: cheap to read).
        self._member_counts: dict[ServerId, int] = {}
        self.statuses: dict[UserId, Status] = {}
        #: Fault injection: while set, every call raises BackendUnavailable.
        self.failing = False
        self.calls = 0
        if data is not None:
            self._load(data)

    def _check(self) -> None:
        self.calls += 1
        if self.failing:
            raise BackendUnavailable("directory unavailable (injected)")

    def _load(self, data: DirectoryData) -> None:
        for u in data.users:
            self._users[u.id] = u
        for s in data.servers:
            self._servers[s.id] = s
        for r in data.roles:
            self._roles[r.id] = r
            self._roles_of.setdefault(r.server_id, {})[r.id] = r
        for m in data.members:
            if (m.server_id, m.user_id) not in self._members:
                self._member_counts[m.server_id] = self._member_counts.get(m.server_id, 0) + 1
            self._members[(m.server_id, m.user_id)] = m
            self._servers_of.setdefault(m.user_id, set()).add(m.server_id)
        for c in data.channels:
            self.put_channel(c)

    async def load(self, data: DirectoryData) -> None:
        self._check()
        self._load(data)

    async def get_user(self, user_id: UserId) -> User | None:
        self._check()
        return self._users.get(user_id)

    async def find_user(self, id_or_username: str) -> User | None:
        self._check()
        user = self._users.get(id_or_username)
        if user is not None:
            return user
        return next((u for u in self._users.values() if u.username == id_or_username), None)

    async def get_user_servers(self, user_id: UserId) -> list[Server]:
        self._check()
        return sorted(
            (self._counted(self._servers[sid]) for sid in self._servers_of.get(user_id, ())),
            key=lambda s: s.id,
        )

    def _counted(self, server: Server) -> Server:
        count = self._member_counts.get(server.id, 0)
        if server.member_count == count:
            return server
        return dataclasses.replace(server, member_count=count)

    async def get_server_context(self, server_id: ServerId) -> ServerContext | None:
        self._check()
        server = self._servers.get(server_id)
        if server is None:
            return None
        return ServerContext(
            server=self._counted(server),
            roles=dict(self._roles_of.get(server_id, {})),
            channels=dict(self._channels_of.get(server_id, {})),
        )

    async def get_channel(self, channel_id: ChannelId) -> Channel | None:
        self._check()
        return self._channels.get(channel_id)

    async def get_members(
        self, server_id: ServerId, user_ids: Collection[UserId]
    ) -> Mapping[UserId, Member]:
        self._check()
        found = {}
        for uid in user_ids:
            member = self._members.get((server_id, uid))
            if member is not None:
                found[uid] = member
        return found

    async def set_user_status(self, user_id: UserId, status: Status) -> None:
        self._check()
        self.statuses[user_id] = status

    async def ping(self) -> None:
        self._check()

    # Mutations used by tests and the simulation (the directory's owners are other
    # services; they announce changes with the PROTOCOL section 7 events).
    def remove_member(self, server_id: ServerId, user_id: UserId) -> None:
        if self._members.pop((server_id, user_id), None) is not None:
            self._member_counts[server_id] -= 1
        self._servers_of.get(user_id, set()).discard(server_id)

    def put_channel(self, channel: Channel) -> None:
        old = self._channels.get(channel.id)
        if old is not None:
            self._channels_of.get(old.server_id, {}).pop(channel.id, None)
        self._channels[channel.id] = channel
        self._channels_of.setdefault(channel.server_id, {})[channel.id] = channel
