"""Shared pieces of the benchmark: fixtures, process statistics, percentiles.

Everything here is plain, synchronous and cheap; the orchestrator (``bench.main``)
and the load generator (``bench.loadgen``) both import it.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

#: Every address the benchmark talks to. Nothing else is ever a target.
HOST = "127.0.0.1"
#: Clock ticks per second, for /proc/PID/stat CPU times.
_CLK_TCK = os.sysconf("SC_CLK_TCK")

READ_MESSAGES_AND_SEND = (1 << 10) | (1 << 11)


# --- fixtures (PROTOCOL section 11) -------------------------------------------------


@dataclass
class Plan:
    """A fixture plus, per connection, the user it identifies as and what it joins."""

    fixture: dict[str, Any]
    users: list[str]
    #: Per connection: the server id (gateway SUBSCRIBE_SERVER, socket.io room).
    rooms: list[str]
    #: Per connection: the channel ids of its room (storm only).
    channels: list[list[str]] = field(default_factory=list)


def _user(uid: str) -> dict[str, Any]:
    return {"id": uid, "username": uid, "displayName": uid.upper(), "avatarUrl": None}


def _server(sid: str, owner: str) -> list[dict[str, Any]]:
    server = {"id": sid, "name": f"server {sid}", "ownerId": owner, "iconUrl": None}
    everyone = {"id": sid, "serverId": sid, "name": "@everyone",
                "permissions": READ_MESSAGES_AND_SEND}
    return [server, everyone]


def grouped_plan(prefix: str, n_users: int, group_size: int, channels_per_group: int = 1) -> Plan:
    """``n_users`` users ``{prefix}u{i}`` in servers of ``group_size`` members each.

    ``group_size == n_users``: everyone in one server (fan-out); ``group_size == 1``:
    each user alone in a server of their own (handshakes, memory)."""
    fixture: dict[str, Any] = {"users": [], "servers": [], "roles": [], "members": [],
                               "channels": []}
    users: list[str] = []
    rooms: list[str] = []
    channels: list[list[str]] = []
    for i in range(n_users):
        uid = f"{prefix}u{i}"
        users.append(uid)
        fixture["users"].append(_user(uid))
        g = i // group_size
        sid = f"{prefix}s{g}"
        group_channels = [f"{prefix}s{g}c{c}" for c in range(channels_per_group)]
        if i % group_size == 0:
            server, role = _server(sid, uid)
            fixture["servers"].append(server)
            fixture["roles"].append(role)
            for cid in group_channels:
                fixture["channels"].append(
                    {"id": cid, "serverId": sid, "name": cid, "type": "text", "overwrites": []})
        fixture["members"].append({"serverId": sid, "userId": uid, "roleIds": []})
        rooms.append(sid)
        channels.append(group_channels)
    return Plan(fixture, users, rooms, channels)


def write_json(path: str, doc: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, separators=(",", ":"))


# --- process statistics -------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """Resident set size of a process, KiB (VmRSS)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        stat = fh.read()
    fields = stat[stat.rindex(")") + 2:].split()
    # fields[0] is the state (field 3 of stat); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def system_busy_seconds() -> float:
    """CPU time all cores have spent busy since boot (from /proc/stat)."""
    with open("/proc/stat", encoding="ascii") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / _CLK_TCK


@dataclass(frozen=True)
class CpuSnapshot:
    wall: float
    busy: float
    ours: float


def cpu_snapshot(pids: Sequence[int]) -> CpuSnapshot:
    """System-wide busy CPU and the CPU of ``pids`` (this process included)."""
    ours = sum(os.times()[:2])
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            ours += cpu_seconds(pid)
    return CpuSnapshot(time.monotonic(), system_busy_seconds(), ours)


def foreign_cores(a: CpuSnapshot, b: CpuSnapshot) -> float:
    """Average cores used by processes that are not ours between two snapshots."""
    wall = b.wall - a.wall
    if wall <= 0:
        return float("nan")
    return max(0.0, ((b.busy - a.busy) - (b.ours - a.ours)) / wall)


# --- statistics ---------------------------------------------------------------------


def percentile(sorted_values: Sequence[int] | Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in [0, 100])."""
    if not sorted_values:
        return float("nan")
    rank = max(1, round(q / 100.0 * len(sorted_values) + 0.5 - 1e-9))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def median(values: Sequence[float]) -> float:
    clean = [v for v in values if v == v]  # drop NaN
    return statistics.median(clean) if clean else float("nan")


def ratio(a: float, b: float) -> float:
    if b == 0 or a != a or b != b:
        return float("nan")
    return a / b
