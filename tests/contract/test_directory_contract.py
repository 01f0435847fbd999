"""The Directory port's contract, run against every adapter of it.

The same tests run against ``MemoryDirectory`` and ``PostgresDirectory`` (a real
Postgres, in a schema of its own created for this module and dropped afterwards).
Where the adapters may legitimately differ the tests compare loosely: role ids of a
member and the overwrites of a channel are compared as sets.

At the end, tests of what only the Postgres adapter has: surviving terminated
connections and statement timeouts.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from adapters.memory import MemoryDirectory
from adapters.postgres import PostgresDirectory, migrate
from domain.model import (
    Channel,
    DirectoryData,
    Member,
    Overwrite,
    Role,
    Server,
    ServerContext,
    Status,
    User,
)
from domain.ports import BackendUnavailable, Directory
from tests.support.net import TcpProxy, free_port

ALL_BITS = (1 << 53) - 1

DATA = DirectoryData(
    users=(
        User("u1", "alice", "Alice", "https://example.test/a.png"),
        User("u2", "bob", "Bob"),
        User("u3", "carol"),
        User("u4", "dave", "Dave"),  # a member of nothing
        User("u5", "u1", "Mallory"),  # a username equal to another user's id
    ),
    servers=(
        Server("s1", "Home", "u1", "https://example.test/s1.png"),
        Server("s2", "Work", "u2"),
        Server("s10", "Ten", "u2"),
        Server("S3", "Capital", "u3"),  # sorts before every "s..." in code point order
    ),
    roles=(
        Role("s1", "s1", "@everyone", 3072),
        Role("r-mod", "s1", "moderator", 1 << 4),
        Role("r-admin", "s1", "admin", 1 << 3),
        Role("r-all", "s1", "everything", ALL_BITS),
        Role("s2", "s2", "@everyone", 1024),
    ),
    members=(
        Member("s1", "u1"),
        Member("s1", "u2", ("r-mod", "r-admin")),
        Member("s1", "u3", ("r-mod",)),
        Member("s2", "u2"),
        Member("s2", "u1"),
        Member("s10", "u1"),
        Member("S3", "u1"),
        Member("S3", "u3"),
        Member("s1", "u5", ("r-all",)),
    ),
    channels=(
        Channel("c1", "s1", "general", "text", (
            Overwrite("s1", "role", allow=0, deny=1024),
            Overwrite("r-mod", "role", allow=1024, deny=0),
            Overwrite("u3", "member", allow=1024, deny=2048),
            Overwrite("u3", "role", allow=1, deny=2),  # same id, other type: distinct
        )),
        Channel("c2", "s1", "voice", "voice"),
        Channel("c3", "s2", "work", "text", (Overwrite("s2", "role", allow=2048, deny=0),)),
    ),
)

TABLES = ("channel_overwrites", "channels", "member_roles", "roles", "server_members",
          "servers", "users")


# --- Subjects ----------------------------------------------------------------------


@dataclass
class Subject:
    """A directory under test, with what the contract needs to see behind it."""

    kind: str
    directory: Directory
    #: The status stored for a user (None when nothing was stored).
    stored_status: Callable[[str], Awaitable[Status | None]]
    #: End a membership the way the directory's owners do (not a port method).
    remove_member: Callable[[str, str], Awaitable[None]]


def _with_port(port: int) -> str:
    return f"postgresql://postgres@127.0.0.1:{port}/nowhere"


async def _admin(database_url: str, schema: str | None = None) -> asyncpg.Connection[Any]:
    settings = {"search_path": schema} if schema else None
    return await asyncpg.connect(database_url, server_settings=settings, timeout=10)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pg_schema(database_url: str) -> AsyncIterator[str]:
    """A migrated schema of this module's own, dropped at the end."""
    schema = f"test_contract_{uuid.uuid4().hex[:12]}"
    conn = await _admin(database_url)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        await migrate(database_url, server_settings={"search_path": schema})
        yield schema
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


@pytest.fixture
async def proxy(database_url: str) -> AsyncIterator[TcpProxy]:
    flaky = TcpProxy.for_url(database_url, 5432, listen_port=free_port())
    await flaky.up()
    try:
        yield flaky
    finally:
        await flaky.down()


