"""What an IDENTIFY costs the directory: Postgres next to the in-memory directory.

Builds, in a scratch schema (dropped afterwards), a user who is a member of
``--servers`` servers, each with a few roles and 10 channels, then times the calls
an IDENTIFY makes (``get_user`` + ``get_user_servers``) ``--reps`` times, and for
comparison the call a SUBSCRIBE_SERVER makes (``get_server_context``) and a
channel-scoped fan-out (``get_members`` of 100 users).

    python bench/bench_directory.py [--dsn URL] [--reps 200] [--servers 50] [--uvloop]

The DSN defaults to GATEWAY_BENCH_DATABASE_URL, GATEWAY_TEST_DATABASE_URL, or
postgresql://postgres@127.0.0.1:5432/test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402

from adapters.memory import MemoryDirectory  # noqa: E402
from adapters.postgres import PostgresDirectory, migrate  # noqa: E402
from domain.model import (  # noqa: E402
    Channel,
    DirectoryData,
    Member,
    Overwrite,
    Role,
    Server,
    User,
)
from domain.ports import Directory  # noqa: E402

USER = "bench-user"
ROLES_PER_SERVER = 4
CHANNELS_PER_SERVER = 10
OTHER_MEMBERS = 100
TABLES = ("users", "servers", "server_members", "roles", "member_roles", "channels",
          "channel_overwrites")


def build(servers: int) -> DirectoryData:
    users = [User(USER, "bench", "Bench User")]
    users += [User(f"other-{i}", f"other{i}") for i in range(OTHER_MEMBERS)]
    server_list, roles, members, channels = [], [], [], []
    for s in range(servers):
        sid = f"srv-{s:04d}"
        server_list.append(Server(sid, f"Server {s}", f"other-{s % OTHER_MEMBERS}"))
        roles.append(Role(sid, sid, "@everyone", 3072))
        role_ids = [f"{sid}-role-{r}" for r in range(1, ROLES_PER_SERVER)]
        roles += [Role(rid, sid, f"role {r}", 1 << (r + 3)) for r, rid in enumerate(role_ids)]
        members.append(Member(sid, USER, tuple(role_ids[:2])))
        members += [Member(sid, f"other-{i}", tuple(role_ids[i % 3:i % 3 + 1]))
                    for i in range(OTHER_MEMBERS)]
        for c in range(CHANNELS_PER_SERVER):
            overwrites = (
                (Overwrite(sid, "role", 0, 1024), Overwrite(role_ids[0], "role", 1024, 0))
                if c % 3 == 0 else ()
            )
            channels.append(Channel(f"{sid}-ch-{c}", sid, f"channel-{c}", "text", overwrites))
    return DirectoryData(tuple(users), tuple(server_list), tuple(roles), tuple(members),
                         tuple(channels))


async def timed(reps: int, call: Callable[[], Awaitable[object]]) -> list[float]:
    for _ in range(max(10, reps // 10)):  # warm up: connections, prepared statements
        await call()
    samples = []
    for _ in range(reps):
        started = time.perf_counter_ns()
        await call()
        samples.append((time.perf_counter_ns() - started) / 1e6)
    return samples


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(directory: Directory, reps: int, servers: int) -> dict[str, list[float]]:
    async def identify() -> None:
        user = await directory.get_user(USER)
        assert user is not None
        got = await directory.get_user_servers(USER)
        assert len(got) == servers

    async def subscribe() -> None:
        assert await directory.get_server_context("srv-0007") is not None

    async def fan_out() -> None:
        ids = [f"other-{i}" for i in range(OTHER_MEMBERS)]
        assert len(await directory.get_members("srv-0007", ids)) == OTHER_MEMBERS

    return {
        "IDENTIFY (get_user + get_user_servers)": await timed(reps, identify),
        "get_server_context (10 channels)": await timed(reps, subscribe),
        f"get_members ({OTHER_MEMBERS} ids)": await timed(reps, fan_out),
    }


async def main(dsn: str, reps: int, servers: int) -> None:
    data = build(servers)
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(dsn, timeout=10)
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        settings = {"search_path": schema}
        await migrate(dsn, server_settings=settings)
        async with PostgresDirectory(dsn, server_settings=settings) as postgres:
            started = time.perf_counter()
            await postgres.load(data)
            load_s = time.perf_counter() - started
            # The steady state autovacuum would reach: statistics, visibility map.
            tables = ", ".join(f'"{schema}".{t}' for t in TABLES)
            await admin.execute(f"VACUUM ANALYZE {tables}")
            pg = await measure(postgres, reps, servers)
        memory = MemoryDirectory(data)
        mem = await measure(memory, reps, servers)
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()

    version = await _server_version(dsn)
    print(f"user in {servers} servers x {ROLES_PER_SERVER} roles x {CHANNELS_PER_SERVER} "
          f"channels; {reps} repetitions; {type(asyncio.get_running_loop()).__module__} loop; "
          f"Postgres {version}; fixture load {load_s * 1000:.0f} ms")
    header = f"{'call':<42} {'postgres p50':>13} {'p99':>8} {'memory p50':>11} {'p99':>8}"
    print(header)
    print("-" * len(header))
    for name in pg:
        p, m = pg[name], mem[name]
        print(f"{name:<42} {percentile(p, 0.5):>10.3f} ms {percentile(p, 0.99):>5.3f} ms"
              f" {percentile(m, 0.5):>8.4f} ms {percentile(m, 0.99):>5.4f} ms")
    mean = statistics.fmean(pg["IDENTIFY (get_user + get_user_servers)"])
    print(f"\nIDENTIFY on Postgres: mean {mean:.3f} ms, so about {1000 / mean:.0f} "
          "sequential IDENTIFYs per second per connection")


async def _server_version(dsn: str) -> str:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return str(await conn.fetchval("SHOW server_version")).split()[0]
    finally:
        await conn.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=os.environ.get("GATEWAY_BENCH_DATABASE_URL")
                        or os.environ.get("GATEWAY_TEST_DATABASE_URL")
                        or "postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--servers", type=int, default=50)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.run(main(args.dsn, args.reps, args.servers))
    else:
        asyncio.run(main(args.dsn, args.reps, args.servers))
