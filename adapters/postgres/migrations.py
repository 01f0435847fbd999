"""Schema migrations: numbered ``.sql`` files, each applied once, in order.

The files live in the ``migrations/`` directory next to this module and ship as
package data; their names are ``NNNN_description.sql`` and the number is the
version. ``migrate`` records what it applied in ``schema_migrations`` (in the
current schema, that is the first one of ``search_path``) and applies each pending
file in its own transaction, so a failed file leaves the versions before it
applied and itself not at all.

Two processes migrating the same schema at once are safe: ``migrate`` holds a
session-level advisory lock, keyed by the schema name, from the moment it reads
``schema_migrations`` until it is done, so the second one waits and then finds
nothing left to do.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from adapters.postgres.directory import UNAVAILABLE_ERRORS
from domain.ports import BackendUnavailable

Connection: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"

#: First key of the advisory lock (the second is a hash of the schema name): "gate".
LOCK_CLASS = 0x67617465

_FILE_NAME = re.compile(r"^(?P<version>\d+)_(?P<name>\w+)\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
_LOCK = "SELECT pg_advisory_lock($1, hashtext(coalesce(current_schema(), '')))"
_UNLOCK = "SELECT pg_advisory_unlock($1, hashtext(coalesce(current_schema(), '')))"


class MigrationError(Exception):
    """The migration files are inconsistent (a bad name, a duplicate version)."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def available_migrations() -> list[Migration]:
    """Every migration shipped with the package, in version order."""
    root = resources.files(__package__ or "adapters.postgres").joinpath("migrations")
    found: dict[int, Migration] = {}
    for entry in root.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE_NAME.match(entry.name)
        if match is None:
            raise MigrationError(f"migration file {entry.name!r} is not named NNNN_name.sql")
        version = int(match["version"])
        if version in found:
            raise MigrationError(f"two migration files have version {version}")
        found[version] = Migration(version, match["name"], entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


async def migrate(
    target: str | asyncpg.Connection[Any] | PoolConnectionProxy[Any] | asyncpg.Pool[Any],
    *,
    server_settings: dict[str, str] | None = None,
    statement_timeout: float = 60.0,
) -> list[int]:
    """Apply the pending migrations; return the versions applied now (``[]`` when
    the schema was up to date).

    ``target`` is a DSN (a connection is opened and closed, with
    ``server_settings`` such as ``{"search_path": "my_schema"}``), a connection, or
    a pool (one of its connections is used). ``statement_timeout`` bounds every
    statement, including the wait for another instance's migration. Raises
    :class:`BackendUnavailable` when Postgres cannot be reached.
    """
    if isinstance(target, str):
        try:
            conn = await asyncpg.connect(
                target, timeout=statement_timeout, server_settings=server_settings
            )
        except UNAVAILABLE_ERRORS as exc:
            raise BackendUnavailable(f"postgres: cannot connect to migrate: {exc!r}") from exc
        try:
            return await _migrate(conn, statement_timeout)
        finally:
            await conn.close(timeout=statement_timeout)
    if isinstance(target, asyncpg.Pool):
        try:
            async with target.acquire(timeout=statement_timeout) as pooled:
                return await _migrate(pooled, statement_timeout)
        except UNAVAILABLE_ERRORS as exc:
            raise BackendUnavailable(f"postgres: cannot connect to migrate: {exc!r}") from exc
    return await _migrate(target, statement_timeout)


async def _migrate(conn: Connection, statement_timeout: float) -> list[int]:
    migrations = available_migrations()
    try:
        await conn.execute(_LOCK, LOCK_CLASS, timeout=statement_timeout)
    except UNAVAILABLE_ERRORS as exc:
        raise BackendUnavailable(f"postgres: migration lock: {exc!r}") from exc
    try:
        await conn.execute(_CREATE_TABLE, timeout=statement_timeout)
        rows = await conn.fetch("SELECT version FROM schema_migrations", timeout=statement_timeout)
        done = {int(row["version"]) for row in rows}
        applied: list[int] = []
        for migration in migrations:
            if migration.version in done:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql, timeout=statement_timeout)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version, migration.name, timeout=statement_timeout,
                )
            applied.append(migration.version)
        return applied
    except UNAVAILABLE_ERRORS as exc:
        raise BackendUnavailable(f"postgres: migration interrupted: {exc!r}") from exc
    finally:
        # A session lock also ends with the session, so a broken connection is fine.
        if not conn.is_closed():
            with contextlib.suppress(*UNAVAILABLE_ERRORS):
                await conn.execute(_UNLOCK, LOCK_CLASS, timeout=statement_timeout)


async def applied_versions(conn: Connection, *, statement_timeout: float = 10.0) -> list[int]:
    """The versions recorded in ``schema_migrations`` (``[]`` before any migration)."""
    exists = await conn.fetchval(
        "SELECT to_regclass('schema_migrations') IS NOT NULL", timeout=statement_timeout
    )
    if not exists:
        return []
    rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version",
                            timeout=statement_timeout)
    return [int(row["version"]) for row in rows]