@pytest.fixture
async def pg_conn(database_url: str, pg_schema: str) -> AsyncIterator[asyncpg.Connection[Any]]:
    """A plain connection to the module's schema, emptied for each test."""
    conn = await _admin(database_url, pg_schema)
    try:
        await conn.execute(f"TRUNCATE {', '.join(TABLES)}")
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def postgres_directory(
    database_url: str, pg_schema: str, pg_conn: asyncpg.Connection[Any]
) -> AsyncIterator[PostgresDirectory]:
    directory = await PostgresDirectory.connect(
        database_url, max_size=4, command_timeout=5.0,
        server_settings={"search_path": pg_schema},
    )
    try:
        yield directory
    finally:
        await directory.close()


@pytest.fixture(params=["memory", "postgres"])
def subject(request: pytest.FixtureRequest) -> Subject:
    """An empty directory of each kind."""
    if request.param == "memory":
        memory = MemoryDirectory()

        async def memory_status(user_id: str) -> Status | None:
            return memory.statuses.get(user_id)

        async def memory_remove(server_id: str, user_id: str) -> None:
            memory.remove_member(server_id, user_id)

        return Subject("memory", memory, memory_status, memory_remove)

    directory: PostgresDirectory = request.getfixturevalue("postgres_directory")
    conn: asyncpg.Connection[Any] = request.getfixturevalue("pg_conn")

    async def postgres_status(user_id: str) -> Status | None:
        value = await conn.fetchval("SELECT status FROM users WHERE id = $1", user_id)
        return None if value is None else Status(value)

    async def postgres_remove(server_id: str, user_id: str) -> None:
        await conn.execute(
            "DELETE FROM server_members WHERE server_id = $1 AND user_id = $2", server_id, user_id
        )

    return Subject("postgres", directory, postgres_status, postgres_remove)


@pytest.fixture
async def loaded(subject: Subject) -> Directory:
    await subject.directory.load(DATA)
    return subject.directory


# --- Normalised views (where adapters may order things differently) ------------------


def _channel_view(channel: Channel) -> tuple[Any, ...]:
    return (channel.id, channel.server_id, channel.name, channel.type,
            frozenset(channel.overwrites))


def _context_view(context: ServerContext | None) -> tuple[Any, ...] | None:
    if context is None:
        return None
    assert all(rid == role.id for rid, role in context.roles.items())
    assert all(cid == ch.id for cid, ch in context.channels.items())
    return (context.server, context.roles,
            {cid: _channel_view(ch) for cid, ch in context.channels.items()})


def _member_view(members: Any) -> dict[str, tuple[str, str, frozenset[str]]]:
    return {uid: (m.server_id, m.user_id, frozenset(m.role_ids)) for uid, m in members.items()}


async def snapshot(directory: Directory, data: DirectoryData) -> dict[str, Any]:
    """Everything the port shows about the entities of ``data``."""
    user_ids = sorted({u.id for u in data.users} | {m.user_id for m in data.members})
    server_ids = sorted({s.id for s in data.servers})
    return {
        "users": {uid: await directory.get_user(uid) for uid in user_ids},
        "servers_of": {uid: await directory.get_user_servers(uid) for uid in user_ids},
        "contexts": {sid: _context_view(await directory.get_server_context(sid))
                     for sid in server_ids},
        "channels": {c.id: _channel_view(ch) if (ch := await directory.get_channel(c.id))
                     else None for c in data.channels},
        "members": {sid: _member_view(await directory.get_members(sid, user_ids))
                    for sid in server_ids},
        # Server equality leaves the count out: compared here on its own.
        "member_counts": {sid: ctx.server.member_count if
                          (ctx := await directory.get_server_context(sid)) else None
                          for sid in server_ids},
    }


# --- Users -------------------------------------------------------------------------


async def test_get_user(loaded: Directory) -> None:
    assert await loaded.get_user("u1") == User("u1", "alice", "Alice",
                                                "https://example.test/a.png")
    assert await loaded.get_user("u3") == User("u3", "carol", None, None)
    assert await loaded.get_user("nobody") is None
    assert await loaded.get_user("alice") is None  # ids only


async def test_find_user_by_id_and_by_username(loaded: Directory) -> None:
    bob = User("u2", "bob", "Bob")
    assert await loaded.find_user("u2") == bob
    assert await loaded.find_user("bob") == bob
    assert await loaded.find_user("nobody") is None
    assert await loaded.find_user("") is None


async def test_find_user_prefers_the_id_over_a_username(loaded: Directory) -> None:
    found = await loaded.find_user("u1")  # u1's id, and u5's username
    assert found is not None and found.id == "u1"
    assert await loaded.find_user("Alice") is None  # usernames are case-sensitive


