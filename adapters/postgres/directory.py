"""The directory in Postgres (asyncpg): users, servers, members, roles, channels.

Every read is one round trip: related rows come back as arrays of anonymous
records (``ARRAY(SELECT ROW(...))``), which asyncpg decodes to tuples in binary,
so nothing is parsed from JSON and integers stay exact. The SQL text is constant,
so asyncpg prepares each statement once per connection and reuses it from its
statement cache.

Failures: every call is bounded by ``command_timeout`` (acquiring a connection,
connecting if needed, and the query itself all count against it). A timeout, a
refused or lost connection, or Postgres shutting down raises
:class:`~domain.ports.BackendUnavailable`. A call that got a connection which broke
while idle in the pool (Postgres restarted, ``pg_terminate_backend``) is retried
on a fresh one, so a restart costs callers nothing once Postgres answers again
(every call is idempotent: reads, a status write, a load in one transaction). The
pool is created lazily when :meth:`PostgresDirectory.start` could not reach
Postgres: the gateway starts while Postgres is down and the directory works as soon
as it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self, TypeAlias, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from domain.model import (
    Channel,
    ChannelId,
    DirectoryData,
    Member,
    Overwrite,
    Role,
    Server,
    ServerContext,
    ServerId,
    Status,
    User,
    UserId,
)
from domain.ports import BackendUnavailable

T = TypeVar("T")
Connection: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"

#: Errors that mean "Postgres is not there right now", as opposed to a bad query.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable, DNS (socket.gaierror)
    TimeoutError,  # asyncio.TimeoutError is the same class since 3.11
    asyncpg.PostgresConnectionError,  # class 08, including "connection does not exist"
    asyncpg.exceptions.OperatorInterventionError,  # 57: admin/crash shutdown, canceled
    asyncpg.exceptions.InsufficientResourcesError,  # 53: too many connections, disk full
    asyncpg.exceptions.InterfaceError,  # "connection is closed", "pool is closing"
    asyncpg.exceptions.InternalClientError,  # a connection broken mid-protocol
)

#: Errors after which the same call is retried at once on another connection: the
#: connection it got had broken while idle in the pool (Postgres restarted, the
#: backend was terminated), as opposed to "Postgres is slow" or "refused". The pool
#: discards such a connection when it is released, so each retry costs at most one
#: stale connection. (InternalClientError is what asyncpg raises when it got the
#: server's FATAL message but not yet the end of the stream: "cannot switch to
#: state ...; another operation is in progress".)
_STALE_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.InternalClientError,
    ConnectionResetError,
    BrokenPipeError,
)


if TYPE_CHECKING:
    _BaseConnection = asyncpg.Connection[asyncpg.Record]
else:  # not generic at run time
    _BaseConnection = asyncpg.Connection


class _Connection(_BaseConnection):
    """A pooled connection released without asyncpg's reset query.

    By default asyncpg runs ``SELECT pg_advisory_unlock_all(); CLOSE ALL;
    UNLISTEN *; RESET ALL`` whenever a connection goes back to the pool: one more
    round trip per call, which would double the cost of a read. The directory
    leaves no session state behind (no SET, LISTEN, cursor or advisory lock; its
    one SET is transaction-local), and an unfinished transaction is still rolled
    back on release.
    """

    def get_reset_query(self) -> str:
        return ""


class DirectoryLoadError(ValueError):
    """A fixture does not fit the schema (a dangling reference, a duplicate
    username, a permission that does not fit in 64 bits)."""


# --- Reads -----------------------------------------------------------------------

_GET_USER = "SELECT id, username, display_name, avatar_url FROM users WHERE id = $1"

# An exact id wins over someone else's equal username.
_FIND_USER = """
SELECT id, username, display_name, avatar_url
FROM users
WHERE id = $1 OR username = $1
ORDER BY id = $1 DESC
LIMIT 1
"""

_GET_USER_SERVERS = """
SELECT s.id, s.name, s.owner_id, s.icon_url
FROM server_members m
JOIN servers s ON s.id = m.server_id
WHERE m.user_id = $1
ORDER BY s.id COLLATE "C"
"""

_OVERWRITES_OF_C = """
ARRAY(
    SELECT ROW(o.target_id, o.target_type, o.allow, o.deny)
    FROM channel_overwrites o
    WHERE o.channel_id = c.id
    ORDER BY o.target_type, o.target_id
)
"""

_GET_SERVER_CONTEXT = f"""
SELECT s.id, s.name, s.owner_id, s.icon_url,
       ARRAY(
           SELECT ROW(r.id, r.name, r.permissions)
           FROM roles r
           WHERE r.server_id = s.id
           ORDER BY r.id
       ) AS roles,
       ARRAY(
           SELECT ROW(c.id, c.name, c.type, {_OVERWRITES_OF_C})
           FROM channels c
           WHERE c.server_id = s.id
           ORDER BY c.id
       ) AS channels
