"""``gateway simulate``: run one seeded simulation and report (PROTOCOL section 12).

Exit status 0 when every invariant held, 1 on a violation (the seed, the invariant,
the command that reproduces it and the last relevant trace lines are printed), 2 on
bad arguments.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
from typing import TextIO

from simulation.faults import ALL_FAULTS, parse_faults
from simulation.invariants import INVARIANTS
from simulation.offload import usable
from simulation.world import SimConfig, SimReport, run_simulation


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway simulate",
        description="Deterministic multi-instance simulation with fault injection.",
    )
    parser.add_argument("--instances", type=int, default=4, help="gateway instances (4)")
    parser.add_argument("--clients", type=int, default=2000, help="virtual clients (2000)")
    parser.add_argument(
        "--minutes",
        type=float,
        default=10.0,
        help="virtual minutes of activity (10), then the clients leave",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="seed (default: a random one, printed)"
    )
    parser.add_argument(
        "--faults",
        default="all",
        help=f"comma list of {','.join(ALL_FAULTS)}, 'all' or 'none' (all)",
    )
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="do not stop at the first violation (report up to 200)",
    )
    parser.add_argument(
        "--publish-rate",
        type=float,
        default=None,
        help="events per virtual second from other services (clients/200)",
    )
    parser.add_argument(
        "--activity", type=float, default=1.0, help="multiplies how often clients act (1.0)"
    )
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="run under cProfile, write the stats to FILE, print the top",
    )
    parser.add_argument(
        "--checker-process",
        choices=("auto", "on", "off"),
        default="auto",
        help="check in a second process, on another core: the same verdicts and digest "
        "(auto: when there are two cores, and not with --profile)",
    )
    parser.add_argument(
        "--list-invariants", action="store_true", help="describe the invariants and exit"
    )
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = sys.stdout
    if args.list_invariants:
        for name, text in INVARIANTS.items():
            print(f"{name:20} {text}", file=out)
        return 0
    try:
        faults = parse_faults(args.faults)
    except ValueError as exc:
        parser.print_usage(sys.stderr)
        print(f"gateway simulate: {exc}", file=sys.stderr)
        return 2
    if args.instances < 1 or args.clients < 1 or args.minutes <= 0 or args.activity <= 0:
        print(
            "gateway simulate: --instances, --clients, --minutes and --activity must be positive",
            file=sys.stderr,
        )
        return 2
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    config = SimConfig(
        seed=seed,
        instances=args.instances,
        clients=args.clients,
        minutes=args.minutes,
        faults=faults,
        stop_on_violation=not args.keep_going,
        publish_rate=args.publish_rate,
        activity=args.activity,
        checker_process=args.checker_process == "on"
        or (args.checker_process == "auto" and not args.profile and usable()),
    )
    print(f"simulation: {config.command()}", file=out, flush=True)
    if args.profile:
        profiler = cProfile.Profile()
        report = profiler.runcall(run_simulation, config)
        profiler.dump_stats(args.profile)
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(30)
    else:
        report = run_simulation(config)
    print_report(report, out)
    return 0 if report.ok else 1


def print_report(report: SimReport, out: TextIO) -> None:
    config = report.config
    w = out.write
    w(
        f"virtual time       {report.virtual_seconds:.1f} s ({config.active_seconds:g} s active "
        f"+ up to {config.tail_seconds:g} s for the last timers)\n"
    )
    elsewhere = report.extra.get("checker_process_cpu")
    how = "" if elsewhere is None else f", {elsewhere:.2f} s of it in the checker process"
    if report.extra.get("reran_in_line"):
        how += f"; run again with the checks in line: {report.rerun_reason.splitlines()[0]}"
    w(f"wall time          {report.wall_seconds:.2f} s (CPU {report.cpu_seconds:.2f} s{how})\n")
    closes = ", ".join(f"{k}={v}" for k, v in report.closes.items())
    w(f"connections        {report.connections} opened; closes: {closes}\n")
    external = sum(v for k, v in report.external.items() if k.endswith(" ok"))
    ops = ", ".join(f"{k}={v}" for k, v in report.published_by_op.items())
    w(f"events published   {report.events_published} ({ops})\n")
    ext = ", ".join(f"{k}={v}" for k, v in report.external.items())
    w(
        f"  by other services {external} ({ext}); failed publishes {report.failed_publishes}, "
        f"delayed deliveries lost in outages {report.broker_dropped}\n"
    )
    w(
        f"deliveries         {report.deliveries} events received by clients "
        f"({report.gateway_deliveries} queued by the gateways; {report.frames} frames in all)\n"
    )
    per_frame = report.loop_callbacks / max(1, report.frames)
    w(
        f"event loop         {report.loop_iterations} iterations, {report.loop_callbacks} "
        f"callbacks ({per_frame:.2f} per frame), {report.clock_jumps} clock jumps\n"
    )
    faults = ", ".join(f"{k}={v}" for k, v in report.faults.items()) or "none"
    w(f"faults injected    {sum(report.faults.values())} ({faults})\n")
    checks = ", ".join(f"{k}={v}" for k, v in report.checks.items())
    w(f"invariants checked {sum(report.checks.values())} ({checks})\n")
    w(f"trace digest       sha256:{report.digest} ({report.trace_lines} lines)\n")
    if report.ok:
        w("result             OK: every invariant held\n")
        return
    names = sorted({v.invariant for v in report.violations})
    w(f"result             FAILED: {len(report.violations)} violation(s) of {', '.join(names)}\n")
    first = report.violations[0]
    w(f"\nVIOLATION {first.invariant} at t={first.time:.6f} s, seed {config.seed}\n")
    w(f"  {first.message}\n")
    w(f"  ({INVARIANTS[first.invariant]})\n")
    w(f"reproduce: {config.command()}\n")
    w("trace (time in µs; '<' received, '>' sent; last relevant lines):\n")
    for line in first.trace:
        w(f"  {line[:400]}\n")
    for other in report.violations[1:10]:
        w(f"also: {other.invariant} at t={other.time:.6f}: {other.message[:300]}\n")