async def test_empty_directory(subject: Subject) -> None:
    directory = subject.directory
    assert await directory.get_user("u1") is None
    assert await directory.find_user("alice") is None
    assert await directory.get_user_servers("u1") == []
    assert await directory.get_server_context("s1") is None
    assert await directory.get_channel("c1") is None
    assert await directory.get_members("s1", ["u1"]) == {}


# --- Servers -------------------------------------------------------------------------


async def test_get_user_servers_sorted_by_id(loaded: Directory) -> None:
    servers = await loaded.get_user_servers("u1")
    assert [s.id for s in servers] == ["S3", "s1", "s10", "s2"]  # code point order
    assert servers[1] == Server("s1", "Home", "u1", "https://example.test/s1.png")
    assert [s.id for s in await loaded.get_user_servers("u2")] == ["s1", "s2"]


async def test_get_user_servers_of_a_non_member_is_empty(loaded: Directory) -> None:
    assert await loaded.get_user_servers("u4") == []
    assert await loaded.get_user_servers("nobody") == []


async def test_get_server_context(loaded: Directory) -> None:
    context = await loaded.get_server_context("s1")
    assert context is not None
    assert context.server == Server("s1", "Home", "u1", "https://example.test/s1.png")
    assert context.roles == {r.id: r for r in DATA.roles if r.server_id == "s1"}
    assert context.roles["r-all"].permissions == ALL_BITS  # 53 bits survive
    assert set(context.channels) == {"c1", "c2"}
    assert _channel_view(context.channels["c1"]) == _channel_view(DATA.channels[0])
    assert context.channels["c2"] == Channel("c2", "s1", "voice", "voice", ())


async def test_get_server_context_without_roles_or_channels(loaded: Directory) -> None:
    assert await loaded.get_server_context("S3") == ServerContext(
        server=Server("S3", "Capital", "u3"), roles={}, channels={}
    )


async def test_get_server_context_of_an_unknown_server(loaded: Directory) -> None:
    assert await loaded.get_server_context("nowhere") is None
    assert await loaded.get_server_context("c1") is None  # a channel id is no server id


# --- Channels ------------------------------------------------------------------------


async def test_get_channel(loaded: Directory) -> None:
    c1 = await loaded.get_channel("c1")
    assert c1 is not None
    assert _channel_view(c1) == _channel_view(DATA.channels[0])
    assert await loaded.get_channel("c3") == DATA.channels[2]
    assert await loaded.get_channel("nowhere") is None


# --- Members -------------------------------------------------------------------------


async def test_get_members_batched(loaded: Directory) -> None:
    members = await loaded.get_members("s1", ["u1", "u2", "u3", "u4", "nobody"])
    assert _member_view(members) == {
        "u1": ("s1", "u1", frozenset()),
        "u2": ("s1", "u2", frozenset({"r-mod", "r-admin"})),
        "u3": ("s1", "u3", frozenset({"r-mod"})),
    }
    assert all(isinstance(m.role_ids, tuple) for m in members.values())


async def test_get_members_of_other_servers(loaded: Directory) -> None:
    assert _member_view(await loaded.get_members("s2", {"u1", "u2", "u3"})) == {
        "u1": ("s2", "u1", frozenset()),
        "u2": ("s2", "u2", frozenset()),
    }
    assert await loaded.get_members("nowhere", ["u1"]) == {}
    assert await loaded.get_members("s1", []) == {}
    assert await loaded.get_members("s1", ["u4"]) == {}


async def test_get_members_with_repeated_ids(loaded: Directory) -> None:
    members = await loaded.get_members("s1", ["u3", "u3"])
    assert _member_view(members) == {"u3": ("s1", "u3", frozenset({"r-mod"}))}


# --- Loading ---------------------------------------------------------------------------


async def test_load_shows_the_whole_fixture(loaded: Directory) -> None:
    view = await snapshot(loaded, DATA)
    assert view["users"]["u5"] == User("u5", "u1", "Mallory")
    assert view["members"]["s1"]["u5"] == ("s1", "u5", frozenset({"r-all"}))
    assert view["channels"]["c2"] == ("c2", "s1", "voice", "voice", frozenset())


async def test_load_twice_is_idempotent(loaded: Directory) -> None:
    before = await snapshot(loaded, DATA)
    await loaded.load(DATA)
    assert await snapshot(loaded, DATA) == before


