"""IDENTIFY-to-READY over a real WebSocket for a user in 50 servers: the gateway on
the Postgres directory next to the same gateway on the in-memory directory with the
same data, each a `gateway serve` process on loopback, interleaved in rounds.

    python bench/bench_identify.py [--dsn URL] [--servers 50] [--reps 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import websockets  # noqa: E402

from adapters.jwt import JwtIssuer  # noqa: E402
from adapters.postgres import PostgresDirectory, migrate  # noqa: E402
from bench.bench_directory import USER, build  # noqa: E402
from domain.fixtures import dump_directory  # noqa: E402
from tests.process.helpers import wait_for_port  # noqa: E402
from tests.support.net import free_port  # noqa: E402

SECRET = "bench-identify-secret-0123456789abcdef"


async def measure(url: str, token: str, reps: int) -> list[float]:
    samples = []
    identify = json.dumps({"op": "IDENTIFY", "d": {"token": token}})
    for _ in range(reps):
        async with websockets.connect(url, compression=None) as ws:
            await ws.recv()  # HELLO
            started = time.perf_counter()
            await ws.send(identify)
            ready = json.loads(await ws.recv())
            samples.append((time.perf_counter() - started) * 1000)
            assert ready["op"] == "READY", ready
    return samples


def serve(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "entrypoints.cli", "serve"],
        env={**os.environ, **env, "GATEWAY_PORT": str(port), "GATEWAY_JWT_SECRET": SECRET},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    wait_for_port(port, proc)
    return proc, port


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", default=os.environ.get(
        "GATEWAY_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--servers", type=int, default=50)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    data = build(args.servers)
    schema = f"bench_identify_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(args.dsn)
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in args.dsn else "?"
    dsn = f"{args.dsn}{sep}search_path={schema}"
    fixture = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)  # noqa: SIM115
    try:
        await migrate(dsn)
        async with PostgresDirectory(dsn) as directory:
            await directory.load(data)
        json.dump(dump_directory(data), fixture)
        fixture.close()
        token = JwtIssuer(key=SECRET).issue(USER, now=time.time(), ttl=3600)
        results: dict[str, list[float]] = {"postgres": [], "memory": []}
        for _ in range(args.rounds):
            for name, env in (("postgres", {"GATEWAY_DATABASE_URL": dsn}),
                              ("memory", {"GATEWAY_FIXTURES": fixture.name})):
                proc, port = serve(env)
                try:
                    url = f"ws://127.0.0.1:{port}/ws/gateway"
                    await measure(url, token, 10)  # warm-up: pool, caches, imports
                    results[name] += await measure(url, token, args.reps)
                finally:
                    proc.terminate()
                    proc.wait(15)
        print(f"IDENTIFY -> READY, user in {args.servers} servers, "
              f"{args.rounds} x {args.reps} samples each")
        print(f"{'directory':<10} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}")
        for name, values in results.items():
            print(f"{name:<10} {statistics.median(values):8.2f} {pct(values, 90):8.2f} "
                  f"{pct(values, 99):8.2f}")
    finally:
        await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await admin.close()
        os.unlink(fixture.name)


if __name__ == "__main__":
    asyncio.run(main())
