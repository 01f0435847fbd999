"""The results table (medians over rounds, ratios, targets) and docs/BENCHMARKS.md.

``docs/BENCHMARKS.md`` keeps its hand-written parts; ``bench/run`` only replaces
the text between the two ``bench:results`` markers (appending them if absent).
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from bench.common import median
from bench.procs import CEILING, GATEWAY, SOCKETIO

START = "<!-- bench:results:start -->"
END = "<!-- bench:results:end -->"

#: results[system][metric] = one value per round
Results = dict[str, dict[str, list[float]]]


@dataclass(frozen=True)
class Target:
    baseline: str
    op: str  # ">=" or "<="
    bound: float

    def text(self) -> str:
        short = "ceil" if self.baseline == CEILING else "sio"
        return f"{self.op} {self.bound:g}x {short}"

    def met(self, ratio: float) -> bool | None:
        if math.isnan(ratio):
            return None
        return ratio >= self.bound if self.op == ">=" else ratio <= self.bound


@dataclass(frozen=True)
class Row:
    label: str
    key: str
    fmt: str = "{:,.0f}"
    targets: tuple[Target, ...] = ()


_THROUGHPUT_TARGETS = (Target(CEILING, ">=", 0.8), Target(SOCKETIO, ">=", 2.0))
_LATENCY_TARGETS = (Target(CEILING, "<=", 2.0),)


def rows(paced_rate: float) -> list[Row]:
    out: list[Row] = []
    for n, label in (("1", "1 instance"), ("2", "2 instances")):
        out += [
            Row(f"Fan-out, {label}: deliveries/s (burst)", f"fanout{n}.dps",
                targets=_THROUGHPUT_TARGETS),
            Row(f"Fan-out, {label}: p50 latency, burst (ms)", f"fanout{n}.burst_p50", "{:,.1f}"),
            Row(f"Fan-out, {label}: p99 latency, burst (ms)", f"fanout{n}.burst_p99", "{:,.1f}",
                _LATENCY_TARGETS),
            Row(f"Fan-out, {label}: p50 latency, {paced_rate:g} ev/s (ms)", f"fanout{n}.paced_p50",
                "{:,.2f}"),
            Row(f"Fan-out, {label}: p99 latency, {paced_rate:g} ev/s (ms)", f"fanout{n}.paced_p99",
                "{:,.2f}", _LATENCY_TARGETS),
            Row(f"Fan-out, {label}: server CPU per delivery (us)", f"fanout{n}.cpu_us", "{:,.2f}"),
            Row(f"Fan-out, {label}: server CPU share of a core per process, burst",
                f"fanout{n}.server_util", "{:.0%}"),
            Row(f"Fan-out, {label}: busiest client process, CPU share of a core",
                f"fanout{n}.client_cpu", "{:.0%}"),
            Row(f"Fan-out, {label}: connect+subscribe N, then quiet (s)", f"fanout{n}.setup_s",
                "{:,.1f}"),
            Row(f"Fan-out, {label}: CPU cores used by other processes", f"fanout{n}.foreign_cores",
                "{:.2f}"),
        ]
    out += [
        Row("Handshakes/s (first 1000 of 2000)", "connect.hps"),
        Row("Server CPU per handshake (ms)", "connect.cpu_ms", "{:,.2f}"),
        Row("Memory per idle subscribed connection (KiB, N=2000)", "connect.kib", "{:,.1f}",
            (Target(CEILING, "<=", 1.3),)),
        Row("Server RSS before connections (MiB)", "connect.rss0_mib", "{:,.1f}"),
        Row("Storm: highest offered rate handled cleanly (frames/s)", "storm.offered_fps"),
        Row("Storm: client frames handled/s at that rate", "storm.frames_ps"),
        Row("Storm: typing+presence events delivered/s at that rate", "storm.deliveries_ps"),
        Row("Storm: server CPU share of a core at that rate", "storm.cpu_util", "{:.0%}"),
        Row("Storm: server CPU per delivered event (us)", "storm.cpu_us_per_delivery", "{:,.1f}"),
        Row("Storm: watchers' HEARTBEAT round trip p99 at that rate (ms)", "storm.hb_p99_ms",
            "{:,.1f}"),
        Row("Storm: offered rate at which it broke (frames/s)", "storm.broke_at_fps"),
        Row("Storm: connections the server closed", "storm.closed"),
        Row("Join storm: N members of one server connect+subscribe (s)", "joinstorm.connect_s",
            "{:,.1f}"),
        Row("Join storm: handshakes/s (compare with the ceiling's connect rate)", "joinstorm.hps"),
        Row("Join storm: server CPU per handshake (ms)", "joinstorm.cpu_ms", "{:,.2f}"),
        Row("Join storm: handshakes that failed", "joinstorm.failed"),
        Row("Join storm: PRESENCE_UPDATE deliveries it caused", "joinstorm.presence_deliveries"),
    ]
    return out


def _fmt(fmt: str, value: float) -> str:
    return "n/a" if math.isnan(value) else fmt.format(value)


def paired_ratio(results: Results, key: str, baseline: str) -> float:
    """Median over rounds of gateway/baseline, each ratio taken within one round."""
    gw = results.get(GATEWAY, {}).get(key, [])
    base = results.get(baseline, {}).get(key, [])
    ratios = [a / b for a, b in zip(gw, base, strict=False)
              if b and not math.isnan(a) and not math.isnan(b)]
    return median(ratios)


def table(results: Results, paced_rate: float) -> tuple[str, list[str]]:
    """The markdown table and one verdict line per target."""
    lines = [
        "| metric | gateway | ceiling | socketio | gw/ceiling | gw/socketio | target | met |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    verdicts: list[str] = []
    for row in rows(paced_rate):
        values = {s: median(results.get(s, {}).get(row.key, [])) for s in
                  (GATEWAY, CEILING, SOCKETIO)}
        if all(math.isnan(v) for v in values.values()):
            continue
        r_ceil = paired_ratio(results, row.key, CEILING)
        r_sio = paired_ratio(results, row.key, SOCKETIO)
        marks = []
        for target in row.targets:
            ratio = r_ceil if target.baseline == CEILING else r_sio
            ok = target.met(ratio)
            mark = "n/a" if ok is None else ("yes" if ok else "**no**")
            marks.append(mark)
            verdicts.append(f"{row.label}: gateway/{target.baseline} = "
                            f"{_fmt('{:.2f}', ratio)} (target {target.op} {target.bound:g}) "
                            f"-> {'not measured' if ok is None else ('met' if ok else 'NOT met')}")
        lines.append(
            f"| {row.label} | {_fmt(row.fmt, values[GATEWAY])} | {_fmt(row.fmt, values[CEILING])}"
            f" | {_fmt(row.fmt, values[SOCKETIO])} | {_fmt('{:.2f}', r_ceil)}"
            f" | {_fmt('{:.2f}', r_sio)} | {', '.join(t.text() for t in row.targets)}"
            f" | {' / '.join(marks)} |")
    return "\n".join(lines), verdicts


def per_round(results: Results) -> str:
    lines = ["| system | metric | per-round values |", "|---|---|---|"]
    for system in sorted(results):
        for key in sorted(results[system]):
            vals = ", ".join(f"{v:,.3g}" for v in results[system][key])
            lines.append(f"| {system} | {key} | {vals} |")
    return "\n".join(lines)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine(redis_version: str) -> str:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=False,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", ""
    pkgs = ", ".join(f"{d} {_version(d)}" for d in (
        "hypercorn", "starlette", "wsproto", "uvloop", "redis", "picows", "python-socketio",
        "python-engineio", "py-spy"))
    return "\n".join([
        f"- CPU: {cpu}, {os.cpu_count()} cores; memory {mem_gib:.1f} GiB",
        f"- OS: {platform.system()} {platform.release()}; Python {platform.python_version()}",
        f"- Redis server {redis_version} on 127.0.0.1:6379 (loopback only)",
        f"- Packages: {pkgs}",
        f"- Gateway commit: {commit}{' (with uncommitted changes)' if dirty else ''}",
    ])


def write_doc(path: Path, body: str) -> None:
    block = f"{START}\n{body.rstrip()}\n{END}\n"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n\n"
    if START in text and END in text:
        head, _, rest = text.partition(START)
        _, _, tail = rest.partition(END)
        text = head + block + tail.lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
