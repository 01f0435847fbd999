"""The directory's SQL: the constant statements of :mod:`adapters.postgres.directory`
and the statements that load a fixture (PROTOCOL section 11)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from domain.model import DirectoryData

# --- Reads -----------------------------------------------------------------------

GET_USER = "SELECT id, username, display_name, avatar_url FROM users WHERE id = $1"

# An exact id wins over someone else's equal username.
FIND_USER = """
SELECT id, username, display_name, avatar_url
FROM users
WHERE id = $1 OR username = $1
ORDER BY id = $1 DESC
LIMIT 1
"""

GET_USER_SERVERS = """
SELECT s.id, s.name, s.owner_id, s.icon_url, s.member_count
FROM server_members m
JOIN servers s ON s.id = m.server_id
WHERE m.user_id = $1
ORDER BY s.id COLLATE "C"
"""

OVERWRITES_OF_C = """
ARRAY(
    SELECT ROW(o.target_id, o.target_type, o.allow, o.deny)
    FROM channel_overwrites o
    WHERE o.channel_id = c.id
    ORDER BY o.target_type, o.target_id
)
"""

GET_SERVER_CONTEXT = f"""
SELECT s.id, s.name, s.owner_id, s.icon_url, s.member_count,
       ARRAY(
           SELECT ROW(r.id, r.name, r.permissions)
           FROM roles r
           WHERE r.server_id = s.id
           ORDER BY r.id
       ) AS roles,
       ARRAY(
           SELECT ROW(c.id, c.name, c.type, {OVERWRITES_OF_C})
           FROM channels c
           WHERE c.server_id = s.id
           ORDER BY c.id
       ) AS channels
FROM servers s
WHERE s.id = $1
"""

GET_CHANNEL = f"""
SELECT c.id, c.server_id, c.name, c.type, {OVERWRITES_OF_C} AS overwrites
FROM channels c
WHERE c.id = $1
"""

GET_MEMBERS = """
SELECT m.user_id,
       ARRAY(
           SELECT mr.role_id
           FROM member_roles mr
           WHERE mr.server_id = m.server_id AND mr.user_id = m.user_id
           ORDER BY mr.role_id
       ) AS role_ids
FROM server_members m
WHERE m.server_id = $1 AND m.user_id = ANY($2::text[])
"""

# --- Writes ----------------------------------------------------------------------

SET_USER_STATUS = "UPDATE users SET status = $2 WHERE id = $1 AND status <> $2"

# Upserts rewrite a row only when something changed, so that loading the same
# fixture again writes nothing.
UPSERT_USERS = """
INSERT INTO users AS t (id, username, display_name, avatar_url)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
ON CONFLICT (id) DO UPDATE
SET username = excluded.username,
    display_name = excluded.display_name,
    avatar_url = excluded.avatar_url
WHERE (t.username, t.display_name, t.avatar_url)
      IS DISTINCT FROM (excluded.username, excluded.display_name, excluded.avatar_url)
"""

UPSERT_SERVERS = """
INSERT INTO servers AS t (id, name, owner_id, icon_url)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
ON CONFLICT (id) DO UPDATE
SET name = excluded.name, owner_id = excluded.owner_id, icon_url = excluded.icon_url
WHERE (t.name, t.owner_id, t.icon_url)
      IS DISTINCT FROM (excluded.name, excluded.owner_id, excluded.icon_url)
"""

UPSERT_ROLES = """
INSERT INTO roles AS t (id, server_id, name, permissions)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[])
ON CONFLICT (id) DO UPDATE
SET server_id = excluded.server_id, name = excluded.name, permissions = excluded.permissions
WHERE (t.server_id, t.name, t.permissions)
      IS DISTINCT FROM (excluded.server_id, excluded.name, excluded.permissions)
"""

INSERT_MEMBERS = """
INSERT INTO server_members (server_id, user_id)
SELECT * FROM unnest($1::text[], $2::text[])
ON CONFLICT DO NOTHING
"""

# The loaded members' roles become exactly the fixture's: drop the others...
DELETE_STALE_MEMBER_ROLES = """
DELETE FROM member_roles AS mr
USING unnest($1::text[], $2::text[]) AS m(server_id, user_id)
WHERE mr.server_id = m.server_id AND mr.user_id = m.user_id
  AND (mr.server_id, mr.user_id, mr.role_id) NOT IN (
      SELECT * FROM unnest($3::text[], $4::text[], $5::text[])
  )
