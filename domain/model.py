"""Directory entities and small value types shared by every layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

UserId = str
ServerId = str
ChannelId = str
RoleId = str
SessionId = str
InstanceId = str


class Status(StrEnum):
    ONLINE = "online"
    IDLE = "idle"
    DND = "dnd"
    INVISIBLE = "invisible"
    OFFLINE = "offline"

    @property
    def visible(self) -> Status:
        """What other users see: invisible is shown as offline."""
        return Status.OFFLINE if self is Status.INVISIBLE else self


#: Statuses a client may ask for with PRESENCE_UPDATE.
SETTABLE_STATUSES: frozenset[str] = frozenset({"online", "idle", "dnd", "invisible"})


@dataclass(frozen=True, slots=True)
class User:
    id: UserId
    username: str
    display_name: str | None = None
    avatar_url: str | None = None

    def to_wire(self, status: Status) -> dict[str, Any]:
        return {
            "id": self.id,
            "username": self.username,
            "displayName": self.display_name,
            "avatarUrl": self.avatar_url,
            "status": status.value,
        }


@dataclass(frozen=True, slots=True)
class Server:
    id: ServerId
    name: str
    owner_id: UserId
    icon_url: str | None = None
    #: Members the directory counted (kept with the data: never a count per read).
    #: Not part of a server's identity: two reads of one server compare equal.
    member_count: int = field(default=0, compare=False)

    def is_large(self, threshold: int) -> bool:
        """More than ``threshold`` members (PROTOCOL section 14)."""
        return self.member_count > threshold

    def to_ready(self, threshold: int) -> dict[str, Any]:
        """The Server object of READY: the fixture fields, memberCount and large."""
        wire = self.to_wire()
        wire["memberCount"] = self.member_count
        wire["large"] = self.member_count > threshold
        return wire

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "ownerId": self.owner_id,
            "iconUrl": self.icon_url,
        }


@dataclass(frozen=True, slots=True)
class Role:
    id: RoleId
    server_id: ServerId
    name: str
    permissions: int


@dataclass(frozen=True, slots=True)
class Member:
    server_id: ServerId
    user_id: UserId
    role_ids: tuple[RoleId, ...] = ()


@dataclass(frozen=True, slots=True)
class Overwrite:
    id: str  # a role id or a user id
    type: Literal["role", "member"]
    allow: int = 0
    deny: int = 0


@dataclass(frozen=True, slots=True)
class Channel:
    id: ChannelId
    server_id: ServerId
    name: str
    type: str = "text"
    overwrites: tuple[Overwrite, ...] = ()


@dataclass(frozen=True, slots=True)
class ServerContext:
    """What permission checks need about one server: itself, its roles, its channels."""

    server: Server
    roles: dict[RoleId, Role] = field(default_factory=dict)
    channels: dict[ChannelId, Channel] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DirectoryData:
    """A whole directory, as the fixture format (PROTOCOL section 11) describes it."""

    users: tuple[User, ...] = ()
    servers: tuple[Server, ...] = ()
    roles: tuple[Role, ...] = ()
    members: tuple[Member, ...] = ()
    channels: tuple[Channel, ...] = ()


@dataclass(frozen=True, slots=True)
class PresenceChange:
    """The result of one atomic presence transition for a user."""

    user_id: UserId
    before: Status
    after: Status

    @property
    def visible_changed(self) -> bool:
        return self.before.visible is not self.after.visible
