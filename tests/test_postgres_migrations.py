"""Migrations and loading against a real Postgres, each test in a fresh schema."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

import asyncpg
import pytest

from adapters.postgres import PostgresDirectory, available_migrations, migrate
from adapters.postgres import migrations as migrations_module
from adapters.postgres.migrations import Migration, applied_versions
from domain.fixtures import parse_directory
from domain.model import Channel, DirectoryData, Member, Overwrite, Role, Status, User

TABLES = ("users", "servers", "server_members", "roles", "member_roles", "channels",
          "channel_overwrites")

FIXTURE = parse_directory({
    "users": [
        {"id": "u1", "username": "alice", "displayName": "Alice", "avatarUrl": None},
        {"id": "u2", "username": "bob", "displayName": None, "avatarUrl": "https://x.test/b"},
        {"id": "u3", "username": "carol"},
    ],
    "servers": [
        {"id": "s1", "name": "Home", "ownerId": "u1", "iconUrl": None},
        {"id": "s2", "name": "Work", "ownerId": "u2", "iconUrl": "https://x.test/s2"},
    ],
    "roles": [
        {"id": "s1", "serverId": "s1", "name": "@everyone", "permissions": 3072},
        {"id": "r1", "serverId": "s1", "name": "mod", "permissions": 16},
        {"id": "r2", "serverId": "s1", "name": "admin", "permissions": 8},
    ],
    "members": [
        {"serverId": "s1", "userId": "u1", "roleIds": []},
        {"serverId": "s1", "userId": "u2", "roleIds": ["r1", "r2"]},
        {"serverId": "s1", "userId": "u3", "roleIds": ["r1"]},
        {"serverId": "s2", "userId": "u2", "roleIds": []},
    ],
    "channels": [
        {"id": "c1", "serverId": "s1", "name": "general", "type": "text",
         "overwrites": [{"id": "s1", "type": "role", "allow": 0, "deny": 1024},
                        {"id": "r1", "type": "role", "allow": 1024, "deny": 0},
                        {"id": "u3", "type": "member", "allow": 0, "deny": 2048}]},
        {"id": "c2", "serverId": "s2", "name": "work", "type": "text", "overwrites": []},
    ],
})


@dataclass
class Schema:
    name: str
    dsn: str
    conn: asyncpg.Connection[Any]  # its search_path is the schema

    @property
    def settings(self) -> dict[str, str]:
        return {"search_path": self.name}


@pytest.fixture
async def schema(database_url: str) -> AsyncIterator[Schema]:
    """A fresh, empty schema, dropped afterwards."""
    name = f"test_migrations_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(database_url, timeout=10)
    try:
        await admin.execute(f'CREATE SCHEMA "{name}"')
        conn = await asyncpg.connect(database_url, timeout=10,
                                     server_settings={"search_path": name})
        try:
            yield Schema(name, database_url, conn)
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        await admin.close()


async def tables_of(schema: Schema) -> set[str]:
    rows = await schema.conn.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = $1",
        schema.name,
    )
    return {row["table_name"] for row in rows}


async def dump(conn: asyncpg.Connection[Any], *, with_xmin: bool = False) -> dict[str, Any]:
    """Every row of every directory table, in a stable order. With ``with_xmin``,
    also the transaction that last wrote each row (to see rows rewritten with the
    same values)."""
    result = {}
    for table in TABLES:
        extra = ", xmin::text AS xmin" if with_xmin else ""
        rows = await conn.fetch(f"SELECT *{extra} FROM {table}")
        result[table] = sorted((tuple(row.items()) for row in rows), key=repr)
    return result


# --- Migrations --------------------------------------------------------------------------


def test_migrations_ship_as_package_data() -> None:
    files = resources.files("adapters.postgres").joinpath("migrations")
    assert files.joinpath("0001_initial.sql").is_file()
    versions = [m.version for m in available_migrations()]
    assert versions == sorted(set(versions))
    assert versions[0] == 1
    assert all(m.sql.strip() for m in available_migrations())


async def test_migrate_an_empty_schema(schema: Schema) -> None:
    assert await tables_of(schema) == set()
    assert await applied_versions(schema.conn) == []
    applied = await migrate(schema.conn)
    assert applied == [m.version for m in available_migrations()]
    assert await tables_of(schema) == {*TABLES, "schema_migrations"}
    assert await applied_versions(schema.conn) == applied
    rows = await schema.conn.fetch("SELECT version, name, applied_at FROM schema_migrations")
    assert {(r["version"], r["name"]) for r in rows} == {
        (m.version, m.name) for m in available_migrations()
    }
    assert all(r["applied_at"] is not None for r in rows)


async def test_migrate_twice_is_a_no_op(schema: Schema) -> None:
    await migrate(schema.conn)
    before = await schema.conn.fetch("SELECT * FROM schema_migrations ORDER BY version")
    assert await migrate(schema.conn) == []
    assert await migrate(schema.dsn, server_settings=schema.settings) == []
    after = await schema.conn.fetch("SELECT * FROM schema_migrations ORDER BY version")
    assert after == before


async def test_migrate_with_a_dsn_or_a_pool(schema: Schema) -> None:
    assert await migrate(schema.dsn, server_settings=schema.settings) == [
        m.version for m in available_migrations()
    ]
    pool = await asyncpg.create_pool(schema.dsn, min_size=1, max_size=1,
                                     server_settings=schema.settings)
    try:
        assert await migrate(pool) == []
    finally:
        await pool.close()


async def test_concurrent_migrations_are_safe(schema: Schema) -> None:
    """Several instances starting at once: each version is applied exactly once."""

    async def one() -> list[int]:
        return await migrate(schema.dsn, server_settings=schema.settings)

    results = await asyncio.gather(*(one() for _ in range(4)))
    every = [m.version for m in available_migrations()]
    assert sorted(v for result in results for v in result) == every
    assert sum(1 for result in results if result) == 1  # one did it all, under the lock
    assert await applied_versions(schema.conn) == every
    assert await tables_of(schema) == {*TABLES, "schema_migrations"}


async def test_migrations_in_different_schemas_do_not_wait_for_each_other(
    schema: Schema, database_url: str
) -> None:
    """The advisory lock is per schema: a migration holding it in another schema
    does not block this one."""
    other = await asyncpg.connect(database_url, timeout=10)
    try:
        await other.execute(
            "SELECT pg_advisory_lock($1, hashtext('some_other_schema'))",
            migrations_module.LOCK_CLASS,
        )
        applied = await asyncio.wait_for(migrate(schema.conn), 10)
        assert applied == [m.version for m in available_migrations()]
    finally:
        await other.close()


async def test_a_failing_migration_is_rolled_back_and_stops(
    schema: Schema, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped = available_migrations()
    last = shipped[-1].version
    broken = [
        *shipped,
        Migration(last + 1, "good", "CREATE TABLE extra_good (id int)"),
        Migration(last + 2, "bad", "CREATE TABLE extra_bad (id int); SELECT 1/0"),
        Migration(last + 3, "after", "CREATE TABLE extra_after (id int)"),
    ]
    monkeypatch.setattr(migrations_module, "available_migrations", lambda: broken)
    with pytest.raises(asyncpg.DivisionByZeroError):
        await migrate(schema.conn)
    assert await applied_versions(schema.conn) == [*(m.version for m in shipped), last + 1]
    assert await tables_of(schema) == {*TABLES, "schema_migrations", "extra_good"}
    # The lock was released: a fixed set of migrations goes through.
    broken[-2] = Migration(last + 2, "bad", "CREATE TABLE extra_bad (id int)")
    assert await asyncio.wait_for(migrate(schema.conn), 10) == [last + 2, last + 3]


# --- The schema's constraints --------------------------------------------------------------


async def test_status_is_one_of_five_and_defaults_to_offline(schema: Schema) -> None:
    await migrate(schema.conn)
    await schema.conn.execute("INSERT INTO users (id, username) VALUES ('u1', 'alice')")
    assert await schema.conn.fetchval("SELECT status FROM users") == "offline"
    for status in Status:
        await schema.conn.execute("UPDATE users SET status = $1", status.value)
    with pytest.raises(asyncpg.CheckViolationError):
        await schema.conn.execute("UPDATE users SET status = 'away'")
    with pytest.raises(asyncpg.UniqueViolationError):
        await schema.conn.execute("INSERT INTO users (id, username) VALUES ('u2', 'alice')")


async def test_member_roles_belong_to_the_members_server(schema: Schema) -> None:
    await migrate(schema.conn)
    await schema.conn.execute("""
        INSERT INTO users (id, username) VALUES ('u1', 'alice');
        INSERT INTO servers (id, name, owner_id) VALUES ('s1', 'A', 'u1'), ('s2', 'B', 'u1');
        INSERT INTO roles (id, server_id, name) VALUES ('r2', 's2', 'other');
        INSERT INTO server_members (server_id, user_id) VALUES ('s1', 'u1');
    """)
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await schema.conn.execute(
            "INSERT INTO member_roles (server_id, user_id, role_id) VALUES ('s1', 'u1', 'r2')"
        )


async def test_deleting_a_server_cascades(schema: Schema) -> None:
    await migrate(schema.conn)
    async with PostgresDirectory(schema.dsn, server_settings=schema.settings) as directory:
        await directory.load(FIXTURE)
    await schema.conn.execute("DELETE FROM servers WHERE id = 's1'")
    left = await dump(schema.conn)
    assert [r[0][1] for r in left["servers"]] == ["s2"]
    assert all(dict(r)["server_id"] == "s2" for r in left["server_members"])
    assert left["member_roles"] == [] and left["roles"] == []
    assert [dict(r)["id"] for r in left["channels"]] == ["c2"]
    assert left["channel_overwrites"] == []


# --- Loading ---------------------------------------------------------------------------------


async def test_load_twice_gives_identical_tables(schema: Schema) -> None:
    await migrate(schema.conn)
    async with PostgresDirectory(schema.dsn, server_settings=schema.settings) as directory:
        await directory.load(FIXTURE)
        first = await dump(schema.conn, with_xmin=True)
        await directory.load(FIXTURE)
        second = await dump(schema.conn, with_xmin=True)
    assert second == first  # not one row rewritten, let alone changed
    assert {table: len(rows) for table, rows in first.items()} == {
        "users": 3, "servers": 2, "server_members": 4, "roles": 3, "member_roles": 3,
        "channels": 2, "channel_overwrites": 3,
    }


async def test_load_of_a_changed_fixture_then_the_original_restores_it(
    schema: Schema,
) -> None:
    await migrate(schema.conn)
    changed = DirectoryData(  # a partial update, not a fixture of its own
        users=(User("u2", "bob", "Robert"),),
        roles=(Role("r1", "s1", "mod", 48),),
        members=(Member("s1", "u2", ("r1",)),),
        channels=(Channel("c1", "s1", "general", "text", (Overwrite("r2", "role", 1, 0),)),),
    )
    async with PostgresDirectory(schema.dsn, server_settings=schema.settings) as directory:
        await directory.load(FIXTURE)
        original = await dump(schema.conn)
        await directory.load(changed)
        after_change = await dump(schema.conn)
        assert after_change != original
        assert ("r2",) not in {(dict(r)["role_id"],) for r in after_change["member_roles"]
                               if dict(r)["user_id"] == "u2"}
        assert [dict(r)["target_id"] for r in after_change["channel_overwrites"]] == ["r2"]
        await directory.load(FIXTURE)
        assert await dump(schema.conn) == original


async def test_load_leaves_statuses_alone(schema: Schema) -> None:
    await migrate(schema.conn)
    async with PostgresDirectory(schema.dsn, server_settings=schema.settings) as directory:
        await directory.load(FIXTURE)
        await directory.set_user_status("u1", Status.IDLE)
        await directory.load(FIXTURE)
    assert await schema.conn.fetchval("SELECT status FROM users WHERE id = 'u1'") == "idle"
    assert await schema.conn.fetchval("SELECT status FROM users WHERE id = 'u2'") == "offline"


async def test_load_an_empty_fixture(schema: Schema) -> None:
    await migrate(schema.conn)
    async with PostgresDirectory(schema.dsn, server_settings=schema.settings) as directory:
        await directory.load(DirectoryData())
    assert all(rows == [] for rows in (await dump(schema.conn)).values())


async def test_concurrent_loads_neither_fail_nor_deadlock(schema: Schema) -> None:
    await migrate(schema.conn)
    directories = [PostgresDirectory(schema.dsn, server_settings=schema.settings)
                   for _ in range(3)]
    try:
        await asyncio.gather(*(d.load(FIXTURE) for d in directories for _ in range(2)))
        first = await dump(schema.conn)
        await directories[0].load(FIXTURE)
        assert await dump(schema.conn) == first
    finally:
        for directory in directories:
            await directory.close()