async def test_load_replaces_roles_and_overwrites_of_loaded_entities(
    loaded: Directory,
) -> None:
    update = DirectoryData(
        users=(User("u2", "bobby", "Bob II"),),
        roles=(Role("r-mod", "s1", "moderator", 1 << 5),),
        members=(Member("s1", "u2", ("r-mod",)),),  # r-admin dropped
        channels=(Channel("c1", "s1", "general-2", "text",
                          (Overwrite("s1", "role", allow=0, deny=2048),)),),
    )
    await loaded.load(update)
    assert await loaded.get_user("u2") == User("u2", "bobby", "Bob II")
    assert await loaded.find_user("bob") is None
    members = await loaded.get_members("s1", ["u2", "u3"])
    assert _member_view(members) == {
        "u2": ("s1", "u2", frozenset({"r-mod"})),
        "u3": ("s1", "u3", frozenset({"r-mod"})),  # not in the update: untouched
    }
    c1 = await loaded.get_channel("c1")
    assert c1 == Channel("c1", "s1", "general-2", "text",
                         (Overwrite("s1", "role", allow=0, deny=2048),))
    c3 = await loaded.get_channel("c3")
    assert c3 == DATA.channels[2]  # not in the update: untouched
    context = await loaded.get_server_context("s1")
    assert context is not None and context.roles["r-mod"].permissions == 1 << 5
    assert set(context.roles) == {"s1", "r-mod", "r-admin", "r-all"}  # nothing deleted


async def test_load_can_swap_usernames(loaded: Directory) -> None:
    await loaded.load(DirectoryData(users=(User("u2", "carol"), User("u3", "bob"))))
    found = await loaded.find_user("carol")
    assert found is not None and found.id == "u2"
    found = await loaded.find_user("bob")
    assert found is not None and found.id == "u3"


async def test_load_keeps_statuses(subject: Subject) -> None:
    await subject.directory.load(DATA)
    await subject.directory.set_user_status("u1", Status.DND)
    await subject.directory.load(DATA)
    assert await subject.stored_status("u1") == Status.DND


# --- Status ----------------------------------------------------------------------------


async def test_set_user_status_is_stored(subject: Subject) -> None:
    await subject.directory.load(DATA)
    for status in (Status.ONLINE, Status.DND, Status.INVISIBLE, Status.IDLE, Status.OFFLINE):
        await subject.directory.set_user_status("u1", status)
        assert await subject.stored_status("u1") == status
    await subject.directory.set_user_status("u2", Status.ONLINE)
    await subject.directory.set_user_status("u2", Status.ONLINE)  # a repeat is fine
    assert await subject.stored_status("u2") == Status.ONLINE
    assert await subject.stored_status("u1") == Status.OFFLINE


# --- Health ------------------------------------------------------------------------------


async def test_ping(subject: Subject) -> None:
    await subject.directory.ping()


@pytest.fixture
async def down_postgres_directory(database_url: str) -> AsyncIterator[PostgresDirectory]:
    """A Postgres directory pointed at a port where nothing listens."""
    directory = PostgresDirectory(_with_port(free_port()), command_timeout=2.0)
    try:
        yield directory
    finally:
        await directory.close()


@pytest.fixture(params=["memory", "postgres"])
def unavailable(request: pytest.FixtureRequest) -> Directory:
    """A directory whose backend is down."""
    if request.param == "memory":
        memory = MemoryDirectory(DATA)
        memory.failing = True
        return memory
    directory: PostgresDirectory = request.getfixturevalue("down_postgres_directory")
    return directory


async def test_every_call_raises_backend_unavailable_when_down(unavailable: Directory) -> None:
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: unavailable.get_user("u1"),
        lambda: unavailable.find_user("alice"),
        lambda: unavailable.get_user_servers("u1"),
        lambda: unavailable.get_server_context("s1"),
        lambda: unavailable.get_channel("c1"),
        lambda: unavailable.get_members("s1", ["u1"]),
        lambda: unavailable.set_user_status("u1", Status.ONLINE),
        lambda: unavailable.load(DATA),
        unavailable.ping,
    ]
    for call in calls:
        with pytest.raises(BackendUnavailable):
            await call()


# --- Postgres only: outages and recovery ------------------------------------------------