"""

# ... and add the missing ones.
INSERT_MEMBER_ROLES = """
INSERT INTO member_roles (server_id, user_id, role_id)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
ON CONFLICT DO NOTHING
"""

UPSERT_CHANNELS = """
INSERT INTO channels AS t (id, server_id, name, type)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
ON CONFLICT (id) DO UPDATE
SET server_id = excluded.server_id, name = excluded.name, type = excluded.type
WHERE (t.server_id, t.name, t.type)
      IS DISTINCT FROM (excluded.server_id, excluded.name, excluded.type)
"""

# Same for the loaded channels' overwrites.
DELETE_STALE_OVERWRITES = """
DELETE FROM channel_overwrites AS o
WHERE o.channel_id = ANY($1::text[])
  AND (o.channel_id, o.target_id, o.target_type) NOT IN (
      SELECT * FROM unnest($2::text[], $3::text[], $4::text[])
  )
"""

UPSERT_OVERWRITES = """
INSERT INTO channel_overwrites AS t (channel_id, target_id, target_type, allow, deny)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[])
ON CONFLICT (channel_id, target_id, target_type) DO UPDATE
SET allow = excluded.allow, deny = excluded.deny
WHERE (t.allow, t.deny) IS DISTINCT FROM (excluded.allow, excluded.deny)
"""



# --- A fixture to statements -------------------------------------------------------


def _columns(rows: Sequence[tuple[Any, ...]], width: int) -> tuple[list[Any], ...]:
    """Rows to one list per column (the arguments of ``unnest``)."""
    return tuple([row[i] for row in rows] for i in range(width))


def load_statements(data: DirectoryData) -> list[tuple[str, tuple[list[Any], ...]]]:
    """The statements of :meth:`PostgresDirectory.load`, in dependency order.

    Within a fixture the last entity with a given id wins (like the memory
    directory); rows go in key order so that concurrent loads lock rows in the same
    order and cannot deadlock.
    """
    users = sorted({u.id: u for u in data.users}.values(), key=lambda u: u.id)
    servers = sorted({s.id: s for s in data.servers}.values(), key=lambda s: s.id)
    roles = sorted({r.id: r for r in data.roles}.values(), key=lambda r: r.id)
    members = sorted({(m.server_id, m.user_id): m for m in data.members}.values(),
                     key=lambda m: (m.server_id, m.user_id))
    channels = sorted({c.id: c for c in data.channels}.values(), key=lambda c: c.id)
    member_roles = sorted({(m.server_id, m.user_id, rid) for m in members for rid in m.role_ids})
    overwrites = sorted(
        {(c.id, o.id, o.type): (c.id, o.id, o.type, o.allow, o.deny)
         for c in channels for o in c.overwrites}.values()
    )

    member_keys = _columns([(m.server_id, m.user_id) for m in members], 2)
    member_role_cols = _columns(member_roles, 3)
    overwrite_cols = _columns(overwrites, 5)
    statements: list[tuple[str, tuple[list[Any], ...]]] = [
        (UPSERT_USERS,
         _columns([(u.id, u.username, u.display_name, u.avatar_url) for u in users], 4)),
        (UPSERT_SERVERS,
         _columns([(s.id, s.name, s.owner_id, s.icon_url) for s in servers], 4)),
        (UPSERT_ROLES,
         _columns([(r.id, r.server_id, r.name, r.permissions) for r in roles], 4)),
        (INSERT_MEMBERS, member_keys),
        (DELETE_STALE_MEMBER_ROLES, member_keys + member_role_cols),
        (INSERT_MEMBER_ROLES, member_role_cols),
        (UPSERT_CHANNELS,
         _columns([(c.id, c.server_id, c.name, c.type) for c in channels], 4)),
        (DELETE_STALE_OVERWRITES, ([c.id for c in channels], *overwrite_cols[:3])),
        (UPSERT_OVERWRITES, overwrite_cols),
    ]
    # A statement whose first column is empty has nothing to do.
    return [(query, args) for query, args in statements if args[0]]
