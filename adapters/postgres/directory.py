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
from typing import TYPE_CHECKING, Literal, Self, TypeAlias, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from adapters.postgres import sql
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
        row = await self._fetchrow("get_user", sql.GET_USER, user_id)
        return None if row is None else _user(row)

    async def find_user(self, id_or_username: str) -> User | None:
        row = await self._fetchrow("find_user", sql.FIND_USER, id_or_username)
        return None if row is None else _user(row)

    async def get_user_servers(self, user_id: UserId) -> list[Server]:
        rows = await self._fetch("get_user_servers", sql.GET_USER_SERVERS, user_id)
        return [_server(row) for row in rows]

    async def get_server_context(self, server_id: ServerId) -> ServerContext | None:
        row = await self._fetchrow("get_server_context", sql.GET_SERVER_CONTEXT, server_id)
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
        row = await self._fetchrow("get_channel", sql.GET_CHANNEL, channel_id)
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
        rows = await self._fetch("get_members", sql.GET_MEMBERS, server_id, list(set(user_ids)))
        return {
            row["user_id"]: Member(server_id=server_id, user_id=row["user_id"],
                                   role_ids=tuple(row["role_ids"]))
            for row in rows
        }

    async def set_user_status(self, user_id: UserId, status: Status) -> None:
        value = Status(status).value

        async def op(conn: Connection, remaining: Callable[[], float]) -> None:
            await conn.execute(sql.SET_USER_STATUS, user_id, value, timeout=remaining())

        await self._run("set_user_status", op)

    async def load(self, data: DirectoryData) -> None:
        """Upsert a whole fixture in one transaction; loading the same data twice
        changes nothing. The loaded members' roles and the loaded channels'
        overwrites become exactly the fixture's; nothing absent from the fixture is
        deleted. Raises :class:`DirectoryLoadError` when the data does not fit."""
        statements = sql.load_statements(data)

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
                  icon_url=row["icon_url"], member_count=row["member_count"])


def _overwrites(records: Sequence[tuple[str, str, int, int]]) -> tuple[Overwrite, ...]:
    result = []
    for target_id, target_type, allow, deny in records:
        kind: Literal["role", "member"] = "role" if target_type == "role" else "member"
        result.append(Overwrite(id=target_id, type=kind, allow=allow, deny=deny))
    return tuple(result)
