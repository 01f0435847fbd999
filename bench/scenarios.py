"""The scenarios. Each one starts fresh servers and load generators, measures, and
stops everything it started before returning a flat ``{metric: value}`` dict.

* :func:`run_fanout` - N connections subscribed to one server (gateway), room
  (socket.io) or simply connected (ceiling); K events published into Redis as one
  burst (throughput, latency under saturation) and then K' events at a fixed rate
  (latency at a sustainable load). One or two server instances.
* :func:`run_connect` - handshakes per second over the first N/2 connections, and
  RSS per idle identified and subscribed connection over all N.
* :func:`run_storm` - gateway only: every user sends TYPING_START and
  PRESENCE_UPDATE frames at once; frames handled/s and events delivered/s.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from math import nan
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from adapters.jwt import JwtIssuer
from bench.common import (
    CpuSnapshot,
    Plan,
    cpu_seconds,
    cpu_snapshot,
    foreign_cores,
    grouped_plan,
    percentile,
    rss_kib,
    write_json,
)
from bench.procs import GATEWAY, SOCKETIO, Context, LoadClient, Server, socketio_channel

Metrics = dict[str, float]


@dataclass(frozen=True)
class FanoutSpec:
    n: int = 1000
    burst: int = 200
    #: socket.io delivers several times slower: a smaller burst keeps its runs short
    #: (deliveries/s is a rate; latencies under a burst scale with the burst size).
    burst_socketio: int = 40
    paced: int = 6
    paced_rate: float = 2.0  # events per second, low enough for every system
    instances: int = 1
    clients: int = 1
    concurrency: int = 64


@dataclass(frozen=True)
class ConnectSpec:
    n: int = 2000  # memory is measured over all of them
    timed: int = 1000  # handshakes/s over the first ``timed``
    warmup: int = 20
    clients: int = 1
    concurrency: int = 64


@dataclass(frozen=True)
class StormSpec:
    n: int = 1000
    group: int = 20
    channels: int = 5
    #: Offered client frames per second, one step each: every user sends one frame
    #: per step (half TYPING_START, half PRESENCE_UPDATE), spread evenly over it.
    #: The ramp stops after the first step that lost events or connections.
    rates: tuple[float, ...] = (125.0, 250.0, 500.0, 1000.0)
    clients: int = 1
    concurrency: int = 64


STORM_STATUSES = ("idle", "dnd", "online", "idle", "dnd")  # each a visible change


# --- plumbing -----------------------------------------------------------------------


class Publisher:
    """Publishes BENCH events into Redis the way other services would."""

    def __init__(self, redis_url: str) -> None:
        self._redis = Redis.from_url(redis_url)

    async def close(self) -> None:
        await self._redis.aclose()

    @staticmethod
    def payload(system: str, room: str, t: int, i: int) -> bytes:
        if system == SOCKETIO:  # socket.io's own pub/sub message (AsyncPubSubManager)
            return (b'{"method":"emit","event":"BENCH","data":[{"t":%d,"i":%d}],'
                    b'"binary":false,"namespace":"/","room":"%s","skip_sid":null,'
                    b'"callback":null,"host_id":"bench-publisher"}' % (t, i, room.encode()))
        # PROTOCOL section 8; the ceiling forwards the same envelope verbatim.
        return (b'{"event":{"op":"BENCH","d":{"t":%d,"i":%d}},"channelId":null,'
                b'"excludeUserId":null}' % (t, i))

    async def publish(self, system: str, room: str, count: int, rate: float | None) -> int:
        """Publish ``count`` events (``rate`` per second, or back to back); returns the
        send time of the first one (ns)."""
        channel = socketio_channel(room) if system == SOCKETIO else f"ws:server:{room}"
        interval = 1.0 / rate if rate else 0.0
        start = time.perf_counter()
        first = 0
        for i in range(count):
            if interval:
                delay = start + i * interval - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            t = time.time_ns()
            first = first or t
            await self._redis.publish(channel, self.payload(system, room, t, i))
        return first


def _tokens(ctx: Context, system: str, users: Sequence[str]) -> list[str]:
    if system != GATEWAY:
        return [""] * len(users)
    issuer = JwtIssuer(key=ctx.jwt_secret)
    now = time.time()
    return [issuer.issue(u, now=now, ttl=3600.0) for u in users]


@contextlib.asynccontextmanager
async def _cluster(ctx: Context, system: str, plan: Plan, tag: str, instances: int,
                   clients: int) -> AsyncIterator[tuple[list[Server], list[LoadClient]]]:
    fixture = ctx.results / f"{tag}.fixture.json"
    write_json(str(fixture), plan.fixture)
    servers: list[Server] = []
    loadgens: list[LoadClient] = []
    try:
        servers = list(await asyncio.gather(*(
            Server.start(ctx, system, fixture=fixture, room=plan.rooms[0],
                         log_name=f"{tag}.server{i}") for i in range(instances))))
        loadgens = list(await asyncio.gather(*(
            LoadClient.start(ctx, f"{tag}.client{i}") for i in range(clients))))
        yield servers, loadgens
    finally:
        for lg in loadgens:
            with contextlib.suppress(Exception):
                await lg.call({"cmd": "close", "timeout": 10}, 20.0)
        await asyncio.gather(*(lg.stop() for lg in loadgens), return_exceptions=True)
        await asyncio.gather(*(s.stop() for s in servers), return_exceptions=True)
        fixture.unlink(missing_ok=True)


async def _connect(ctx: Context, system: str, plan: Plan, indexes: Sequence[int],
                   servers: Sequence[Server], clients: Sequence[LoadClient],
                   concurrency: int, subscribe: bool = True) -> dict[str, Any]:
    """Connect ``plan`` users ``indexes`` (round-robin over clients and servers)."""
    users = [plan.users[i] for i in indexes]
    tokens = _tokens(ctx, system, users)
    per_client: list[dict[str, list[str]]] = [
        {"urls": [], "tokens": [], "rooms": []} for _ in clients]
    for j, i in enumerate(indexes):
        part = per_client[j % len(clients)]
        part["urls"].append(servers[j % len(servers)].ws_url)
        part["tokens"].append(tokens[j])
        part["rooms"].append(plan.rooms[i])
    for client, part in zip(clients, per_client, strict=True):
        client.send({"cmd": "connect", "protocol": system, "concurrency": concurrency,
                     "timeout": 30, "subscribe": subscribe, **part})
    replies = await asyncio.gather(*(c.read(180.0) for c in clients))
    failures: dict[str, int] = {}
    for reply in replies:
        for key, value in reply["failures"].items():
            failures[key] = failures.get(key, 0) + value
    return {"connected": sum(r["connected"] for r in replies), "failures": failures,
            "t0": min(r["t0"] for r in replies), "t1": max(r["t1"] for r in replies)}


async def _quiesce(clients: Sequence[LoadClient], idle_ms: int = 400) -> list[dict[str, Any]]:
    return list(await asyncio.gather(*(
        c.call({"cmd": "quiesce", "idle_ms": idle_ms, "timeout": 60}, 90.0) for c in clients)))


def _read_latencies(paths: Sequence[Path]) -> list[int]:
    values = array.array("q")
    for path in paths:
        data = path.read_bytes()
        chunk = array.array("q")
        chunk.frombytes(data)
        values.extend(chunk)
        path.unlink(missing_ok=True)
    return sorted(values)


async def _collect(ctx: Context, system: str, room: str, count: int, rate: float | None,
                   servers: Sequence[Server], clients: Sequence[LoadClient],
                   publisher: Publisher, tag: str) -> dict[str, Any]:
    paths = [ctx.results / f"{tag}.lat{i}.bin" for i in range(len(clients))]
    limit = 120.0
    for client, path in zip(clients, paths, strict=True):
        client.send({"cmd": "collect", "expect": count, "lat_file": str(path),
                     "timeout": limit, "idle_s": 5.0})
    for client in clients:
        await client.read(30.0)  # armed
    cpu0 = sum(cpu_seconds(s.pid) for s in servers)
    first = await publisher.publish(system, room, count, rate)
    replies = await asyncio.gather(*(c.read(limit + 30.0) for c in clients))
    cpu1 = sum(cpu_seconds(s.pid) for s in servers)
    latencies = await asyncio.to_thread(_read_latencies, paths)
    deliveries = sum(r["deliveries"] for r in replies)
    expected = sum(r["expected"] for r in replies)
    last = max(r["last_ns"] for r in replies)
    elapsed = max(1e-9, (last - first) / 1e9)
    return {
        "deliveries": deliveries, "expected": expected, "elapsed": elapsed,
        "rate": deliveries / elapsed,
        "p50_ms": percentile(latencies, 50) / 1e6, "p99_ms": percentile(latencies, 99) / 1e6,
        "max_ms": (latencies[-1] / 1e6) if latencies else float("nan"),
        "server_cpu": cpu1 - cpu0,
        "client_cpu_max": max(r["cpu"] for r in replies) / elapsed,
        "seq_gaps": sum(r["seq_gaps"] for r in replies),
        "dropped": sum(sum(r["dropped"].values()) for r in replies),
    }


def _check(notes: list[str], what: str, got: dict[str, Any]) -> None:
    if got["deliveries"] != got["expected"]:
        notes.append(f"{what}: {got['deliveries']}/{got['expected']} delivered")
    if got["seq_gaps"]:
        notes.append(f"{what}: {got['seq_gaps']} sequence gaps")
    if got["dropped"]:
        notes.append(f"{what}: {got['dropped']} connections dropped")


def _snapshot(ctx: Context, servers: Sequence[Server],
              clients: Sequence[LoadClient]) -> CpuSnapshot:
    pids = [s.pid for s in servers] + [c.pid for c in clients]
    if ctx.redis_pid is not None:
        pids.append(ctx.redis_pid)
    return cpu_snapshot(pids)


# --- scenarios ----------------------------------------------------------------------


async def run_fanout(ctx: Context, system: str, spec: FanoutSpec, tag: str,
                     publisher: Publisher, notes: list[str],
                     on_loaded: Any = None) -> Metrics:
    plan = grouped_plan(f"{tag}-", spec.n, group_size=spec.n)
    room = plan.rooms[0]
    async with _cluster(ctx, system, plan, tag, spec.instances, spec.clients) as (servers, clients):
        snap0 = _snapshot(ctx, servers, clients)
        started = time.perf_counter()
        # Gateway: everyone identifies first, then everyone subscribes. Each user going
        # online broadcasts PRESENCE_UPDATE to the server's subscribers; in this order
        # there are none yet, so setup does not cost N^2/2 deliveries (see joinstorm).
        conn = await _connect(ctx, system, plan, range(spec.n), servers, clients,
                              spec.concurrency, subscribe=system != GATEWAY)
        if conn["connected"] != spec.n:
            notes.append(f"{tag}: connected {conn['connected']}/{spec.n} {conn['failures']}")
        if system == GATEWAY:
            await _quiesce(clients, 200)
            subs = await asyncio.gather(*(c.call(
                {"cmd": "subscribe", "concurrency": spec.concurrency, "timeout": 30}, 90.0)
                for c in clients))
            if any(r["failures"] for r in subs):
                notes.append(f"{tag}: {sum(r['failures'] for r in subs)} subscribes failed")
        await _quiesce(clients)
        setup = time.perf_counter() - started
        if on_loaded is not None:  # the profiler hooks in here
            await on_loaded(servers, clients, publisher, room)
            return {}
        k = spec.burst_socketio if system == SOCKETIO else spec.burst
        burst = await _collect(ctx, system, room, k, None, servers, clients,
                               publisher, f"{tag}.burst")
        _check(notes, f"{tag} burst", burst)
        await _quiesce(clients, 200)
        paced = await _collect(ctx, system, room, spec.paced, spec.paced_rate, servers,
                               clients, publisher, f"{tag}.paced")
        _check(notes, f"{tag} paced", paced)
        snap1 = _snapshot(ctx, servers, clients)
    return {
        "dps": burst["rate"],
        "burst_p50": burst["p50_ms"], "burst_p99": burst["p99_ms"],
        "paced_p50": paced["p50_ms"], "paced_p99": paced["p99_ms"],
        "cpu_us": burst["server_cpu"] / max(1, burst["deliveries"]) * 1e6,
        # Share of a core each server process used during the burst: near 1.0 means
        # the server, not the client, set the pace.
        "server_util": burst["server_cpu"] / burst["elapsed"] / spec.instances,
        "client_cpu": burst["client_cpu_max"],
        "setup_s": setup,
        "foreign_cores": foreign_cores(snap0, snap1),
    }


async def run_connect(ctx: Context, system: str, spec: ConnectSpec, tag: str,
                      notes: list[str]) -> Metrics:
    plan = grouped_plan(f"{tag}-", spec.n + spec.warmup, group_size=1)
    async with _cluster(ctx, system, plan, tag, 1, spec.clients) as (servers, clients):
        server = servers[0]
        snap0 = _snapshot(ctx, servers, clients)
        # Warm up (lazy imports, first-use caches), then forget those connections.
        await _connect(ctx, system, plan, range(spec.n, spec.n + spec.warmup), servers, clients,
                       spec.concurrency)
        await _quiesce(clients, 200)
        for client in clients:
            await client.call({"cmd": "close", "timeout": 10}, 20.0)
        await asyncio.sleep(0.5)
        rss0 = rss_kib(server.pid)
        cpu0 = cpu_seconds(server.pid)
        timed = await _connect(ctx, system, plan, range(spec.timed), servers, clients,
                               spec.concurrency)
        cpu1 = cpu_seconds(server.pid)
        rest = await _connect(ctx, system, plan, range(spec.timed, spec.n), servers, clients,
                              spec.concurrency)
        connected = timed["connected"] + rest["connected"]
        if connected != spec.n:
            notes.append(f"{tag}: connected {connected}/{spec.n} "
                         f"{timed['failures']} {rest['failures']}")
        await _quiesce(clients, 500)
        await asyncio.sleep(0.5)
        rss1 = rss_kib(server.pid)
        snap1 = _snapshot(ctx, servers, clients)
    return {
        "hps": spec.timed / max(1e-9, (timed["t1"] - timed["t0"]) / 1e9),
        "cpu_ms": (cpu1 - cpu0) / max(1, timed["connected"]) * 1e3,
        "kib": (rss1 - rss0) / spec.n,
        "rss0_mib": rss0 / 1024,
        "foreign_cores": foreign_cores(snap0, snap1),
    }


async def run_joinstorm(ctx: Context, spec: FanoutSpec, tag: str, notes: list[str]) -> Metrics:
    """Gateway only: N members of one server connect and subscribe in the natural order
    (a reconnect storm). Each READY broadcasts PRESENCE_UPDATE to everyone already
    subscribed: about N^2/2 deliveries before the last SUBSCRIBED."""
    plan = grouped_plan(f"{tag}-", spec.n, group_size=spec.n)
    async with _cluster(ctx, GATEWAY, plan, tag, 1, spec.clients) as (servers, clients):
        snap0 = _snapshot(ctx, servers, clients)
        before = await servers[0].metrics()
        cpu0 = cpu_seconds(servers[0].pid)
        conn = await _connect(ctx, GATEWAY, plan, range(spec.n), servers, clients,
                              spec.concurrency)
        cpu1 = cpu_seconds(servers[0].pid)
        quiet = await _quiesce(clients, 1000)
        after = await servers[0].metrics()
        snap1 = _snapshot(ctx, servers, clients)
    failed = spec.n - conn["connected"]
    if failed:
        notes.append(f"{tag}: {failed}/{spec.n} handshakes failed {conn['failures']}")
    closes = {k: v for q in quiet for k, v in q["dropped"].items()}
    if closes:
        notes.append(f"{tag}: connections closed by the server afterwards: {closes}")
    return {
        "connect_s": (conn["t1"] - conn["t0"]) / 1e9,
        "hps": conn["connected"] / max(1e-9, (conn["t1"] - conn["t0"]) / 1e9),
        "cpu_ms": (cpu1 - cpu0) / max(1, conn["connected"]) * 1e3,
        "failed": float(failed),
        "presence_deliveries": (after.get("gateway_deliveries_total", 0.0)
                                - before.get("gateway_deliveries_total", 0.0)),
        "foreign_cores": foreign_cores(snap0, snap1),
    }


def storm_typer(index: int, step: int) -> bool:
    """In each step half the users type and the other half change status."""
    return (index + step) % 2 == 0


def storm_frames(plan: Plan, index: int, step: int) -> list[str]:
    """User ``index``'s frame in step ``step``: TYPING_START in a channel not used by
    them yet (a new typing key, so it is dispatched), or PRESENCE_UPDATE to a status
    that differs from their previous one (a visible change, so it is broadcast)."""
    if storm_typer(index, step):
        channels = plan.channels[index]
        return [json.dumps({"op": "TYPING_START",
                            "d": {"channelId": channels[(step // 2) % len(channels)]}})]
    return [json.dumps({"op": "PRESENCE_UPDATE",
                        "d": {"status": STORM_STATUSES[(step // 2) % len(STORM_STATUSES)]}})]


async def run_storm(ctx: Context, spec: StormSpec, tag: str, notes: list[str]) -> Metrics:
    """Gateway only: a typing and presence storm, as a ramp of offered rates."""
    plan = grouped_plan(f"{tag}-", spec.n, group_size=spec.group,
                        channels_per_group=spec.channels)
    best: dict[str, float] = {}
    broke_at = float("nan")
    closed_total = 0
    async with _cluster(ctx, GATEWAY, plan, tag, 1, spec.clients) as (servers, clients):
        server = servers[0]
        snap0 = _snapshot(ctx, servers, clients)
        conn = await _connect(ctx, GATEWAY, plan, range(spec.n), servers, clients,
                              spec.concurrency)
        if conn["connected"] != spec.n:
            notes.append(f"{tag}: connected {conn['connected']}/{spec.n} {conn['failures']}")
        await _quiesce(clients, 500)
        for step, rate in enumerate(spec.rates):
            before = await server.metrics()
            cpu0 = cpu_seconds(server.pid)
            frames = spec.n
            spread = spec.n / rate
            typers: dict[str, int] = {}
            changers: dict[str, int] = {}
            for i, room in enumerate(plan.rooms):
                bucket = typers if storm_typer(i, step) else changers
                bucket[room] = bucket.get(room, 0) + 1
            for c, client in enumerate(clients):
                mine = range(c, spec.n, len(clients))  # as _connect dealt them out
                # Typing reaches the other readers, presence every subscriber (self too).
                expect = sum(typers.get(plan.rooms[i], 0) - storm_typer(i, step)
                             + changers.get(plan.rooms[i], 0) for i in mine)
                client.send({"cmd": "storm", "frames": [storm_frames(plan, i, step) for i in mine],
                             "expect": expect, "watch_ops": ["TYPING_START", "PRESENCE_UPDATE"],
                             "spread_s": spread, "timeout": spread + 60, "idle_s": 3.0})
            replies = await asyncio.gather(*(c.read(spread + 90.0) for c in clients))
            cpu1 = cpu_seconds(server.pid)
            after = await server.metrics()
            received = sum(r["received"] for r in replies)
            expected = sum(r["expected"] for r in replies)
            closed = sum(sum(r["dropped"].values()) for r in replies) - closed_total
            closed_total += closed
            elapsed = max(1e-9, (max(r["last_ns"] for r in replies)
                                 - min(r["t0"] for r in replies)) / 1e9)
            delivered = (after.get("gateway_deliveries_total", 0.0)
                         - before.get("gateway_deliveries_total", 0.0))
            lost = 100.0 * (expected - received) / max(1, expected)
            errors = sum(r["errors"] for r in replies)
            # The watchers' HEARTBEAT round trips (ms): p50, p99, max (the worst process).
            hb = [max((r["hb_rtts_ms"][q] for r in replies if r["hb_rtts_ms"]), default=nan)
                  for q in range(3)]
            unanswered = sum(r["hb_unanswered"] for r in replies)
            notes_step = (f"{tag} step {step + 1} ({rate:g} frames/s offered): "
                          f"{frames / elapsed:,.0f} frames/s, {received / elapsed:,.0f} events/s, "
                          f"lost {lost:.1f}%, closed {closed}, errors {errors}, "
                          f"server CPU {(cpu1 - cpu0) / elapsed:.0%}, watchers' HEARTBEAT "
                          f"round trip p50/p99/max {hb[0]:,.1f}/{hb[1]:,.1f}/{hb[2]:,.1f} ms "
                          f"({sum(r['hb_count'] for r in replies)} ACKed, "
                          f"{unanswered} unanswered)")
            notes.append(notes_step)
            if closed or lost > 0.5 or errors or unanswered:
                broke_at = rate
                break
            best = {
                "offered_fps": rate,
                "frames_ps": frames / elapsed,
                "deliveries_ps": received / elapsed,
                "server_deliveries_ps": delivered / elapsed,
                "cpu_util": (cpu1 - cpu0) / elapsed,
                "cpu_us_per_delivery": (cpu1 - cpu0) / max(1, received) * 1e6,
                "hb_p99_ms": hb[1],
            }
        snap1 = _snapshot(ctx, servers, clients)
    return {
        **{k: best.get(k, float("nan")) for k in (
            "offered_fps", "frames_ps", "deliveries_ps", "server_deliveries_ps", "cpu_util",
            "cpu_us_per_delivery", "hb_p99_ms")},
        "broke_at_fps": broke_at,
        "closed": float(closed_total),
        "foreign_cores": foreign_cores(snap0, snap1),
    }
