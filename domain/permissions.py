"""Permission computation, Discord's algorithm (PROTOCOL section 9)."""

from __future__ import annotations

from collections.abc import Mapping

from domain.model import Channel, Member, Role, RoleId, Server

ADMINISTRATOR = 1 << 3
MANAGE_CHANNELS = 1 << 4
MANAGE_SERVER = 1 << 5
READ_MESSAGES = 1 << 10
SEND_MESSAGES = 1 << 11

#: @everyone's permissions when the server has no @everyone role.
DEFAULT_EVERYONE = READ_MESSAGES | SEND_MESSAGES
#: What the owner and administrators get: every bit, present and future.
ALL = (1 << 53) - 1


def base_permissions(server: Server, member: Member, roles: Mapping[RoleId, Role]) -> int:
    """@everyone | every role of the member; the owner and ADMINISTRATOR get ALL."""
    if member.user_id == server.owner_id:
        return ALL
    everyone = roles.get(server.id)
    perms = everyone.permissions if everyone is not None else DEFAULT_EVERYONE
    for role_id in member.role_ids:
        role = roles.get(role_id)
        if role is not None and role.server_id == server.id:
            perms |= role.permissions
    if perms & ADMINISTRATOR:
        return ALL
    return perms


def channel_permissions(
    server: Server, member: Member, roles: Mapping[RoleId, Role], channel: Channel
) -> int:
    """Base permissions, then the channel's overwrites in Discord's order:
    @everyone (deny, allow), the union of the member's roles (deny, allow), the member."""
    perms = base_permissions(server, member, roles)
    if perms == ALL:
        return ALL
    everyone_ow = None
    role_allow = role_deny = 0
    member_ow = None
    member_roles = set(member.role_ids)
    for ow in channel.overwrites:
        if ow.type == "role":
            if ow.id == server.id:
                everyone_ow = ow
            elif ow.id in member_roles:
                role_allow |= ow.allow
                role_deny |= ow.deny
        elif ow.id == member.user_id:
            member_ow = ow
    if everyone_ow is not None:
        perms = (perms & ~everyone_ow.deny) | everyone_ow.allow
    perms = (perms & ~role_deny) | role_allow
    if member_ow is not None:
        perms = (perms & ~member_ow.deny) | member_ow.allow
    return perms


def can_read(
    server: Server, member: Member, roles: Mapping[RoleId, Role], channel: Channel
) -> bool:
    return bool(channel_permissions(server, member, roles, channel) & READ_MESSAGES)