FROM servers s
WHERE s.id = $1
"""

_GET_CHANNEL = f"""
SELECT c.id, c.server_id, c.name, c.type, {_OVERWRITES_OF_C} AS overwrites
FROM channels c
WHERE c.id = $1
"""

_GET_MEMBERS = """
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

_SET_USER_STATUS = "UPDATE users SET status = $2 WHERE id = $1 AND status <> $2"

# Upserts rewrite a row only when something changed, so that loading the same
# fixture again writes nothing.
_UPSERT_USERS = """
INSERT INTO users AS t (id, username, display_name, avatar_url)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
ON CONFLICT (id) DO UPDATE
SET username = excluded.username,
    display_name = excluded.display_name,
    avatar_url = excluded.avatar_url
WHERE (t.username, t.display_name, t.avatar_url)
      IS DISTINCT FROM (excluded.username, excluded.display_name, excluded.avatar_url)
"""

_UPSERT_SERVERS = """
INSERT INTO servers AS t (id, name, owner_id, icon_url)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
ON CONFLICT (id) DO UPDATE
SET name = excluded.name, owner_id = excluded.owner_id, icon_url = excluded.icon_url
WHERE (t.name, t.owner_id, t.icon_url)
      IS DISTINCT FROM (excluded.name, excluded.owner_id, excluded.icon_url)
"""

_UPSERT_ROLES = """
INSERT INTO roles AS t (id, server_id, name, permissions)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[])
ON CONFLICT (id) DO UPDATE
SET server_id = excluded.server_id, name = excluded.name, permissions = excluded.permissions
WHERE (t.server_id, t.name, t.permissions)
      IS DISTINCT FROM (excluded.server_id, excluded.name, excluded.permissions)
"""

_INSERT_MEMBERS = """
INSERT INTO server_members (server_id, user_id)
SELECT * FROM unnest($1::text[], $2::text[])
ON CONFLICT DO NOTHING
"""

# The loaded members' roles become exactly the fixture's: drop the others...
_DELETE_STALE_MEMBER_ROLES = """
DELETE FROM member_roles AS mr
USING unnest($1::text[], $2::text[]) AS m(server_id, user_id)
WHERE mr.server_id = m.server_id AND mr.user_id = m.user_id
  AND (mr.server_id, mr.user_id, mr.role_id) NOT IN (
      SELECT * FROM unnest($3::text[], $4::text[], $5::text[])
  )
"""

# ... and add the missing ones.
_INSERT_MEMBER_ROLES = """
INSERT INTO member_roles (server_id, user_id, role_id)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
ON CONFLICT DO NOTHING
"""

_UPSERT_CHANNELS = """
INSERT INTO channels AS t (id, server_id, name, type)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
ON CONFLICT (id) DO UPDATE
SET server_id = excluded.server_id, name = excluded.name, type = excluded.type
WHERE (t.server_id, t.name, t.type)
      IS DISTINCT FROM (excluded.server_id, excluded.name, excluded.type)
"""

# Same for the loaded channels' overwrites.
_DELETE_STALE_OVERWRITES = """
DELETE FROM channel_overwrites AS o
WHERE o.channel_id = ANY($1::text[])
  AND (o.channel_id, o.target_id, o.target_type) NOT IN (
      SELECT * FROM unnest($2::text[], $3::text[], $4::text[])
  )
"""

