"""Pub/sub on standalone Redis, a 1-master and a 3-master Redis Cluster, side by side
(PROTOCOL 16): publish throughput and fan-out through the gateway's brokers, and the
Redis CPU each message costs.

Every backend is started here, throwaway, on free loopback ports (``redis-server``;
``scripts/redis-cluster``), and stopped at the end. Per backend and round:

* **publish**: one publisher broker, ``--inflight`` publishes in flight, spread over
  ``--channels`` channels that one subscriber broker listens to; ``--messages`` in all.
* **fan-out**: ``--subscribers`` subscriber brokers on the same ``--channels``
  channels; every message reaches each of them.

Time runs from the first publish to the last delivery. Redis CPU is the delta of
``used_cpu_sys + used_cpu_user`` (INFO cpu) summed over the backend's nodes, per
message published, net of the nodes' idle CPU over the same time (measured first:
cron, and with several masters the cluster bus). Rounds alternate between the
backends; the table has medians.
On a small machine the Python clients saturate the cores long before Redis does, so
this shows the overhead of the cluster path, not its scale.

    python bench/bench_cluster.py [--rounds 3] [--messages 20000]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import anyio
import redis

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from adapters.redis import RedisBroker, RedisClusterBroker  # noqa: E402
from tests.support.net import free_port  # noqa: E402

AnyBroker = RedisBroker | RedisClusterBroker
Factory = Callable[[], AnyBroker]


def start_standalone(directory: Path) -> tuple[str, list[int], Callable[[], None]]:
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
        ],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            redis.Redis(port=port).ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return f"redis://127.0.0.1:{port}/0", [port], proc.kill


def start_cluster(directory: Path, masters: int) -> tuple[str, list[int], Callable[[], None]]:
    script = ROOT / "scripts" / "redis-cluster"
    url = subprocess.run(
        [script, "start", str(directory), str(20000 + masters * 100), str(masters)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    ports = [int(p) for p in (directory / "ports").read_text().split()]

    def stop() -> None:
        subprocess.run([script, "stop", str(directory)], check=False)

    return url, ports, stop


def redis_cpu(ports: list[int]) -> float:
    total = 0.0
    for port in ports:
        info = redis.Redis(port=port).info("cpu")
        total += float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
    return total


def idle_cpu_rate(ports: list[int], seconds: float = 2.0) -> float:
    """Redis CPU seconds per second with no traffic (cron, and the cluster bus)."""
    before = redis_cpu(ports)
    time.sleep(seconds)
    return (redis_cpu(ports) - before) / seconds


async def one_round(
    factory: Factory,
    ports: list[int],
    messages: int,
    channels: int,
    subscribers: int,
    inflight: int,
    idle_rate: float,
) -> tuple[float, float]:
    """Messages per second (first publish to last delivery) and Redis CPU µs per message,
    net of what the nodes spend idle over the same time."""
    names = [f"ws:server:bench-{uuid.uuid4().hex[:10]}" for _ in range(channels)]
    expected = messages * subscribers
    received = 0
    done = anyio.Event()

    async def handler(_channel: str, _payload: bytes) -> None:
        nonlocal received
        received += 1
        if received >= expected:
            done.set()

    brokers = [factory() for _ in range(subscribers)]
    publisher = factory()

    async def ignore(_channel: str, _payload: bytes) -> None:
        pass

    async with anyio.create_task_group() as tg:
        for broker in brokers:
            tg.start_soon(broker.run, handler)
        tg.start_soon(publisher.run, ignore)
        with anyio.fail_after(30):
            while not all(b.is_healthy() for b in [*brokers, publisher]):  # noqa: ASYNC110
                await anyio.sleep(0.01)
        for broker in brokers:
            async with anyio.create_task_group() as subs:
                for name in names:
                    subs.start_soon(broker.subscribe, name)
        payload = b'{"event":{"op":"BENCH","d":{"n":0}}}' + b"x" * 100
        cpu_before = redis_cpu(ports)
        start = time.perf_counter()
        queue = iter(range(messages))

        async def pump() -> None:
            for i in queue:
                await publisher.publish(names[i % channels], payload)

        async with anyio.create_task_group() as pumps:
            for _ in range(inflight):
                pumps.start_soon(pump)
        with anyio.fail_after(120):
            await done.wait()
        elapsed = time.perf_counter() - start
        cpu = redis_cpu(ports) - cpu_before - idle_rate * elapsed
        for broker in [*brokers, publisher]:
            await broker.close()
        tg.cancel_scope.cancel()
    return messages / elapsed, cpu / messages * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--channels", type=int, default=200)
    parser.add_argument("--subscribers", type=int, default=4)
    parser.add_argument("--inflight", type=int, default=32)
    args = parser.parse_args()
    backends: dict[str, tuple[str, list[int], Callable[[], None]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            backends["standalone"] = start_standalone(Path(tmp))
            for masters in (1, 3):
                directory = Path(tmp) / f"cluster{masters}"
                backends[f"cluster, {masters} master(s)"] = start_cluster(directory, masters)
            idle = {name: idle_cpu_rate(ports) for name, (_, ports, _) in backends.items()}
            results: dict[tuple[str, str], list[tuple[float, float]]] = {}
            for _ in range(args.rounds):
                for name, (url, ports, _) in backends.items():
                    cluster = name.startswith("cluster")

                    def factory(url: str = url, cluster: bool = cluster) -> AnyBroker:
                        return RedisClusterBroker(url) if cluster else RedisBroker(url)

                    for scenario, subscribers in (("publish", 1), ("fan-out", args.subscribers)):
                        figures = anyio.run(
                            one_round,
                            factory,
                            ports,
                            args.messages,
                            args.channels,
                            subscribers,
                            args.inflight,
                            idle[name],
                        )
                        results.setdefault((scenario, name), []).append(figures)
        finally:
            for _, _, stop in backends.values():
                stop()
    print(
        f"{args.messages} messages over {args.channels} channels, {args.inflight} publishes "
        f"in flight, fan-out to {args.subscribers}; medians of {args.rounds} rounds"
    )
    print(
        "idle Redis CPU subtracted (ms/s): "
        + ", ".join(f"{name} {rate * 1000:.1f}" for name, rate in idle.items())
    )
    print(
        f"{'scenario':10} {'backend':22} {'messages/s':>11} {'deliveries/s':>13} "
        f"{'Redis CPU µs/msg':>17}"
    )
    for (scenario, name), rows in results.items():
        rate = statistics.median(r[0] for r in rows)
        cpu = statistics.median(r[1] for r in rows)
        fan = args.subscribers if scenario == "fan-out" else 1
        print(f"{scenario:10} {name:22} {rate:11.0f} {rate * fan:13.0f} {cpu:17.1f}")


if __name__ == "__main__":
    main()