async def test_start_fails_clearly_when_postgres_is_down() -> None:
    with pytest.raises(BackendUnavailable, match="postgres"):
        await PostgresDirectory.connect(_with_port(free_port()), command_timeout=2.0)


async def test_async_with_enters_while_postgres_is_down_and_works_once_it_is_up(
    proxy: TcpProxy, pg_schema: str, pg_conn: asyncpg.Connection[Any]
) -> None:
    """The gateway starts with Postgres down; the directory connects when it can."""
    await proxy.down()
    async with PostgresDirectory(proxy.url(), command_timeout=2.0,
                                 server_settings={"search_path": pg_schema}) as directory:
        with pytest.raises(BackendUnavailable):
            await directory.ping()
        with pytest.raises(BackendUnavailable):
            await directory.get_user("u1")
        await proxy.up()
        await directory.ping()
        await directory.load(DATA)
        assert await directory.get_user("u1") == DATA.users[0]


async def test_an_outage_raises_backend_unavailable_then_heals(
    proxy: TcpProxy, pg_schema: str, pg_conn: asyncpg.Connection[Any]
) -> None:
    """Postgres goes away (every connection cut, new ones refused), then comes back."""
    directory = await PostgresDirectory.connect(
        proxy.url(), min_size=2, max_size=4, command_timeout=2.0,
        server_settings={"search_path": pg_schema},
    )
    try:
        await directory.load(DATA)
        await asyncio.gather(*(directory.get_user("u1") for _ in range(4)))
        for _ in range(2):
            await proxy.down()
            for _ in range(3):
                with pytest.raises(BackendUnavailable, match="postgres directory"):
                    await directory.get_user_servers("u1")
                with pytest.raises(BackendUnavailable):
                    await directory.ping()
            await proxy.up()
            results = await asyncio.gather(*(directory.get_user("u1") for _ in range(6)))
            assert results == [DATA.users[0]] * 6
            await directory.set_user_status("u1", Status.IDLE)
            assert await pg_conn.fetchval("SELECT status FROM users WHERE id = 'u1'") == "idle"
    finally:
        await directory.close()


async def test_a_silent_server_times_out() -> None:
    """A peer that accepts connections but never answers: bounded, not hung."""
    sockets: list[asyncio.StreamWriter] = []

    async def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sockets.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    directory = PostgresDirectory(_with_port(port), command_timeout=0.5)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(BackendUnavailable, match="no answer within"):
            await directory.get_user("u1")
        assert loop.time() - started < 3.0
    finally:
        await directory.close()
        for writer in sockets:
            writer.close()
        server.close()
        await server.wait_closed()


async def _terminate_backends(conn: asyncpg.Connection[Any], application_name: str) -> int:
    count: int = await conn.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE application_name = $1 AND pid <> pg_backend_pid()",
        application_name,
    )
    return count


async def test_recovers_after_its_connections_are_terminated(
    database_url: str, pg_schema: str, pg_conn: asyncpg.Connection[Any]
) -> None:
    name = f"gw-test-{uuid.uuid4().hex[:8]}"
    directory = await PostgresDirectory.connect(
        database_url, min_size=2, max_size=2, command_timeout=5.0,
        server_settings={"search_path": pg_schema, "application_name": name},
    )
    try:
        await directory.load(DATA)
        # Use both connections so that both are pooled.
        await asyncio.gather(directory.get_user("u1"), directory.get_user("u2"))
        for _ in range(3):
            assert await _terminate_backends(pg_conn, name) >= 1
            # Stale pooled connections are retried on fresh ones: no error.
            results = await asyncio.gather(
                directory.get_user("u1"), directory.get_user_servers("u1"),
                directory.get_members("s1", ["u2"]), directory.ping(),
            )
            assert results[0] == DATA.users[0]
            assert [s.id for s in results[1]] == ["S3", "s1", "s10", "s2"]
        # Terminated in the middle of an idle spell too (the pool notices first).
        await _terminate_backends(pg_conn, name)
        await asyncio.sleep(0.2)
        assert await directory.get_user("u2") == DATA.users[1]
    finally:
        await directory.close()


