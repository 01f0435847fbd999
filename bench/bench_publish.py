"""PUBLISH in a storm: RedisBroker's batched path against one command per publish.

C concurrent publishers each PUBLISH M messages through one ``RedisBroker`` (the pool
of 64 the gateway uses); "batched" is ``RedisBroker.publish`` (PUBLISHes issued while
one is on the wire go together in the next round trip, as one pipeline), "one by
one" the plain pooled command, as before batching. Interleaved rounds in one run;
CPU is this process's (the client side, which is what the gateway pays); failures are
publishes that raised BackendUnavailable.

    python -m bench.bench_publish [--concurrency 200] [--messages 20] [--rounds 3]
                                  [--redis redis://127.0.0.1:6379/15]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Awaitable, Callable

import anyio

from adapters.redis import RedisBroker
from adapters.redis._common import unavailable_as
from domain.ports import BackendUnavailable

Publish = Callable[[str, bytes], Awaitable[None]]


async def one_round(publish: Publish, concurrency: int, messages: int) -> tuple[float, float, int]:
    failures = 0
    payload = b"x" * 200

    async def publisher() -> None:
        nonlocal failures
        for _ in range(messages):
            try:
                await publish("bench:publish", payload)
            except BackendUnavailable:
                failures += 1

    cpu, wall = time.process_time(), time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(publisher)
    n = concurrency * messages
    return (time.process_time() - cpu) / n * 1e6, n / (time.perf_counter() - wall), failures


async def main_async(args: argparse.Namespace) -> None:
    async with RedisBroker(args.redis) as broker:

        async def one_by_one(channel: str, payload: bytes) -> None:
            with unavailable_as("PUBLISH"):
                await broker._client.publish(channel, payload)

        systems: dict[str, Publish] = {"batched": broker.publish, "one by one": one_by_one}
        results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in systems}
        for _ in range(args.rounds):
            for name, publish in systems.items():
                results[name].append(await one_round(publish, args.concurrency, args.messages))
    n = args.concurrency * args.messages
    print(f"{n} PUBLISHes from {args.concurrency} concurrent publishers, "
          f"{args.rounds} interleaved rounds (medians)")
    print(f"{'':12} {'CPU/publish (us)':>17} {'publishes/s':>12} {'failed':>7}")
    for name, rows in results.items():
        cpu = statistics.median(r[0] for r in rows)
        rate = statistics.median(r[1] for r in rows)
        failed = statistics.median(r[2] for r in rows)
        print(f"{name:12} {cpu:17.1f} {rate:12.0f} {failed:7.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--messages", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    anyio.run(main_async, parser.parse_args())


if __name__ == "__main__":
    main()
