"""Sampling profile of a `gateway serve` process doing handshakes, summarised.

Each user is alone in a server of their own (the ``connect`` scenario's population);
each connection goes connect -> HELLO -> IDENTIFY -> READY -> SUBSCRIBE_SERVER ->
SUBSCRIBED through the load generator, ``--concurrency`` in flight, batch after batch
(all kept open, as in the connect scenario) while py-spy samples the server for
``--seconds``. Prints the top frames by self and inclusive time and self time by
package, plus the server CPU per handshake measured over the profiled batches.

    python bench/profile_handshake.py --redis-url redis://127.0.0.1:6379/0 [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import profiling  # noqa: E402
from bench.common import cpu_seconds, grouped_plan  # noqa: E402
from bench.procs import GATEWAY, Context, kill_all  # noqa: E402
from bench.scenarios import _cluster, _connect  # noqa: E402


async def main(opts: argparse.Namespace) -> None:
    results = Path(tempfile.mkdtemp(prefix="profile-handshake-"))
    ctx = Context(root=ROOT, results=results, redis_url=opts.redis_url,
                  jwt_secret=secrets.token_hex(32), gateway_redis=True)
    batch = opts.batch
    batches = opts.batches
    plan = grouped_plan("ph-", batch * (batches + 1), group_size=1)
    try:
        async with _cluster(ctx, GATEWAY, plan, "ph", 1, 1) as (servers, clients):
            server, client = servers[0], clients[0]

            async def one_batch(offset: int) -> int:
                got = await _connect(ctx, GATEWAY, plan, range(offset, offset + batch),
                                     servers, clients, opts.concurrency)
                return int(got["connected"])

            await one_batch(batch * batches)  # warm-up: imports, first-use caches
            await client.call({"cmd": "close", "timeout": 10}, 20.0)
            await asyncio.sleep(0.5)
            raw = results / "handshake.raw"
            record = asyncio.create_task(
                profiling.record(server.pid, opts.seconds, raw)) if opts.seconds else None
            cpu0, t0, done = cpu_seconds(server.pid), time.monotonic(), 0
            # Connections stay open (closes are not part of a handshake's cost, as in
            # the connect scenario): every batch is a fresh range of users.
            for i in range(batches):
                done += await one_batch(i * batch)
                if time.monotonic() - t0 > opts.seconds > 0:
                    break
            cpu1 = cpu_seconds(server.pid)
            summary_line = await record if record is not None else ""
    finally:
        await kill_all()
    print(f"handshakes: {done}, server CPU per handshake: "
          f"{(cpu1 - cpu0) / max(1, done) * 1e3:.2f} ms  (py-spy: {summary_line})")
    if record is None:
        return
    summary = profiling.summarise(raw)
    for which, n in (("self", 25), ("inclusive", 40), ("packages", 15)):
        print(f"\n-- top {which} ({summary.samples} samples)")
        for name, pct in summary.top(which, n):
            print(f"{pct:6.1f}%  {name}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--seconds", type=int, default=10, help="0: CPU figure only, no py-spy")
    p.add_argument("--batch", type=int, default=300)
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--concurrency", type=int, default=16)
    asyncio.run(main(p.parse_args()))