_UPSERT_OVERWRITES = """
INSERT INTO channel_overwrites AS t (channel_id, target_id, target_type, allow, deny)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[])
ON CONFLICT (channel_id, target_id, target_type) DO UPDATE
SET allow = excluded.allow, deny = excluded.deny
WHERE (t.allow, t.deny) IS DISTINCT FROM (excluded.allow, excluded.deny)
"""


class PostgresDirectory:
    """:class:`domain.ports.Directory` on an asyncpg pool.

    Use ``await PostgresDirectory.connect(dsn)`` or ``PostgresDirectory(dsn)`` then
    ``await start()`` (both raise :class:`BackendUnavailable` when Postgres is
    down), or ``async with PostgresDirectory(dsn)`` (which does not); end with
    :meth:`close`. Calls made while the pool could not be opened try again. The
    schema must have been migrated (:func:`adapters.postgres.migrations.migrate`).
    """

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        command_timeout: float = 5.0,
        connect_timeout: float | None = None,
        load_timeout: float = 120.0,
        statement_cache_size: int = 256,
        server_settings: Mapping[str, str] | None = None,
    ) -> None:
        """``command_timeout`` bounds every call (seconds); ``connect_timeout``
        bounds opening one connection (default: ``command_timeout``);
        ``load_timeout`` bounds :meth:`load`, which may be big. ``server_settings``
        are sent on every connection (for example ``{"search_path": "tenant"}``)."""
        if command_timeout <= 0 or load_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if statement_cache_size <= 0:
            raise ValueError("statement_cache_size must be positive: statements are prepared")
        self._dsn = dsn
        self._min_size = min_size
        self._max_size = max_size
        self._timeout = command_timeout
        self._connect_timeout = connect_timeout if connect_timeout is not None else command_timeout
        self._load_timeout = load_timeout
        self._statement_cache_size = statement_cache_size
        self._server_settings = {"application_name": "chat-gateway", **(server_settings or {})}
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._pool_lock = asyncio.Lock()
        self._closed = False

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        command_timeout: float = 5.0,
        connect_timeout: float | None = None,
        load_timeout: float = 120.0,
        statement_cache_size: int = 256,
        server_settings: Mapping[str, str] | None = None,
    ) -> PostgresDirectory:
        """Create the directory and open its pool at once."""
        directory = cls(
            dsn, min_size=min_size, max_size=max_size, command_timeout=command_timeout,
            connect_timeout=connect_timeout, load_timeout=load_timeout,
            statement_cache_size=statement_cache_size, server_settings=server_settings,
        )
        await directory.start()
        return directory

    # --- Lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Open the pool. Raises :class:`BackendUnavailable` when Postgres does not
        answer; the directory stays usable and each later call tries again."""
        loop = asyncio.get_running_loop()
        try:
            await self._get_pool(loop.time() + self._connect_timeout)
        except UNAVAILABLE_ERRORS as exc:
            raise self._unavailable("connect", exc, self._connect_timeout) from exc

    async def close(self) -> None:
        """Close the pool (waits up to ``command_timeout`` for calls in flight, then
        terminates). Later calls raise :class:`BackendUnavailable`."""
        self._closed = True
        async with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), self._timeout)
        except UNAVAILABLE_ERRORS:
            pool.terminate()  # calls still in flight, or Postgres gone: let go anyway
        except asyncio.CancelledError:
            pool.terminate()
            raise

    async def __aenter__(self) -> Self:
        """Try to open the pool, but enter even when Postgres is down (a gateway
        starts anyway and reports not ready): calls then connect lazily."""
        with contextlib.suppress(BackendUnavailable):
            await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _get_pool(self, deadline: float) -> asyncpg.Pool[asyncpg.Record]:
        pool = self._pool
        if pool is not None:
            return pool
        if self._closed:
            raise BackendUnavailable("postgres directory is closed")
        async with asyncio.timeout_at(deadline), self._pool_lock:
            if self._pool is None:
                if self._closed:
                    raise BackendUnavailable("postgres directory is closed")
                self._pool = await asyncpg.create_pool(
                    self._dsn,
                    min_size=self._min_size,
                    max_size=self._max_size,
                    timeout=self._connect_timeout,
                    command_timeout=self._timeout,
                    statement_cache_size=self._statement_cache_size,
                    server_settings=self._server_settings,
                    connection_class=_Connection,
                )
            return self._pool

    async def _run(
        self,
        what: str,
        operation: Callable[[Connection, Callable[[], float]], Awaitable[T]],
        *,
        time_limit: float | None = None,
    ) -> T:
        """Run ``operation(connection, remaining)`` within the call's deadline,
        where ``remaining()`` is the time left for its next statement; map
        outages to :class:`BackendUnavailable`."""
        loop = asyncio.get_running_loop()
        limit = time_limit if time_limit is not None else self._timeout
        deadline = loop.time() + limit

        def remaining() -> float:
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError
            return left

        # Every pooled connection may be stale after an outage; one more try than that.
        retries = self._max_size
        while True:
            try:
                pool = await self._get_pool(deadline)
                async with pool.acquire(timeout=remaining()) as conn:
                    return await operation(conn, remaining)
            except _STALE_CONNECTION_ERRORS as exc:
                if retries <= 0 or deadline - loop.time() <= 0:
                    raise self._unavailable(what, exc, limit) from exc
                retries -= 1
            except UNAVAILABLE_ERRORS as exc:
                raise self._unavailable(what, exc, limit) from exc

    @staticmethod
    def _unavailable(what: str, exc: BaseException, limit: float) -> BackendUnavailable:
        if isinstance(exc, TimeoutError):
            reason = f"no answer within {limit:g}s"
        else:
            reason = f"{type(exc).__name__}: {exc}"
        return BackendUnavailable(f"postgres directory: {what} failed: {reason}")

    async def _fetch(self, what: str, query: str, *args: object) -> list[asyncpg.Record]:
        async def op(conn: Connection, remaining: Callable[[], float]) -> list[asyncpg.Record]:
            return await conn.fetch(query, *args, timeout=remaining())

        return await self._run(what, op)

    async def _fetchrow(self, what: str, query: str, *args: object) -> asyncpg.Record | None:
        async def op(conn: Connection, remaining: Callable[[], float]) -> asyncpg.Record | None:
            return await conn.fetchrow(query, *args, timeout=remaining())

        return await self._run(what, op)

    # --- The Directory port ------------------------------------------------------

    async def get_user(self, user_id: UserId) -> User | None:
        row = await self._fetchrow("get_user", _GET_USER, user_id)
        return None if row is None else _user(row)

    async def find_user(self, id_or_username: str) -> User | None:
        row = await self._fetchrow("find_user", _FIND_USER, id_or_username)
        return None if row is None else _user(row)

    async def get_user_servers(self, user_id: UserId) -> list[Server]:
        rows = await self._fetch("get_user_servers", _GET_USER_SERVERS, user_id)
        return [_server(row) for row in rows]

    async def get_server_context(self, server_id: ServerId) -> ServerContext | None:
        row = await self._fetchrow("get_server_context", _GET_SERVER_CONTEXT, server_id)
        if row is None:
            return None
        roles = {
            rid: Role(id=rid, server_id=server_id, name=name, permissions=permissions)
            for rid, name, permissions in row["roles"]
        }
        channels = {
            cid: Channel(id=cid, server_id=server_id, name=name, type=kind,
                         overwrites=_overwrites(overwrites))
            for cid, name, kind, overwrites in row["channels"]
        }
        return ServerContext(server=_server(row), roles=roles, channels=channels)

    async def get_channel(self, channel_id: ChannelId) -> Channel | None:
        row = await self._fetchrow("get_channel", _GET_CHANNEL, channel_id)
        if row is None:
            return None
        return Channel(id=row["id"], server_id=row["server_id"], name=row["name"],
                       type=row["type"], overwrites=_overwrites(row["overwrites"]))

    async def get_members(
        self, server_id: ServerId, user_ids: Collection[UserId]
    ) -> Mapping[UserId, Member]:
        """The members among ``user_ids`` (absent ids are not members), with their
        role ids in id order."""
        if not user_ids:
            return {}
        rows = await self._fetch("get_members", _GET_MEMBERS, server_id, list(set(user_ids)))
        return {
            row["user_id"]: Member(server_id=server_id, user_id=row["user_id"],
                                   role_ids=tuple(row["role_ids"]))
            for row in rows
        }

    async def set_user_status(self, user_id: UserId, status: Status) -> None:
        value = Status(status).value

        async def op(conn: Connection, remaining: Callable[[], float]) -> None:
            await conn.execute(_SET_USER_STATUS, user_id, value, timeout=remaining())

        await self._run("set_user_status", op)

    async def load(self, data: DirectoryData) -> None:
        """Upsert a whole fixture in one transaction; loading the same data twice
        changes nothing. The loaded members' roles and the loaded channels'
        overwrites become exactly the fixture's; nothing absent from the fixture is
        deleted. Raises :class:`DirectoryLoadError` when the data does not fit."""
        statements = _load_statements(data)

        async def op(conn: Connection, remaining: Callable[[], float]) -> None:
            async with conn.transaction():
                await conn.execute("SET CONSTRAINTS users_username_key DEFERRED",
                                   timeout=remaining())
                for query, args in statements:
                    await conn.execute(query, *args, timeout=remaining())

        try:
            await self._run("load", op, time_limit=self._load_timeout)
        except (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError) as exc:
            raise DirectoryLoadError(f"the fixture does not fit the directory: {exc}") from exc

    async def ping(self) -> None:
        async def op(conn: Connection, remaining: Callable[[], float]) -> None:
            await conn.fetchval("SELECT 1", timeout=remaining())

        await self._run("ping", op)


# --- Rows to domain objects --------------------------------------------------------


def _user(row: asyncpg.Record) -> User:
    return User(id=row["id"], username=row["username"], display_name=row["display_name"],
                avatar_url=row["avatar_url"])


def _server(row: asyncpg.Record) -> Server:
    return Server(id=row["id"], name=row["name"], owner_id=row["owner_id"],
                  icon_url=row["icon_url"])


def _overwrites(records: Sequence[tuple[str, str, int, int]]) -> tuple[Overwrite, ...]:
    result = []
    for target_id, target_type, allow, deny in records:
        kind: Literal["role", "member"] = "role" if target_type == "role" else "member"
        result.append(Overwrite(id=target_id, type=kind, allow=allow, deny=deny))
    return tuple(result)


# --- A fixture to statements -------------------------------------------------------


def _columns(rows: Sequence[tuple[Any, ...]], width: int) -> tuple[list[Any], ...]:
    """Rows to one list per column (the arguments of ``unnest``)."""
    return tuple([row[i] for row in rows] for i in range(width))


def _load_statements(data: DirectoryData) -> list[tuple[str, tuple[list[Any], ...]]]:
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
        (_UPSERT_USERS,
         _columns([(u.id, u.username, u.display_name, u.avatar_url) for u in users], 4)),
        (_UPSERT_SERVERS,
         _columns([(s.id, s.name, s.owner_id, s.icon_url) for s in servers], 4)),
        (_UPSERT_ROLES,
         _columns([(r.id, r.server_id, r.name, r.permissions) for r in roles], 4)),
        (_INSERT_MEMBERS, member_keys),
        (_DELETE_STALE_MEMBER_ROLES, member_keys + member_role_cols),
        (_INSERT_MEMBER_ROLES, member_role_cols),
        (_UPSERT_CHANNELS,
         _columns([(c.id, c.server_id, c.name, c.type) for c in channels], 4)),
        (_DELETE_STALE_OVERWRITES, ([c.id for c in channels], *overwrite_cols[:3])),
        (_UPSERT_OVERWRITES, overwrite_cols),
    ]
    # A statement whose first column is empty has nothing to do.
    return [(query, args) for query, args in statements if args[0]]
