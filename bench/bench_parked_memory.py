"""Memory of a parked session (PROTOCOL 13) against a live idle one, side by side.

One gateway on memory backends and virtual time (the shell tests' fakes), N sessions
READY and subscribed to one server, idle. Traced Python memory per session: live
(after login, minus the empty gateway) and parked (after every connection dropped by
TCP loss and the sessions parked, the client objects gone). The fake transport is far
lighter than a real socket (Hypercorn's stream, wsproto, asyncio buffers), so the live
figure is a floor and the comparison favours the live session.

    python bench/bench_parked_memory.py [--n 500]
"""

from __future__ import annotations

import argparse
import gc
import sys
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.shell.fakes import FakeTransport, World, run_virtual  # noqa: E402


def traced() -> int:
    gc.collect()
    current, _ = tracemalloc.get_traced_memory()
    return current


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=500)
    args = parser.parse_args()
    n: int = args.n
    figures: dict[str, float] = {}

    async def scenario(world: World) -> None:
        users = ("u1", "u2", "u3")  # members of s1 in the demo data
        base = traced()
        clients: list[FakeTransport] = [
            await world.login(users[i % 3], "s1") for i in range(n)
        ]
        await world.until(lambda: len(world.gateway.snapshot().connections) == n, "all live")
        figures["live"] = (traced() - base) / n
        for client in clients:
            client.drop()  # TCP loss: every session parks
        clients.clear()
        await world.until(lambda: len(world.gateway.snapshot().parked) == n, "all parked")
        await world.until(lambda: not world.gateway.snapshot().connections, "sockets gone")
        figures["parked"] = (traced() - base) / n

    tracemalloc.start()
    run_virtual(scenario)
    tracemalloc.stop()
    live, parked = figures["live"], figures["parked"]
    print(f"N={n} sessions, traced Python memory per session (bytes)")
    print(f"{'live idle':<12} {live:>10,.0f}")
    print(f"{'parked':<12} {parked:>10,.0f}")
    print(f"{'parked/live':<12} {parked / live:>10.2f}")


if __name__ == "__main__":
    main()
