"""The benchmark driver behind ``bench/run``: rounds of interleaved scenarios, then a
profile of the gateway, then the table (stdout and docs/BENCHMARKS.md).

Each round runs every scenario for gateway, ceiling and socket.io in turn (fresh
processes each time), so slow drift of the machine hits all three alike; the table
reports medians over rounds and, for ratios, the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import os
import secrets
import shlex
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from redis.asyncio import Redis

from bench import profiling, report
from bench.common import median
from bench.procs import (
    GATEWAY,
    SYSTEMS,
    Context,
    LoadClient,
    Server,
    kill_all,
    kill_all_now,
)
from bench.scenarios import (
    ConnectSpec,
    FanoutSpec,
    Publisher,
    StormSpec,
    run_connect,
    run_fanout,
    run_joinstorm,
    run_storm,
)

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("fanout1", "fanout2", "connect", "storm", "clientcheck", "profile", "joinstorm")
DEFAULT_SCENARIOS = SCENARIOS[:-1]  # joinstorm costs a minute or more: on request


@dataclass
class Options:
    rounds: int
    systems: tuple[str, ...]
    scenarios: tuple[str, ...]
    redis_url: str
    clients: int
    fanout: FanoutSpec
    connect: ConnectSpec
    storm: StormSpec
    profile_seconds: int
    storm_rounds: int
    joinstorm: FanoutSpec
    docs: Path | None
    command: str
    gateway_backend: str


def parse(argv: list[str]) -> Options:
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="one round, shorter paced phase and profile (about 2 minutes)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3, quick 1)")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS),
                   help=f"any of {','.join(SCENARIOS)} (default: all but joinstorm)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    p.add_argument("--clients", type=int, default=1, help="load-generator processes")
    p.add_argument("--n", type=int, default=1000, help="fan-out connections")
    p.add_argument("--k", type=int, help="fan-out burst events (default 200, quick 100)")
    p.add_argument("--k-socketio", type=int,
                   help="fan-out burst events for socket.io, several times slower "
                        "(default 40, quick 20)")
    p.add_argument("--paced", type=int, help="paced events (default 6, quick 4)")
    p.add_argument("--paced-rate", type=float, default=2.0, help="paced events per second")
    p.add_argument("--memory-n", type=int, default=2000)
    p.add_argument("--handshake-n", type=int, default=1000)
    p.add_argument("--storm-n", type=int, default=1000)
    p.add_argument("--storm-rates", default="125,250,500,1000",
                   help="storm ramp: offered client frames/s per step")
    p.add_argument("--storm-group", type=int, default=20, help="users per server in the storm")
    p.add_argument("--joinstorm-n", type=int, default=2000,
                   help="join storm: members of the one server (default 2000)")
    p.add_argument("--joinstorm-concurrency", type=int, default=100,
                   help="join storm: handshakes in flight (default 100)")
    p.add_argument("--profile-seconds", type=int, help="default 8, quick 4")
    p.add_argument("--storm-rounds", type=int, default=1,
                   help="rounds that include the storm (gateway only; default 1)")
    p.add_argument("--gateway-backend", choices=("auto", "redis", "memory"), default="auto",
                   help="memory: no GATEWAY_REDIS_URL (fan-out scenarios are then skipped)")
    p.add_argument("--no-docs", action="store_true", help="do not write docs/BENCHMARKS.md")
    args = p.parse_args(argv)
    quick = bool(args.quick)
    systems = tuple(s for s in args.systems.split(",") if s)
    scenarios = tuple(s for s in args.scenarios.split(",") if s)
    for s in systems:
        if s not in SYSTEMS:
            p.error(f"unknown system {s!r}")
    for s in scenarios:
        if s not in SCENARIOS:
            p.error(f"unknown scenario {s!r}")
    if not args.redis_url.startswith("redis://127.0.0.1") and \
            not args.redis_url.startswith("redis://localhost"):
        p.error("--redis-url must point at 127.0.0.1 (loopback only)")
    paced = args.paced if args.paced is not None else (4 if quick else 6)
    return Options(
        rounds=args.rounds if args.rounds is not None else (1 if quick else 3),
        systems=systems,
        scenarios=scenarios,
        redis_url=args.redis_url,
        clients=args.clients,
        fanout=FanoutSpec(n=args.n, burst=args.k or (100 if quick else 200),
                          burst_socketio=args.k_socketio or (20 if quick else 40), paced=paced,
                          paced_rate=args.paced_rate, clients=args.clients),
        connect=ConnectSpec(n=args.memory_n, timed=min(args.handshake_n, args.memory_n),
                            clients=args.clients),
        storm=StormSpec(n=args.storm_n, group=args.storm_group,
                        rates=tuple(float(x) for x in args.storm_rates.split(",") if x),
                        clients=args.clients),
        profile_seconds=args.profile_seconds or (4 if quick else 8),
        storm_rounds=args.storm_rounds,
        joinstorm=FanoutSpec(n=args.joinstorm_n, concurrency=args.joinstorm_concurrency,
                             clients=args.clients),
        docs=None if args.no_docs else ROOT / "docs" / "BENCHMARKS.md",
        command="bench/run" + "".join(" " + shlex.quote(a) for a in argv),
        gateway_backend=args.gateway_backend,
    )


def redis_backend_available() -> bool:
    try:
        import adapters.redis as gateway_redis
    except ImportError:
        return False
    return hasattr(gateway_redis, "open_redis_backends")


class Run:
    def __init__(self, opts: Options, ctx: Context) -> None:
        self.opts = opts
        self.ctx = ctx
        self.results: report.Results = {}
        self.notes: list[str] = []
        self.profile_text = ""
        self.started = time.monotonic()

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {text}", flush=True)

    def add(self, system: str, scenario: str, metrics: dict[str, float]) -> None:
        bucket = self.results.setdefault(system, {})
        for key, value in metrics.items():
            bucket.setdefault(f"{scenario}.{key}", []).append(value)

    async def one(self, label: str, system: str, scenario: str, coro: object) -> None:
        self.log(f"{label} ...")
        t0 = time.monotonic()
        try:
            metrics = await coro  # type: ignore[misc]
        except Exception as exc:
            self.notes.append(f"{label}: failed: {exc!r}")
            self.log(f"{label} FAILED: {exc!r}")
            await kill_all()
            return
        self.add(system, scenario, metrics)
        shown = ", ".join(f"{k}={v:,.3g}" for k, v in metrics.items())
        self.log(f"{label} done in {time.monotonic() - t0:.1f}s: {shown}")

    async def rounds(self, publisher: Publisher) -> None:
        o = self.opts
        fanout_ok = self.ctx.gateway_redis
        for r in range(o.rounds):
            tag = f"b{secrets.token_hex(2)}r{r}"
            for instances in (1, 2):
                scenario = f"fanout{instances}"
                if scenario not in o.scenarios:
                    continue
                for system in o.systems:
                    if system == GATEWAY and not fanout_ok:
                        continue
                    spec = FanoutSpec(**{**asdict(o.fanout), "instances": instances})
                    name = f"{tag}-{system[:2]}-f{instances}"
                    await self.one(f"round {r + 1} {scenario} {system}", system, scenario,
                                   run_fanout(self.ctx, system, spec, name, publisher,
                                              self.notes))
                    if (instances == 1 and system == GATEWAY and fanout_ok
                            and "clientcheck" in o.scenarios):
                        # Right after the run it is compared with, so drift is small.
                        spec = FanoutSpec(**{**asdict(o.fanout), "clients": o.clients + 1})
                        await self.one(
                            f"round {r + 1} fanout1 gateway, {o.clients + 1} client procs",
                            f"{GATEWAY}+client", "fanout1",
                            run_fanout(self.ctx, GATEWAY, spec, f"{tag}-gw-cc", publisher,
                                       self.notes))
            if "connect" in o.scenarios:
                for system in o.systems:
                    await self.one(f"round {r + 1} connect+memory {system}", system, "connect",
                                   run_connect(self.ctx, system, o.connect,
                                               f"{tag}-{system[:2]}-c", self.notes))
            if "storm" in o.scenarios and GATEWAY in o.systems and r < o.storm_rounds:
                await self.one(f"round {r + 1} storm gateway", GATEWAY, "storm",
                               run_storm(self.ctx, o.storm, f"{tag}-gw-s", self.notes))
            if "joinstorm" in o.scenarios and GATEWAY in o.systems and fanout_ok:
                await self.one(f"round {r + 1} joinstorm gateway", GATEWAY, "joinstorm",
                               run_joinstorm(self.ctx, o.joinstorm, f"{tag}-gw-j", self.notes))

    async def profile(self, publisher: Publisher) -> None:
        if "profile" not in self.opts.scenarios or not self.ctx.gateway_redis:
            return
        if profiling.py_spy() is None:
            self.notes.append("profile: py-spy not installed")
            return
        raw = self.ctx.results / "gateway-fanout.pyspy.txt"
        seconds = self.opts.profile_seconds
        spec = self.opts.fanout
        info: dict[str, object] = {}

        async def under_load(servers: list[Server], clients: list[LoadClient],
                             pub: Publisher, room: str) -> None:
            recorder = asyncio.create_task(profiling.record(servers[0].pid, seconds, raw))
            bursts = 0
            delivered = 0
            t0 = time.monotonic()
            burst = min(spec.burst, 50)  # several bursts, so the profile is steady state
            while not recorder.done() and time.monotonic() - t0 < seconds + 20:
                for c in clients:
                    c.send({"cmd": "collect", "expect": burst, "timeout": 30, "idle_s": 3})
                for c in clients:
                    await c.read(30.0)
                await pub.publish(GATEWAY, room, burst, None)
                replies = await asyncio.gather(*(c.read(60.0) for c in clients))
                delivered += sum(r["deliveries"] for r in replies)
                bursts += 1
            info["summary"] = await recorder
            info["bursts"] = bursts
            info["delivered"] = delivered

        self.log(f"profile: py-spy on the gateway for {seconds}s of back-to-back bursts ...")
        try:
            await run_fanout(self.ctx, GATEWAY, spec, f"prof{secrets.token_hex(2)}", publisher,
                             self.notes, on_loaded=under_load)
            summary = profiling.summarise(raw)
        except Exception as exc:
            self.notes.append(f"profile failed: {exc!r}")
            self.log(f"profile FAILED: {exc!r}")
            await kill_all()
            return
        self.profile_text = render_profile(summary, info, raw)
        self.log("profile done")

    def body(self, redis_version: str, wall: float) -> str:
        o = self.opts
        tbl, verdicts = report.table(self.results, o.fanout.paced_rate)
        lines = [
            "## Latest results (written by `bench/run`)",
            "",
            f"Command: `{o.command}` (finished {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, "
            f"{wall / 60:.1f} min wall).",
            "",
            "Machine:",
            "",
            report.machine(redis_version),
            "",
            f"Setup: {o.rounds} interleaved round(s); fan-out N={o.fanout.n} connections, "
            f"burst K={o.fanout.burst} (socket.io {o.fanout.burst_socketio}), paced "
            f"{o.fanout.paced} events at "
            f"{o.fanout.paced_rate:g}/s; memory N={o.connect.n}; handshakes over the first "
            f"{o.connect.timed}; storm {o.storm.n} users in servers of {o.storm.group}, "
            f"ramp of {', '.join(f'{r:g}' for r in o.storm.rates)} frames/s; "
            f"{o.clients} load-generator process(es); gateway backends: "
            f"{'Redis (' + o.redis_url + ')' if self.ctx.gateway_redis else 'memory'}.",
            "Values are medians over rounds; ratios are medians of per-round ratios.",
            "",
            tbl,
            "",
            "Targets:",
            "",
        ]
        lines += [f"- {v}" for v in verdicts] or ["- (no target was measured)"]
        lines += ["", "Client bottleneck check (gateway, fan-out, 1 instance):", ""]
        lines += [client_check(self.results, o.clients)]
        if self.profile_text:
            lines += ["", self.profile_text]
        if self.notes:
            lines += ["", "Anomalies seen during the run:", ""]
            lines += [f"- {n}" for n in self.notes]
        lines += ["", "<details><summary>Per-round values</summary>", "",
                  report.per_round(self.results), "", "</details>"]
        return "\n".join(lines)


def client_check(results: report.Results, clients: int) -> str:
    gw = results.get(GATEWAY, {})
    more = results.get(f"{GATEWAY}+client", {})
    one, two = gw.get("fanout1.dps", []), more.get("fanout1.dps", [])
    if not one or not two:
        return "- not run"
    paired = median([b / a for a, b in zip(one, two, strict=False) if a])
    spread = (max(one) - min(one)) / median(one) if len(one) > 1 else float("nan")
    util = median(gw.get("fanout1.server_util", []))
    busy = median(gw.get("fanout1.client_cpu", []))
    busy_two = median(more.get("fanout1.client_cpu", []))
    if util >= 0.85 and (paired < 1.1 or paired - 1 <= spread):
        verdict = ("the client was not the bottleneck: the gateway process used "
                   f"{util:.0%} of a core during the bursts (it set the pace), and a second "
                   "client process did not change throughput beyond the run-to-run spread")
    elif paired >= 1.1:
        verdict = ("a second client process raised throughput: the single client was (part "
                   "of) the bottleneck; use --clients 2")
    else:
        verdict = (f"inconclusive: the gateway used only {util:.0%} of a core; look at the "
                   "CPU used by other processes")
    return (f"- {clients} load-generator process(es): {median(one):,.0f} deliveries/s "
            f"(median; spread between rounds {spread:.0%}), busiest client process at "
            f"{busy:.0%} of a core.\n"
            f"- {clients + 1}, each run right after its pair: {median(two):,.0f} deliveries/s; "
            f"median paired ratio {paired:.2f}; busiest client process at {busy_two:.0%}.\n"
            f"- Verdict: {verdict}.")


def render_profile(summary: profiling.Summary, info: dict[str, object], raw: Path) -> str:
    lines = [
        "### Where the gateway's time goes under fan-out (py-spy)",
        "",
        f"py-spy `record --nonblocking --rate 250 --format raw` on the gateway process during "
        f"{info.get('bursts')} back-to-back bursts ({info.get('delivered')} deliveries); "
        f"{summary.samples} busy samples ({info.get('summary')}). "
        f"Collapsed stacks: `{raw.relative_to(ROOT) if raw.is_relative_to(ROOT) else raw}` "
        "(feed to flamegraph.pl for a picture). Self times are exact per sample; inclusive "
        "times undercount, because py-spy reads some uvloop stacks truncated.",
        "",
        "Self time by package:",
        "",
        "| package | self % |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {pct:.1f} |" for name, pct in summary.top("packages", 20)]
    lines += ["", "Top functions by self time:", "", "| function | self % |", "|---|---:|"]
    lines += [f"| `{name}` | {pct:.1f} |" for name, pct in summary.top("self", 25)]
    lines += ["", "Top functions by inclusive time:", "", "| function | inclusive % |",
              "|---|---:|"]
    lines += [f"| `{name}` | {pct:.1f} |" for name, pct in summary.top("inclusive", 30)]
    return "\n".join(lines)


async def main_async(opts: Options) -> int:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results_dir = ROOT / "bench" / "results" / stamp
    results_dir.mkdir(parents=True, exist_ok=True)
    redis = Redis.from_url(opts.redis_url)
    try:
        info = await asyncio.wait_for(redis.info("server"), 5.0)
    except Exception as exc:
        print(f"bench: Redis at {opts.redis_url} does not answer: {exc!r}", file=sys.stderr)
        return 2
    finally:
        await redis.aclose()
    redis_version = str(info.get("redis_version", "?"))
    redis_pid = info.get("process_id")
    if opts.gateway_backend == "memory":
        gateway_redis = False
    else:
        gateway_redis = redis_backend_available()
        if opts.gateway_backend == "redis" and not gateway_redis:
            print("bench: the gateway's Redis backend (adapters.redis.open_redis_backends) "
                  "is not available", file=sys.stderr)
            return 2
    ctx = Context(root=ROOT, results=results_dir, redis_url=opts.redis_url,
                  jwt_secret=secrets.token_hex(32), gateway_redis=gateway_redis,
                  redis_pid=redis_pid if isinstance(redis_pid, int) else None)
    run = Run(opts, ctx)
    if not gateway_redis:
        run.notes.append("the gateway ran on its memory backends: its fan-out through Redis "
                         "was not measured")
    run.log(f"results and logs in {results_dir}")
    publisher = Publisher(opts.redis_url)
    try:
        await run.rounds(publisher)
        await run.profile(publisher)
    finally:
        await publisher.close()
        await kill_all()
    wall = time.monotonic() - run.started
    body = run.body(redis_version, wall)
    (results_dir / "results.json").write_text(
        json.dumps({"results": run.results, "notes": run.notes, "command": opts.command},
                   indent=1), encoding="utf-8")
    print()
    print(body)
    if opts.docs is not None:
        report.write_doc(opts.docs, body)
        print(f"\nwritten to {opts.docs.relative_to(ROOT)}")
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through the finally blocks that stop children


def main(argv: list[str] | None = None) -> int:
    opts = parse(sys.argv[1:] if argv is None else argv)
    os.chdir(ROOT)
    atexit.register(kill_all_now)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(main_async(opts))
    with contextlib.suppress(KeyboardInterrupt):
        code: int = uvloop.run(main_async(opts))
        return code
    return 130


if __name__ == "__main__":
    sys.exit(main())
