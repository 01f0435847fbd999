"""How long each close path holds the server's socket (PROTOCOL section 6).

For each path, ``--reps`` times against one `gateway serve` process on loopback
(``GATEWAY_CLOSE_TIMEOUT_MS`` = ``--bound-ms``): the time from the trigger, as the
client sees it, until the process no longer holds a descriptor for the connection.

- ``flood+answer``: 120 HEARTBEATs past a limit of 50, then the client answers 4008;
- ``flood+never-read``: it keeps sending and never reads;
- ``never-answers``: 4003 read, the close never answered (trigger: close frame read);
- ``stops-reading``: 5000 events of 2 KB while it does not read (needs Redis; the
  trigger is the end of publishing, which comes after the 4010 decision, so this
  figure undercounts by the publishing time).

    python bench/bench_close.py [--reps 20] [--bound-ms 2000] [--redis URL]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


from tests.blackbox.conftest import RawClient  # noqa: E402
from tests.process.helpers import ServedGateway, served  # noqa: E402
from tests.process.test_close_hygiene import (  # noqa: E402
    HEARTBEAT,
    client_port,
    held_connections,
    publish_big,
    raw_ready,
    until_op,
)


async def released(gw: ServedGateway, port: int, since: float) -> float:
    while port in held_connections(gw):
        if time.monotonic() - since > 30:
            raise TimeoutError("still held after 30 s")
        await asyncio.sleep(0.005)
    return time.monotonic() - since


async def flood_answer(gw: ServedGateway) -> float:
    raw = await raw_ready(gw)
    raw.writer.write(HEARTBEAT * 120)
    t0 = time.monotonic()
    assert await raw.read_close_code(within=10) == 4008
    await raw.send_frame(0x8, struct.pack("!H", 4008))
    took = await released(gw, client_port(raw), t0)
    raw.close()
    return took


async def flood_never_read(gw: ServedGateway) -> float:
    raw = await raw_ready(gw)
    port = client_port(raw)

    async def flood() -> None:
        with contextlib.suppress(OSError):
            while True:
                raw.writer.write(HEARTBEAT * 20)
                await asyncio.sleep(0.005)

    task = asyncio.create_task(flood())
    t0 = time.monotonic()
    try:
        return await released(gw, port, t0)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raw.close()


async def never_answers(gw: ServedGateway) -> float:
    raw = await RawClient.open("127.0.0.1", gw.port)
    await raw.expect("HELLO")
    assert await raw.read_close_code(within=10) == 4003
    took = await released(gw, client_port(raw), time.monotonic())
    raw.close()
    return took


def stops_reading(redis_url: str) -> Callable[[ServedGateway], Awaitable[float]]:
    async def run(gw: ServedGateway) -> float:
        raw = await raw_ready(gw)
        await raw.send_op("SUBSCRIBE_SERVER", {"serverId": "s1"})
        await until_op(raw, "SUBSCRIBED")
        await publish_big(redis_url, 5000)
        took = await released(gw, client_port(raw), time.monotonic())
        raw.close()
        return took

    return run


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--bound-ms", type=int, default=2000)
    parser.add_argument("--redis", default=None, help="Redis URL for the stops-reading path")
    args = parser.parse_args()
    env = {
        "GATEWAY_RATE_LIMIT_COUNT": "50",
        "GATEWAY_RATE_LIMIT_WINDOW_MS": "2000",
        "GATEWAY_IDENTIFY_TIMEOUT_MS": "300",
        "GATEWAY_CLOSE_TIMEOUT_MS": str(args.bound_ms),
    }
    paths: dict[str, Callable[[ServedGateway], Awaitable[float]]] = {
        "flood+answer": flood_answer,
        "flood+never-read": flood_never_read,
        "never-answers": never_answers,
    }
    if args.redis:
        env["GATEWAY_REDIS_URL"] = args.redis
        paths["stops-reading"] = stops_reading(args.redis)
    print(f"close bound {args.bound_ms} ms, {args.reps} reps each (seconds until released)")
    print(f"{'path':<18} {'median':>8} {'worst':>8} {'best':>8}")
    with served(env) as gw:
        for name, path in paths.items():
            times = [await path(gw) for _ in range(args.reps)]
            print(
                f"{name:<18} {statistics.median(times):8.3f} {max(times):8.3f} {min(times):8.3f}"
            )


if __name__ == "__main__":
    asyncio.run(main())
