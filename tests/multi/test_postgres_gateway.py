"""The gateway with GATEWAY_DATABASE_URL behaves to clients exactly like the memory
directory with the same data.

The module gets a scratch schema in the test database (migrated with
``adapters.postgres.migrate`` and loaded with one fixture); the gateway reaches it
through GATEWAY_DATABASE_URL alone: an unrecognised DSN query parameter is a server
setting for asyncpg, so ``?search_path=<schema>`` selects the schema. Two gateways
are served side by side, same fixture, same (memory) pub/sub and presence: one with
the memory directory (GATEWAY_FIXTURES), one with Postgres. Outages are made with a
TCP proxy in front of Postgres.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from adapters.postgres import PostgresDirectory, available_migrations, migrate
from tests.multi.conftest import (
    QUIET,
    Frame,
    Instance,
    LiveClient,
    World,
    config_from,
    proxied_url,
    running_proxy,
    serve_instance,
)

pytestmark = pytest.mark.postgres

READ, SEND, ADMIN = 1 << 10, 1 << 11, 1 << 3

#: A directory with more permission cases than the demo: an admin role, a member
#: overwrite for and against, a server without an @everyone role (defaults apply),
#: ids whose order depends on byte order (upper case before lower case), a user in
#: no server, nulls and non-ASCII text.
DOCUMENT: dict[str, Any] = {
    "users": [
        {"id": "u1", "username": "alice", "displayName": "Alice", "avatarUrl": None},
        {"id": "u2", "username": "bob", "displayName": None, "avatarUrl": "https://x.test/b"},
        {"id": "u3", "username": "carol", "displayName": "Carol", "avatarUrl": None},
        {"id": "u4", "username": "dave", "displayName": "Dave", "avatarUrl": None},
        {"id": "u5", "username": "émile", "displayName": "Émile ☃", "avatarUrl": None},
        {"id": "u6", "username": "loner", "displayName": "Loner", "avatarUrl": None},
    ],
    "servers": [
        {"id": "s1", "name": "Home", "ownerId": "u1", "iconUrl": None},
        {"id": "s2", "name": "Gaming", "ownerId": "u2", "iconUrl": "https://x.test/s2.png"},
        {"id": "S4", "name": "Upper", "ownerId": "u4", "iconUrl": None},
    ],
    "roles": [
        {"id": "s1", "serverId": "s1", "name": "@everyone", "permissions": READ | SEND},
        {"id": "r-mods", "serverId": "s1", "name": "mods", "permissions": READ | SEND},
        {"id": "r-admin", "serverId": "s1", "name": "admin", "permissions": ADMIN},
        {"id": "s2", "serverId": "s2", "name": "@everyone", "permissions": READ},
        {"id": "r-mute", "serverId": "s2", "name": "muted", "permissions": 0},
    ],
    "members": [
        {"serverId": "s1", "userId": "u1", "roleIds": []},
        {"serverId": "s1", "userId": "u2", "roleIds": ["r-mods"]},
        {"serverId": "s1", "userId": "u3", "roleIds": []},
        {"serverId": "s1", "userId": "u4", "roleIds": ["r-admin"]},
        {"serverId": "s1", "userId": "u5", "roleIds": []},
        {"serverId": "s2", "userId": "u2", "roleIds": []},
        {"serverId": "s2", "userId": "u3", "roleIds": ["r-mute"]},
        {"serverId": "s2", "userId": "u5", "roleIds": []},
        {"serverId": "S4", "userId": "u4", "roleIds": []},
        {"serverId": "S4", "userId": "u1", "roleIds": []},
    ],
    "channels": [
        {"id": "c1", "serverId": "s1", "name": "general", "type": "text", "overwrites": []},
        {"id": "c3", "serverId": "s1", "name": "mods-only", "type": "text",
         "overwrites": [{"id": "s1", "type": "role", "allow": 0, "deny": READ},
                        {"id": "r-mods", "type": "role", "allow": READ, "deny": 0}]},
        {"id": "c5", "serverId": "s1", "name": "not-carol", "type": "text",
         "overwrites": [{"id": "u3", "type": "member", "allow": 0, "deny": READ}]},
        {"id": "c6", "serverId": "s1", "name": "emile-only", "type": "text",
         "overwrites": [{"id": "s1", "type": "role", "allow": 0, "deny": READ},
                        {"id": "u5", "type": "member", "allow": READ, "deny": 0}]},
        {"id": "c4", "serverId": "s2", "name": "lobby", "type": "text", "overwrites": []},
        {"id": "c8", "serverId": "s2", "name": "no-muted", "type": "text",
         "overwrites": [{"id": "r-mute", "type": "role", "allow": 0, "deny": READ}]},
        {"id": "c7", "serverId": "S4", "name": "upper", "type": "voice", "overwrites": []},
    ],
}
USERS = ["u1", "u2", "u3", "u4", "u5", "u6"]
SERVERS = ["s1", "s2", "S4", "nope"]
CHANNELS = {"c1": "s1", "c3": "s1", "c5": "s1", "c6": "s1", "c4": "s2", "c8": "s2", "c7": "S4"}


@dataclass(frozen=True)
class PgWorld:
    world: World
    schema: str
    dsn: str  #: the test database, with ?search_path=<schema>
    admin_dsn: str
    fixture_path: str


def _with_query(url: str, query: str) -> str:
    return url + ("&" if "?" in url else "?") + query


@pytest.fixture(scope="module")
def pg_world(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgWorld]:
    """A scratch schema for this module: migrated, loaded, dropped at the end."""
    world = World(DOCUMENT)
    schema = f"gw_multi_{world.tag}"
    settings = {"search_path": schema}

    async def setup() -> None:
        admin = await asyncpg.connect(database_url, timeout=10)
        try:
            await admin.execute(f'CREATE SCHEMA "{schema}"')
        finally:
            await admin.close()
        applied = await migrate(database_url, server_settings=settings)
        assert applied == [m.version for m in available_migrations()]
        async with PostgresDirectory(database_url, server_settings=settings) as directory:
            await directory.load(world.data())

    async def teardown() -> None:
        admin = await asyncpg.connect(database_url, timeout=10)
        try:
            await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await admin.close()

    asyncio.run(setup())
    try:
        yield PgWorld(
            world=world,
            schema=schema,
            dsn=_with_query(database_url, f"search_path={schema}"),
            admin_dsn=database_url,
            fixture_path=world.write(tmp_path_factory.mktemp("pg")),
        )
    finally:
        asyncio.run(teardown())


@pytest.fixture
async def twins(pg_world: PgWorld) -> AsyncIterator[tuple[Instance, Instance]]:
    """(memory directory, Postgres directory), everything else equal."""
    async with AsyncExitStack() as stack:
        mem = await stack.enter_async_context(
            serve_instance("mem", config_from({"GATEWAY_FIXTURES": pg_world.fixture_path}))
        )
        pg = await stack.enter_async_context(
            serve_instance("pg", config_from({"GATEWAY_DATABASE_URL": pg_world.dsn}))
        )
        await pg.wait_readyz(200)
        yield mem, pg


async def user_status(pg_world: PgWorld, user_id: str) -> str:
    conn = await asyncpg.connect(pg_world.dsn, timeout=10)
    try:
        status = await conn.fetchval("SELECT status FROM users WHERE id = $1", user_id)
    finally:
        await conn.close()
    assert isinstance(status, str)
    return status


async def wait_status(pg_world: PgWorld, user_id: str, expected: str) -> None:
    for _ in range(200):
        if await user_status(pg_world, user_id) == expected:
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"users.status of {user_id} is not {expected!r}")


async def replies_until_quiet(client: LiveClient) -> list[Frame]:
    """Every frame that arrives until the connection stays quiet."""
    frames: list[Frame] = []
    while True:
        try:
            frames.append(await client.recv_json(QUIET))
        except AssertionError as exc:
            if "no frame within" in str(exc):
                return frames
            raise


def without_session(frame: Frame) -> Frame:
    d = dict(frame["d"])
    d.pop("sessionId")
    return {**frame, "d": d}


async def test_ready_payloads_are_equal(
    twins: tuple[Instance, Instance], pg_world: PgWorld
) -> None:
    mem, pg = twins
    w = pg_world.world
    for user in USERS:
        ready_mem = (await mem.login(w.id(user))).ready
        ready_pg = (await pg.login(w.id(user))).ready
        assert without_session(ready_pg) == without_session(ready_mem), user
    # Spot checks that the comparison is not vacuous.
    u1 = (await pg.login(w.id("u1"), "pg/u1 again")).ready["d"]
    assert [s["id"] for s in u1["servers"]] == [w.id("S4"), w.id("s1")]  # byte order
    u5 = (await pg.login(w.id("u5"), "pg/u5 again")).ready["d"]["user"]
    assert u5 == {"id": w.id("u5"), "username": w.id("émile"), "displayName": "Émile ☃",
                  "avatarUrl": None, "status": "online"}
    # Unknown user: 4004 on both.
    for instance in (mem, pg):
        client = await instance.connect()
        await client.send_op("IDENTIFY", {"token": instance.mint(w.id("ghost"))})
        await client.expect_close(4004)


async def test_subscribe_answers_are_equal(
    twins: tuple[Instance, Instance], pg_world: PgWorld
) -> None:
    mem, pg = twins
    w = pg_world.world
    answers: dict[str, list[tuple[str, str, Any]]] = {"mem": [], "pg": []}
    for instance in (mem, pg):
        for user in USERS:
            client = await instance.login(w.id(user))
            for server in SERVERS:
                await client.send_op("SUBSCRIBE_SERVER", {"serverId": w.id(server)})
                frame = await client.recv_json()
                d = frame["d"] if frame["op"] != "ERROR" else frame["d"]["code"]
                answers[instance.name].append((user, server, (frame["op"], d)))
    assert answers["pg"] == answers["mem"]
    summary = {(u, s): a[1] if a[0] == "ERROR" else a[0] for u, s, a in answers["pg"]}
    assert summary[("u3", "s1")] == "SUBSCRIBED"
    assert summary[("u4", "s2")] == "FORBIDDEN"
    assert summary[("u6", "s1")] == "FORBIDDEN"
    assert summary[("u1", "nope")] == "NOT_FOUND"


async def test_channel_permissions_are_equal(
    twins: tuple[Instance, Instance], pg_world: PgWorld
) -> None:
    mem, pg = twins
    w = pg_world.world
    typing: dict[str, dict[tuple[str, str], list[Any]]] = {"mem": {}, "pg": {}}
    readers: dict[str, dict[str, set[str]]] = {"mem": {}, "pg": {}}
    for instance in (mem, pg):
        # TYPING_START from a connection subscribed to nothing: an ERROR or nothing.
        for user in USERS:
            client = await instance.login(w.id(user))
            for channel in [*CHANNELS, "c-nope"]:
                await client.send_op("TYPING_START", {"channelId": w.id(channel)})
                await client.send_op("HEARTBEAT")
                answers = []
                while (frame := await client.recv_json())["op"] != "HEARTBEAT_ACK":
                    answers.append((frame["op"], frame["d"]["code"]))
                typing[instance.name][(user, channel)] = answers
            await client.close()
        # Channel-scoped events: who receives them.
        clients = {user: await instance.login(w.id(user), f"{instance.name}/{user}/sub")
                   for user in USERS}
        for client in clients.values():
            servers = {s["id"] for s in client.ready["d"]["servers"]}
            for server in servers:
                await client.subscribe(server)
        for n, (channel, server) in enumerate(CHANNELS.items()):
            await instance.gateway.publish_to_channel(
                w.id(channel), w.id(server), {"op": "MESSAGE_CREATE", "d": {"n": n}}
            )
        replies = await asyncio.gather(*(replies_until_quiet(c) for c in clients.values()))
        got = dict(zip(clients, replies, strict=True))
        channels = list(CHANNELS)
        for user, frames in got.items():
            for frame in frames:
                if frame["op"] == "PRESENCE_UPDATE":  # a login of another user
                    continue
                assert frame["op"] == "MESSAGE_CREATE", frame
                readers[instance.name].setdefault(channels[frame["d"]["n"]], set()).add(user)
    assert typing["pg"] == typing["mem"]
    assert readers["pg"] == readers["mem"]
    # Not vacuous: each rule of PROTOCOL section 9 shows.
    r = readers["pg"]
    assert r["c1"] == {"u1", "u2", "u3", "u4", "u5"}
    assert r["c3"] == {"u1", "u2", "u4"}  # owner, mods allow, admin
    assert r["c5"] == {"u1", "u2", "u4", "u5"}  # member deny for u3
    assert r["c6"] == {"u1", "u4", "u5"}  # member allow beats @everyone deny
    assert r["c8"] == {"u2", "u5"}  # role deny for the muted u3; u2 owns s2
    assert r["c7"] == {"u1", "u4"}  # no @everyone role: defaults to READ|SEND
    t = typing["pg"]
    assert t[("u3", "c3")] == [("ERROR", "FORBIDDEN")]
    assert t[("u6", "c1")] == [("ERROR", "FORBIDDEN")]
    assert t[("u1", "c-nope")] == [("ERROR", "NOT_FOUND")]
    assert t[("u5", "c6")] == []


async def test_presence_transitions_are_written_to_the_users_table(
    twins: tuple[Instance, Instance], pg_world: PgWorld
) -> None:
    _, pg = twins
    w = pg_world.world
    user = w.id("u3")
    await wait_status(pg_world, user, "offline")
    first = await pg.login(user)
    await wait_status(pg_world, user, "online")
    second = await pg.login(user, "pg/u3 second tab")
    for status in ("dnd", "idle", "invisible", "online", "dnd"):
        await second.send_op("PRESENCE_UPDATE", {"status": status})
        await second.heartbeat()
        await wait_status(pg_world, user, status)
    await first.close()
    await asyncio.sleep(QUIET)
    assert await user_status(pg_world, user) == "dnd"  # one tab left
    await second.close()
    await wait_status(pg_world, user, "offline")
    assert await user_status(pg_world, w.id("u6")) == "offline"  # untouched


async def test_postgres_down_at_identify_closes_4000_and_recovers(
    pg_world: PgWorld,
) -> None:
    w = pg_world.world
    async with running_proxy(pg_world.admin_dsn, 5432) as proxy:
        dsn = proxied_url(pg_world.admin_dsn, proxy.port, query=f"search_path={pg_world.schema}")
        config = config_from({"GATEWAY_DATABASE_URL": dsn, "GATEWAY_BACKEND_TIMEOUT_MS": "2000"})
        async with serve_instance("pg-proxied", config) as gw:
            await gw.wait_readyz(200)
            before = await gw.login(w.id("u1"))
            await before.subscribe(w.id("s1"))

            proxy.refuse()  # Postgres "down": connections dropped, new ones reset
            client = await gw.connect()
            await client.send_op("IDENTIFY", {"token": gw.mint(w.id("u2"))})
            await client.expect_close(4000)
            await gw.wait_readyz(503)
            # A session that is already READY is not affected by the outage.
            await before.heartbeat()

            proxy.accept()
            await gw.wait_readyz(200, within=10)
            after = await gw.login(w.id("u2"))
            assert after.ready["d"]["user"]["id"] == w.id("u2")
            # Its failed IDENTIFY opened no presence session: this is u2's first READY.
            await before.expect_event(
                "PRESENCE_UPDATE",
                {"userId": w.id("u2"), "serverId": w.id("s1"), "status": "online"},
            )
            await after.subscribe(w.id("s1"))
            await gw.gateway.publish_to_server(w.id("s1"), {"op": "BACK", "d": None})
            await before.expect_event("BACK", None)
            await after.expect_event("BACK", None)
