"""Sampling profile of a `gateway serve` process doing handshakes, summarised.

Each user is alone in a server of their own (the ``connect`` scenario's population);
each connection goes connect -> HELLO -> IDENTIFY -> READY -> SUBSCRIBE_SERVER ->
SUBSCRIBED through the load generator, ``--concurrency`` in flight, batch after batch
(all kept open, as in the connect scenario) while py-spy samples the server for
``--seconds``. Prints the top frames by self and inclusive time and self time by
package, plus the server CPU per handshake measured over the profiled batches.

    python bench/profile_handshake.py --redis-url redis://127.0.0.1:6379/0 [--seconds 10]

``--baseline DIR`` (another checkout of the project) compares instead of profiling: a
gateway from this checkout and one from DIR, each with its own load generator and
users, take batches in turn (ABAB...), so that both see the same machine; prints the
server CPU per handshake of each batch and the medians side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import statistics  # noqa: E402

from bench import profiling  # noqa: E402
from bench.common import cpu_seconds, grouped_plan  # noqa: E402
from bench.procs import GATEWAY, Context, kill_all  # noqa: E402
from bench.scenarios import _cluster, _connect  # noqa: E402

#: Users of this run only: users of an earlier run may still be online in Redis (their
#: instance was killed), and a handshake of theirs would skip the presence broadcast.
RUN = secrets.token_hex(3)


async def compare(opts: argparse.Namespace) -> None:
    """This checkout against ``opts.baseline``, batch by batch in turn."""
    results = Path(tempfile.mkdtemp(prefix="profile-handshake-"))
    secret = secrets.token_hex(32)
    sides = {"this": ROOT, "baseline": opts.baseline_root}
    ctxs = {
        name: Context(
            root=root,
            results=results,
            redis_url=opts.redis_url,
            jwt_secret=secret,
            gateway_redis=True,
        )
        for name, root in sides.items()
    }
    batch, batches = opts.batch, opts.batches
    plans = {
        name: grouped_plan(f"{name[0]}{RUN}-", batch * (batches + 1), group_size=1)
        for name in sides
    }
    per_batch: dict[str, list[float]] = {name: [] for name in sides}
    try:
        async with contextlib.AsyncExitStack() as stack:
            up = {
                name: await stack.enter_async_context(
                    _cluster(ctxs[name], GATEWAY, plans[name], f"ph-{name}", 1, 1)
                )
                for name in sides
            }
            # Both gateways on one core and the load generators on the other, so
            # that neither side gets a core of its own more often than the other.
            for servers, clients in up.values():
                os.sched_setaffinity(servers[0].pid, {0})
                os.sched_setaffinity(clients[0].pid, {1})

            async def one_batch(name: str, offset: int) -> tuple[int, float]:
                servers, clients = up[name]
                cpu0 = cpu_seconds(servers[0].pid)
                got = await _connect(
                    ctxs[name],
                    GATEWAY,
                    plans[name],
                    range(offset, offset + batch),
                    servers,
                    clients,
                    opts.concurrency,
                )
                return int(got["connected"]), cpu_seconds(servers[0].pid) - cpu0

            for name in sides:  # warm-up
                await one_batch(name, batch * batches)
            await asyncio.sleep(0.5)
            for i in range(batches):
                order = list(sides) if i % 2 == 0 else list(reversed(sides))
                for name in order:
                    done, cpu = await one_batch(name, i * batch)
                    per_batch[name].append(cpu / max(1, done) * 1e3)
    finally:
        await kill_all()
    print(
        f"server CPU per handshake (ms), {batches} batches of {batch}, "
        f"{opts.concurrency} in flight, taken in turn:"
    )
    for name in sides:
        figures = " ".join(f"{x:.2f}" for x in per_batch[name])
        print(f"  {name:8s} median {statistics.median(per_batch[name]):.3f}  [{figures}]")
    ratio = statistics.median(per_batch["this"]) / statistics.median(per_batch["baseline"])
    print(f"  this / baseline: {ratio:.3f}")


async def main(opts: argparse.Namespace) -> None:
    if opts.baseline:
        await compare(opts)
        return
    results = Path(tempfile.mkdtemp(prefix="profile-handshake-"))
    ctx = Context(
        root=ROOT,
        results=results,
        redis_url=opts.redis_url,
        jwt_secret=secrets.token_hex(32),
        gateway_redis=True,
    )
    batch = opts.batch
    batches = opts.batches
    plan = grouped_plan(f"p{RUN}-", batch * (batches + 1), group_size=1)
    try:
        async with _cluster(ctx, GATEWAY, plan, "ph", 1, 1) as (servers, clients):
            server, client = servers[0], clients[0]

            async def one_batch(offset: int) -> int:
                got = await _connect(
                    ctx,
                    GATEWAY,
                    plan,
                    range(offset, offset + batch),
                    servers,
                    clients,
                    opts.concurrency,
                )
                return int(got["connected"])

            await one_batch(batch * batches)  # warm-up: imports, first-use caches
            await client.call({"cmd": "close", "timeout": 10}, 20.0)
            await asyncio.sleep(0.5)
            raw = results / "handshake.raw"
            record = (
                asyncio.create_task(profiling.record(server.pid, opts.seconds, raw))
                if opts.seconds
                else None
            )
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
    print(
        f"handshakes: {done}, server CPU per handshake: "
        f"{(cpu1 - cpu0) / max(1, done) * 1e3:.2f} ms  (py-spy: {summary_line})"
    )
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
    p.add_argument(
        "--baseline",
        default="",
        help="another checkout: compare with it batch by batch, no profile",
    )
    args = p.parse_args()
    args.baseline_root = Path(args.baseline).resolve() if args.baseline else None
    asyncio.run(main(args))
