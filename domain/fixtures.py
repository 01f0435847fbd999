"""The fixture format of PROTOCOL section 11: parse and validate, then emit."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from typing import Any, TypeVar, cast

from domain.model import Channel, DirectoryData, Member, Overwrite, Role, Server, User


class FixtureError(ValueError):
    """The fixture does not follow PROTOCOL section 11."""


def _obj(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise FixtureError(f"{where}: expected an object")
    return cast(Mapping[str, Any], value)


def _str(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise FixtureError(f"{where}: {key!r} must be a non-empty string")
    return value


def _opt_str(obj: Mapping[str, Any], key: str, where: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise FixtureError(f"{where}: {key!r} must be a string or null")
    return value


def _int(obj: Mapping[str, Any], key: str, where: str, default: int | None = None) -> int:
    value = obj.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise FixtureError(f"{where}: {key!r} must be a non-negative integer")
    return value


def _list(doc: Mapping[str, Any], key: str) -> list[Any]:
    value = doc.get(key, [])
    if not isinstance(value, list):
        raise FixtureError(f"{key!r} must be a list")
    return value


def parse_directory(document: object) -> DirectoryData:
    """Validate a decoded fixture document and build the directory it describes."""
    doc = _obj(document, "fixture")
    users = []
    for i, raw in enumerate(_list(doc, "users")):
        w = f"users[{i}]"
        o = _obj(raw, w)
        users.append(
            User(
                id=_str(o, "id", w),
                username=_str(o, "username", w),
                display_name=_opt_str(o, "displayName", w),
                avatar_url=_opt_str(o, "avatarUrl", w),
            )
        )
    servers = []
    for i, raw in enumerate(_list(doc, "servers")):
        w = f"servers[{i}]"
        o = _obj(raw, w)
        servers.append(
            Server(
                id=_str(o, "id", w),
                name=_str(o, "name", w),
                owner_id=_str(o, "ownerId", w),
                icon_url=_opt_str(o, "iconUrl", w),
            )
        )
    roles = []
    for i, raw in enumerate(_list(doc, "roles")):
        w = f"roles[{i}]"
        o = _obj(raw, w)
        roles.append(
            Role(
                id=_str(o, "id", w),
                server_id=_str(o, "serverId", w),
                name=_str(o, "name", w),
                permissions=_int(o, "permissions", w),
            )
        )
    members = []
    for i, raw in enumerate(_list(doc, "members")):
        w = f"members[{i}]"
        o = _obj(raw, w)
        role_ids = o.get("roleIds", [])
        if not isinstance(role_ids, list) or not all(isinstance(r, str) for r in role_ids):
            raise FixtureError(f"{w}: 'roleIds' must be a list of strings")
        members.append(
            Member(
                server_id=_str(o, "serverId", w),
                user_id=_str(o, "userId", w),
                role_ids=tuple(role_ids),
            )
        )
    channels = []
    for i, raw in enumerate(_list(doc, "channels")):
        w = f"channels[{i}]"
        o = _obj(raw, w)
        overwrites = []
        raw_ows = o.get("overwrites", [])
        if not isinstance(raw_ows, list):
            raise FixtureError(f"{w}: 'overwrites' must be a list")
        for j, raw_ow in enumerate(raw_ows):
            wo = f"{w}.overwrites[{j}]"
            ow = _obj(raw_ow, wo)
            kind = ow.get("type")
            if kind not in ("role", "member"):
                raise FixtureError(f"{wo}: 'type' must be 'role' or 'member'")
            overwrites.append(
                Overwrite(
                    id=_str(ow, "id", wo),
                    type=kind,
                    allow=_int(ow, "allow", wo, 0),
                    deny=_int(ow, "deny", wo, 0),
                )
            )
        channels.append(
            Channel(
                id=_str(o, "id", w),
                server_id=_str(o, "serverId", w),
                name=_str(o, "name", w),
                type=_opt_str(o, "type", w) or "text",
                overwrites=tuple(overwrites),
            )
        )
    data = DirectoryData(
        users=tuple(users),
        servers=tuple(servers),
        roles=tuple(roles),
        members=tuple(members),
        channels=tuple(channels),
    )
    _check_references(data)
    return data


K = TypeVar("K", bound=Hashable)


def _first_duplicate(keys: Iterable[K]) -> K | None:
    seen: set[K] = set()
    for key in keys:
        if key in seen:
            return key
        seen.add(key)
    return None


def _check_references(data: DirectoryData) -> None:
    user_ids = {u.id for u in data.users}
    server_ids = {s.id for s in data.servers}
    # Duplicates: the adapters would disagree on them (the memory directory keeps the
    # last one, Postgres merges or refuses them), so none is accepted.
    for kind, ids in (
        ("user id", [u.id for u in data.users]),
        ("username", [u.username for u in data.users]),
        ("server id", [s.id for s in data.servers]),
        ("channel id", [c.id for c in data.channels]),
        ("role id", [r.id for r in data.roles]),
    ):
        duplicate = _first_duplicate(ids)
        if duplicate is not None:
            raise FixtureError(f"duplicate {kind} {duplicate!r}")
    member = _first_duplicate((m.server_id, m.user_id) for m in data.members)
    if member is not None:
        raise FixtureError(f"duplicate member: user {member[1]!r} of server {member[0]!r}")
    for s in data.servers:
        if s.owner_id not in user_ids:
            raise FixtureError(f"server {s.id}: owner {s.owner_id} is not a user")
    role_server = {r.id: r.server_id for r in data.roles}
    for r in data.roles:
        if r.server_id not in server_ids:
            raise FixtureError(f"role {r.id}: unknown server {r.server_id}")
    for m in data.members:
        if m.server_id not in server_ids:
            raise FixtureError(f"member {m.user_id}@{m.server_id}: unknown server {m.server_id}")
        if m.user_id not in user_ids:
            raise FixtureError(f"member {m.user_id}@{m.server_id}: unknown user {m.user_id}")
        for rid in m.role_ids:
            if role_server.get(rid) != m.server_id:
                raise FixtureError(f"member {m.user_id}@{m.server_id}: unknown role {rid}")
    for c in data.channels:
        if c.server_id not in server_ids:
            raise FixtureError(f"channel {c.id}: unknown server {c.server_id}")
        target = _first_duplicate((o.type, o.id) for o in c.overwrites)
        if target is not None:
            raise FixtureError(f"channel {c.id}: two overwrites for {target[0]} {target[1]!r}")


def dump_directory(data: DirectoryData) -> dict[str, Any]:
    """The inverse of :func:`parse_directory`."""
    return {
        "users": [
            {
                "id": u.id,
                "username": u.username,
                "displayName": u.display_name,
                "avatarUrl": u.avatar_url,
            }
            for u in data.users
        ],
        "servers": [s.to_wire() for s in data.servers],
        "roles": [
            {"id": r.id, "serverId": r.server_id, "name": r.name, "permissions": r.permissions}
            for r in data.roles
        ],
        "members": [
            {"serverId": m.server_id, "userId": m.user_id, "roleIds": list(m.role_ids)}
            for m in data.members
        ],
        "channels": [
            {
                "id": c.id,
                "serverId": c.server_id,
                "name": c.name,
                "type": c.type,
                "overwrites": [
                    {"id": o.id, "type": o.type, "allow": o.allow, "deny": o.deny}
                    for o in c.overwrites
                ],
            }
            for c in data.channels
        ],
    }