async def test_a_blocked_query_times_out_and_the_pool_recovers(
    database_url: str, pg_schema: str, pg_conn: asyncpg.Connection[Any]
) -> None:
    directory = await PostgresDirectory.connect(
        database_url, max_size=2, command_timeout=0.5,
        server_settings={"search_path": pg_schema},
    )
    try:
        await directory.load(DATA)
        blocker = await _admin(database_url, pg_schema)
        try:
            transaction = blocker.transaction()
            await transaction.start()
            await blocker.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(BackendUnavailable, match="no answer within"):
                await directory.get_user("u1")
            await transaction.rollback()
        finally:
            await blocker.close()
        for _ in range(3):  # more calls than connections: none is left broken
            assert await directory.get_user("u1") == DATA.users[0]
    finally:
        await directory.close()


async def test_load_rejects_data_that_does_not_fit(postgres_directory: PostgresDirectory) -> None:
    from adapters.postgres import DirectoryLoadError

    await postgres_directory.load(DATA)
    dangling = DirectoryData(members=(Member("s1", "ghost"),))
    with pytest.raises(DirectoryLoadError):
        await postgres_directory.load(dangling)
    too_big = DirectoryData(roles=(Role("r-big", "s1", "big", 1 << 70),))
    with pytest.raises(DirectoryLoadError):
        await postgres_directory.load(too_big)
    taken = DirectoryData(users=(User("u9", "alice"),))
    with pytest.raises(DirectoryLoadError):
        await postgres_directory.load(taken)
    # Nothing of a failed load is kept.
    assert await postgres_directory.get_user("u9") is None
    assert await postgres_directory.get_user("u1") == DATA.users[0]


def test_the_data_is_consistent() -> None:
    """The fixture above passes the fixture validator (so it is a fair test)."""
    from domain.fixtures import dump_directory, parse_directory

    assert parse_directory(dump_directory(DATA)) == DATA


# --- Member counts (PROTOCOL section 14) ----------------------------------------------

DATA_COUNTS = {"s1": 4, "s2": 2, "s10": 1, "S3": 2}


async def _counts_of(directory: Directory, user_id: str) -> dict[str, int]:
    return {s.id: s.member_count for s in await directory.get_user_servers(user_id)}


async def test_member_counts_are_read_with_the_servers(loaded: Directory) -> None:
    assert await _counts_of(loaded, "u1") == DATA_COUNTS
    assert await _counts_of(loaded, "u3") == {"s1": 4, "S3": 2}
    for sid, count in DATA_COUNTS.items():
        context = await loaded.get_server_context(sid)
        assert context is not None and context.server.member_count == count


async def test_member_counts_follow_loads_and_removals(subject: Subject) -> None:
    directory = subject.directory
    await directory.load(DATA)
    await directory.load(DATA)  # the same members again: counted once
    assert await _counts_of(directory, "u1") == DATA_COUNTS
    more = DirectoryData(users=DATA.users, servers=DATA.servers,
                         members=(Member("s2", "u3"), Member("s2", "u4"), Member("s2", "u1")))
    await directory.load(more)
    assert (await _counts_of(directory, "u1"))["s2"] == 4
    await subject.remove_member("s2", "u4")
    await subject.remove_member("s2", "u4")  # not a member any more: no change
    await subject.remove_member("s1", "u1")
    assert await _counts_of(directory, "u1") == {"s2": 3, "s10": 1, "S3": 2}  # left s1
    assert await _counts_of(directory, "u2") == {"s1": 3, "s2": 3}


async def test_postgres_member_count_is_backfilled_by_the_migration(
    database_url: str,
) -> None:
    """A schema with members from before 0002 gets their counts when it migrates."""
    schema = f"test_count_{uuid.uuid4().hex[:12]}"
    conn = await _admin(database_url)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        inner = await _admin(database_url, schema)
        try:
            from adapters.postgres.migrations import available_migrations

            first = available_migrations()[0]
            assert first.version == 1
            await inner.execute(first.sql)
            await inner.execute("INSERT INTO users (id, username) VALUES ('a', 'a'), ('b', 'b')")
            await inner.execute("INSERT INTO servers (id, name, owner_id) VALUES ('x', 'X', 'a')")
            await inner.execute("INSERT INTO server_members VALUES ('x', 'a'), ('x', 'b')")
            await inner.execute(
                "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now());"
                " INSERT INTO schema_migrations (version, name) VALUES (1, 'initial')"
            )
            assert 2 in await migrate(inner)
            assert await inner.fetchval("SELECT member_count FROM servers WHERE id='x'") == 2
            await inner.execute("DELETE FROM users WHERE id = 'b'")  # cascades to members
            assert await inner.fetchval("SELECT member_count FROM servers WHERE id='x'") == 1
        finally:
            await inner.close()
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
